"""Tests of the shared training loop on a one-parameter model whose behaviour can be followed by hand."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from segcore.errors import ConfigError
from segcore.training.loop import Validation, fit, seeded_torch


class Scalar(nn.Module):
    """One weight ``w``; the loss of a batch ``t`` is ``(w - t) ** 2``."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.0))


def _run(scores, *, epochs=None, steps=2, **kwargs):
    """Fit a Scalar towards 1.0; validation of epoch ``e`` returns ``scores[e - 1]``. Returns the
    model, the result, ``w`` after each epoch, and the modes seen while training / validating."""
    model = Scalar()
    seen_w: list[float] = []
    modes = {"train": set(), "validate": set()}

    def batches():
        for _ in range(steps):
            modes["train"].add(model.training)
            yield torch.tensor(1.0)

    def loss(m, target):
        return {"fit": (m.w - target) ** 2}

    def validate(m):
        modes["validate"].add(m.training)
        seen_w.append(float(m.w.detach()))
        score = scores[len(seen_w) - 1]
        return Validation(fields={"val_score": score}, score=score, summary=f"score {score}")

    result = fit(model, epochs=epochs or len(scores), steps_per_epoch=steps, batches=batches, loss=loss,
                 validate=validate, lr=0.1, **kwargs)
    return model, result, seen_w, modes


def test_the_best_epoch_is_kept_and_ties_go_to_the_earlier():
    model, result, seen_w, modes = _run([0.2, 0.5, 0.5, 0.1])
    assert result.best_epoch == 2
    assert result.best.score == 0.5 and result.best.fields == {"val_score": 0.5}
    assert float(model.w.detach()) == seen_w[1]  # the weights of epoch 2, not of the last one
    assert len(set(seen_w)) == 4  # every epoch moved the weight
    assert not result.stopped_early and not model.training
    assert modes == {"train": {True}, "validate": {False}}


def test_tuple_scores_compare_element_by_element():
    _, result, _, _ = _run([(0.5, 0.1), (0.5, 0.3), (0.4, 0.9)])
    assert result.best_epoch == 2


def test_without_validation_the_last_epoch_is_kept():
    model, result, seen_w, _ = _run([None, None, None])
    assert result.best_epoch == 3
    assert float(model.w.detach()) == seen_w[2]


def test_history_records_hold_the_mean_loss_validation_fields_and_times():
    seen = []
    _, result, seen_w, _ = _run([0.1, 0.2], steps=3, progress=seen.append, record_loss_parts=True)
    assert seen == result.history
    first = result.history[0]
    assert list(first) == ["epoch", "loss", "losses", "val_score", "lr", "seconds", "elapsed_s"]
    # Epoch 1 starts at w = 0 with target 1: the first loss is 1 and later ones are below it.
    assert 0.0 < first["loss"] < 1.0 and first["losses"] == {"fit": first["loss"]}
    assert [r["epoch"] for r in result.history] == [1, 2]
    assert result.history[1]["loss"] < first["loss"]
    assert 0 < first["seconds"] <= first["elapsed_s"] <= result.history[1]["elapsed_s"]


def test_loss_parts_are_summed_and_left_out_of_the_record_unless_asked():
    model = Scalar()

    def loss(m, _):
        return {"a": m.w * 0 + 1.0, "b": m.w * 0 + 2.0}  # constant parts: 3 in all, no gradient

    result = fit(model, epochs=1, steps_per_epoch=1, batches=lambda: [None], loss=loss, lr=0.1,
                 validate=lambda m: Validation(fields={}, score=None, summary="-"))
    assert result.history[0]["loss"] == 3.0 and "losses" not in result.history[0]


def test_the_time_budget_stops_after_the_epoch_that_spends_it():
    started = time.perf_counter() - 100.0  # as if preparing the data took 100 s
    model, result, seen_w, _ = _run([0.1, 0.2, 0.3], time_budget_s=50.0, started=started)
    assert result.stopped_early and len(result.history) == 1 and result.best_epoch == 1
    assert result.history[0]["elapsed_s"] >= 100.0 and result.history[0]["time_budget_spent"]
    _, result, _, _ = _run([0.1], time_budget_s=50.0, started=started)
    assert not result.stopped_early  # the budget ran out with the last epoch: nothing was cut
    assert "time_budget_spent" not in result.history[0]
    _, result, _, _ = _run([0.1, 0.2, 0.3], time_budget_s=3600.0)
    assert not result.stopped_early and len(result.history) == 3


def test_gradients_are_clipped_before_each_step():
    """The loss callback of step 2 still sees the gradient step 1 was taken with (the loop zeroes
    it only after computing the next loss): d/dw 100 (w - 1)^2 = -200 at w = 0, clipped to norm 0.5."""
    grads = {}

    def loss(m, step):
        if step == 2:
            grads["step 1"] = float(m.w.grad)
        return {"fit": 100.0 * (m.w - 1.0) ** 2}

    for clip, expected in ((0.5, -0.5), (None, -200.0)):
        fit(Scalar(), epochs=1, steps_per_epoch=2, batches=lambda: [1, 2], loss=loss, lr=0.1, grad_clip_norm=clip,
            validate=lambda m: Validation(fields={}, score=None, summary="-"))
        assert grads["step 1"] == pytest.approx(expected, rel=1e-6)


def test_bad_counts_are_refused():
    with pytest.raises(ConfigError, match="positive"):
        fit(Scalar(), epochs=0, steps_per_epoch=1, batches=list, loss=dict, lr=0.1,
            validate=lambda m: Validation(fields={}, score=None, summary="-"))


def test_seeded_torch_is_reproducible_and_restores_the_callers_state():
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    with seeded_torch(3):
        a = torch.rand(4)
    with seeded_torch(3):
        b = torch.rand(4)
    assert torch.equal(a, b)
    assert torch.equal(torch.rand(2), expected)


def test_a_loss_that_becomes_nan_or_infinite_stops_training_with_an_error_naming_the_learning_rate():
    from segcore.errors import ModelError

    for bad in (float("nan"), float("inf")):
        model = Scalar()

        def batches():
            yield torch.tensor(1.0)
            yield torch.tensor(bad)

        with pytest.raises(ModelError, match=r"training diverged in epoch 1: the loss is (nan|inf).*--lr, 0.1 now"):
            fit(model, epochs=3, steps_per_epoch=2, batches=batches, loss=lambda m, t: {"fit": (m.w - t) ** 2},
                validate=lambda m: Validation(fields={}, score=None, summary="-"), lr=0.1)


def test_the_validation_mean_leaves_out_classes_absent_from_the_validation_images():
    import numpy as np

    from segcore.training.validation import classes_present, foreground_mean

    truth = np.array([[[0, 1], [1, 0]]])  # class 2 has no pixel: its Dice (1.0 or 0.0) says nothing
    present = classes_present(truth, 3)
    assert present.tolist() == [True, True, False]
    assert foreground_mean(np.array([0.9, 0.6, 1.0]), present) == pytest.approx(0.6)
    assert foreground_mean(np.array([0.9, 0.6, 0.0]), present) == pytest.approx(0.6)
    assert foreground_mean(np.array([1.0, 1.0, 0.0]), classes_present(np.zeros((1, 2, 2)), 3)) == 0.5  # none: all
