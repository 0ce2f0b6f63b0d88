"""Tests of UNet training on in-memory arrays."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcore.models.checkpoint import load_checkpoint, save_checkpoint
from segcore.errors import ConfigError
from segcore.metrics.dice import confusion_counts, dice_per_class
from segcore.normalise import Normalisation
from segcore.collection.imageio import read_image, read_mask
from segcore.synthetic import CLASS_NAMES, generate_collection, make_sample
from segcore.models.predict import TorchPredictor
from segcore.training.semantic import (
    DEMO_ARCH_KWARGS,
    DEMO_BATCH_SIZE,
    DEMO_EPOCHS,
    DEMO_IMAGE_SIZE,
    DEMO_LR,
    DEMO_N_IMAGES,
    DEMO_N_TRAIN,
    DEMO_NORMALISATION,
    DEMO_TIME_BUDGET_S,
    segmentation_loss,
    train_semantic,
)

TINY = {"base": 4, "depth": 2}
NORM = Normalisation(mode="range", scale=255.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(n: int, *, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pairs = [make_sample(rng, size=size) for _ in range(n)]
    return np.stack([p[0] for p in pairs])[..., None], np.stack([p[1] for p in pairs])


def _train(images, masks, **overrides):
    kwargs = {
        "class_names": CLASS_NAMES,
        "arch_kwargs": TINY,
        "normalisation": NORM,
        "epochs": 2,
        "batch_size": 4,
        "seed": 0,
    }
    kwargs.update(overrides)
    return train_semantic(images, masks, **kwargs)


@pytest.fixture(scope="module")
def tiny_data():
    return _data(8)


def test_same_seed_gives_the_same_weights_and_history(tiny_data):
    images, masks = tiny_data
    m1, meta1, h1 = _train(images, masks)
    m2, meta2, h2 = _train(images, masks)
    m3, _, _ = _train(images, masks, seed=1)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)
    assert [r["loss"] for r in h1] == [r["loss"] for r in h2]
    assert meta1.provenance["val_dice"] == meta2.provenance["val_dice"]


def test_training_does_not_touch_the_global_torch_seed(tiny_data):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    _train(*tiny_data, epochs=1)
    assert torch.equal(torch.rand(3), expected)


def test_history_has_one_record_per_epoch_and_progress_sees_each(tiny_data):
    seen = []
    model, meta, history = _train(*tiny_data, epochs=3, progress=seen.append)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    assert seen == history
    for record in history:
        assert set(record["val_dice"]) == set(CLASS_NAMES)
        assert all(0.0 <= d <= 1.0 for d in record["val_dice"].values())
        assert record["seconds"] > 0
        assert np.isfinite(record["loss"])
    best = max(history, key=lambda r: r["val_dice_mean_fg"])
    assert meta.provenance["best_epoch"] == best["epoch"]
    assert meta.provenance["val_dice"] == best["val_dice"]
    assert not model.training


def test_meta_describes_the_model_and_the_run(tiny_data):
    images, masks = tiny_data
    arch_kwargs = dict(TINY)
    model, meta, _ = _train(images, masks, arch_kwargs=arch_kwargs, val_fraction=0.25)
    assert arch_kwargs == TINY  # the caller's dict is left alone
    assert meta.arch == "unet"
    assert meta.arch_kwargs == TINY
    assert meta.class_names == CLASS_NAMES
    assert meta.in_channels == 1
    assert meta.normalisation == NORM
    p = meta.provenance
    assert (p["n_train"], p["n_val"]) == (6, 2)
    assert (p["epochs"], p["epochs_run"], p["seed"], p["stopped_early"]) == (2, 2, 0, False)
    assert p["torch_version"] == torch.__version__
    assert p["seconds"] > 0


def test_returned_weights_are_those_of_the_best_epoch(tiny_data, tmp_path):
    """Re-evaluating the returned model on the validation split reproduces the best record."""
    images, masks = tiny_data
    model, meta, _ = _train(images, masks, epochs=3, val_fraction=0.25)
    val_idx = np.sort(np.random.default_rng(0).permutation(len(images))[:2])
    pred = TorchPredictor(model.eval(), meta).labels(images[val_idx])
    tp, fp, fn = (c.sum(axis=0) for c in confusion_counts(pred, masks[val_idx], len(CLASS_NAMES)))
    dice = 2 * tp / (2 * tp + fp + fn)  # pooled over the validation images
    assert dict(zip(CLASS_NAMES, dice.tolist())) == pytest.approx(meta.provenance["val_dice"])
    # And the checkpoint round trip keeps predictions identical.
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "m.safetensors", model, meta))
    np.testing.assert_array_equal(TorchPredictor(loaded.eval(), meta).labels(images[val_idx]), pred)


@pytest.mark.parametrize("floor, patches", [(0, 7), (5, 7), (10, 10)])
def test_an_epoch_draws_a_patch_per_training_image_or_the_floor(tiny_data, monkeypatch, floor, patches):
    import segcore.training.semantic as semantic
    from segcore.training.settings import Recipe

    drawn = []
    real = semantic.augment
    monkeypatch.setattr(semantic, "augment", lambda x, y, rng, full: drawn.append(len(x)) or real(x, y, rng, full=full))
    _, meta, _ = _train(*tiny_data, epochs=2, recipe=Recipe(min_epoch_patches=floor))  # 7 training images, 1 held out
    assert meta.provenance["n_train"] == 7 and sum(drawn) == 2 * patches
    assert max(drawn) <= 4 and meta.provenance["recipe"]["min_epoch_patches"] == floor


def test_time_budget_stops_after_the_current_epoch(tiny_data):
    _, meta, history = _train(*tiny_data, epochs=5, time_budget_s=1e-6)
    assert len(history) == 1
    assert meta.provenance["stopped_early"] is True
    assert meta.provenance["epochs_run"] == 1


def test_three_dimensional_images_mean_one_channel(tiny_data):
    images, masks = tiny_data
    _, meta, _ = _train(images[..., 0], masks, epochs=1)
    assert meta.in_channels == 1


def test_loss_is_low_for_confident_correct_logits_and_high_otherwise():
    target = torch.tensor([[[0, 1], [2, 1]]])
    onehot = torch.nn.functional.one_hot(target, 3).permute(0, 3, 1, 2).float()
    good = segmentation_loss(onehot * 20.0, target)
    bad = segmentation_loss((1 - onehot) * 20.0, target)
    assert float(good) < 0.01
    # Each pixel: the two wrong classes share the probability. Cross-entropy log(1 + 2 e^20);
    # soft Dice (smoothing 1): disc (0 + 1) / (1.0 + 2 + 1), square (0 + 1) / (1.5 + 1 + 1).
    expected = np.log1p(2 * np.exp(20.0)) + 1 - (1 / 4 + 1 / 3.5) / 2
    assert float(bad) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"masks": "short"}, "matching images"),
        ({"masks": "float"}, "integer class labels"),
        ({"masks": "label3"}, r"\[0, 3\)"),
        ({"class_names": ("background",)}, "at least one class"),
        ({"val_fraction": -0.1}, r"val_fraction must lie in \[0, 1\): .* 0 for none"),
        ({"val_fraction": 1.0}, r"val_fraction must lie in \[0, 1\): .* 0 for none"),
        ({"val_fraction": float("nan")}, r"val_fraction must lie in \[0, 1\)"),
        ({"n": 1}, r"at least 2 images, or a validation fraction of 0 \(--val-fraction 0\)"),
        ({"n": 0, "val_fraction": 0.0}, "no images to train on"),
        ({"val_fraction": 0.0, "recipe": "refit"}, r"refit \(--refit\) .* val_fraction 0 \(--val-fraction 0\)"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": -1.0}, "lr"),
        ({"time_budget_s": 0.0}, "time_budget_s"),
        ({"arch_kwargs": {"base": 4, "num_classes": 5}}, "num_classes"),
        ({"images": "5d"}, r"\(N, H, W, C\)"),
    ],
)
def test_bad_inputs_raise_config_error(tiny_data, change, match):
    images, masks = tiny_data
    change = dict(change)
    n = change.pop("n", None)
    if n is not None:
        images, masks = images[:n], masks[:n]
    mask_kind = change.pop("masks", None)
    if mask_kind == "short":
        masks = masks[:, :-1]
    elif mask_kind == "float":
        masks = masks.astype(np.float32)
    elif mask_kind == "label3":
        masks = masks.copy()
        masks[0, 0, 0] = 3
    if change.pop("images", None) == "5d":
        images = images[..., None]
    if change.pop("recipe", None) == "refit":
        from segcore.training.settings import Recipe

        change["recipe"] = Recipe(refit=True)
    with pytest.raises(ConfigError, match=match):
        _train(images, masks, **change)


def test_demo_settings_are_consistent():
    assert 0 < DEMO_N_TRAIN < DEMO_N_IMAGES
    assert DEMO_N_IMAGES - DEMO_N_TRAIN >= 100
    assert DEMO_NORMALISATION.mode == "range"
    with pytest.raises(TypeError):
        DEMO_ARCH_KWARGS["base"] = 1  # read-only: callers cannot change the demo for everyone


@pytest.mark.slow
def test_demo_defaults_reach_the_held_out_dice_bar(tmp_path):
    """The demo's recipe on 2 threads: write the collection, train on the first DEMO_N_TRAIN
    images, segment the rest and score them (about a minute on 2 idle CPU cores)."""
    root = tmp_path / "demo"
    ids = generate_collection(root, n_images=DEMO_N_IMAGES, size=DEMO_IMAGE_SIZE, seed=0)
    images = np.stack([read_image(root / "images" / f"{i}.png") for i in ids])
    masks = np.stack([read_mask(root / "masks" / f"{i}.png") for i in ids])
    model, meta, _ = train_semantic(
        images[:DEMO_N_TRAIN],
        masks[:DEMO_N_TRAIN],
        class_names=CLASS_NAMES,
        arch_kwargs=DEMO_ARCH_KWARGS,
        normalisation=DEMO_NORMALISATION,
        epochs=DEMO_EPOCHS,
        batch_size=DEMO_BATCH_SIZE,
        lr=DEMO_LR,
        seed=0,
        time_budget_s=DEMO_TIME_BUDGET_S,
    )
    pred = TorchPredictor(model.eval(), meta).labels(images[DEMO_N_TRAIN:])
    dice = dice_per_class(pred, masks[DEMO_N_TRAIN:], len(CLASS_NAMES)).mean(axis=0)
    assert dice[1:].mean() >= 0.90, dict(zip(CLASS_NAMES, dice.round(4)))


def test_refit_trains_again_on_every_image_for_the_best_epochs(tiny_data, monkeypatch):
    """The refit draws from all 8 images (the split run from 7), for the best epoch's number of epochs,
    and its model is returned; the history, validation figures and largest-region decision are the
    split run's, and the same seed gives the same refit."""
    import segcore.training.semantic as semantic
    from segcore.training.settings import Recipe

    sampled = []
    real = semantic.PatchSampler
    monkeypatch.setattr(semantic, "PatchSampler", lambda masks, **kw: sampled.append(len(masks)) or real(masks, **kw))
    plain, plain_meta, plain_history = _train(*tiny_data, epochs=3)
    records = []
    model, meta, history = _train(*tiny_data, epochs=3, recipe=Recipe(refit=True), progress=records.append)
    again, _, _ = _train(*tiny_data, epochs=3, recipe=Recipe(refit=True))
    assert sampled == [7, 7, 8, 7, 8]
    best = plain_meta.provenance["best_epoch"]
    refit = meta.provenance["refit"]
    assert refit["done"] and refit["epochs"] == best and refit["images"] == 8 and refit["loss"] > 0
    assert "refit" not in plain_meta.provenance
    def figures(records):  # the seconds differ; the figures do not
        return [{k: v for k, v in r.items() if k not in ("seconds", "elapsed_s")} for r in records]

    assert figures(history) == figures(plain_history)
    for key in ("val_dice", "val_dice_mean_fg", "largest_region", "best_epoch"):
        assert meta.provenance[key] == plain_meta.provenance[key]
    assert meta.output == plain_meta.output and meta.normalisation == plain_meta.normalisation
    assert [r.get("stage") for r in records] == [None] * 3 + ["refit"] * best
    assert all(r["epochs"] == best for r in records[3:])
    weights = [m.state_dict() for m in (plain, model, again)]
    assert any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # another model
    assert all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])  # seeded: the same one


def test_refit_keeps_the_validated_model_when_the_time_budget_is_spent(tiny_data):
    from segcore.training.settings import Recipe

    plain, _, _ = _train(*tiny_data, epochs=3, time_budget_s=1e-6)
    model, meta, _ = _train(*tiny_data, epochs=3, time_budget_s=1e-6, recipe=Recipe(refit=True))
    assert meta.provenance["refit"] == {"done": False, "epochs": 1, "reason": "time budget spent before the refit"}
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), model.state_dict().values()))


def test_refit_of_a_fine_tuning_starts_from_the_parent_weights(tiny_data):
    """The split run trains ``init`` in place; the refit starts from a copy taken before it, so it is
    the same as a refit that starts from an untouched copy of the parent."""
    import copy

    from segcore.models import create_model
    from segcore.training.settings import Recipe

    with torch.random.fork_rng():
        torch.manual_seed(5)
        parent = create_model("unet", in_channels=1, num_classes=len(CLASS_NAMES), **TINY)
    twin = copy.deepcopy(parent)
    a, meta, _ = _train(*tiny_data, epochs=2, init=parent, recipe=Recipe(refit=True))
    b, _, _ = _train(*tiny_data, epochs=2, init=twin, recipe=Recipe(refit=True))
    assert meta.provenance["refit"]["done"] and a is not parent
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_val_fraction_0_trains_on_every_image_and_keeps_the_last_epoch(tiny_data, caplog):
    """Nothing held out: both images are trained on, the weights returned are those after the last
    epoch (the model is trained in place from ``init``, so each epoch's weights can be taken as it
    ends), and the provenance and history claim no validation figures and no best epoch."""
    from segcore.models import create_model

    images, masks = tiny_data[0][:2], tiny_data[1][:2]
    with torch.random.fork_rng():
        torch.manual_seed(3)
        start = create_model("unet", in_channels=1, num_classes=len(CLASS_NAMES), **TINY)
    after_epoch: list[dict] = []

    def snapshot(record: dict) -> None:
        after_epoch.append({k: v.clone() for k, v in start.state_dict().items()})

    with caplog.at_level("INFO", logger="segcore.training.validation"):
        model, meta, history = _train(images, masks, epochs=3, val_fraction=0.0, init=start, progress=snapshot)
    kept = model.state_dict()
    assert len(after_epoch) == 3
    assert all(torch.equal(kept[k], after_epoch[-1][k]) for k in kept)
    assert not all(torch.equal(kept[k], after_epoch[0][k]) for k in kept)  # epoch 1 is not what was kept
    p = meta.provenance
    assert (p["n_train"], p["n_val"], p["val_ids"], p["val_fraction"]) == (2, 0, [], 0.0)
    assert (p["best_epoch"], p["val_dice"], p["val_dice_mean_fg"], p["val_split"]) == (None, None, None, None)
    assert p["epochs_run"] == 3 and not any(k.startswith("val_") for r in history for k in r)
    # --largest-region auto decides by validation Dice: with none, it stays off and says why.
    assert p["largest_region"]["kept"] is False and "no validation images" in p["largest_region"]["reason"]
    assert not meta.output.largest_region and "not kept" in caplog.text


def test_val_fraction_0_trains_on_one_image_and_ignores_the_split_kind(tiny_data):
    """One image is enough without validation; a group split asked for is not made (nothing to hold
    out), and forcing the largest-region rule keeps it without figures to measure it by."""
    from segcore.training.settings import Recipe

    images, masks = tiny_data[0][:1], tiny_data[1][:1]
    _, meta, history = _train(images, masks, epochs=1, val_fraction=0.0, ids=["case1_z0"], val_split="group",
                              group_pattern=r"^(case\d+)_", recipe=Recipe(largest_region="on"))
    p = meta.provenance
    assert (p["n_train"], p["n_val"], p["val_split"], p["group_pattern"]) == (1, 0, None, None)
    assert meta.output.largest_region and p["largest_region"]["kept"] and "val_dice_mean_fg_with" not in \
        p["largest_region"]
    assert len(history) == 1 and np.isfinite(history[0]["loss"])


def test_a_class_absent_from_the_validation_images_is_left_out_of_the_mean_and_one_never_seen_is_warned(
        tiny_data, caplog):
    import logging

    from segcore.training.settings import Recipe

    images, masks = tiny_data
    masks = masks.copy()
    masks[-1][masks[-1] == 2] = 1  # the tail split holds out the last image: no class 2 there
    names = (*CLASS_NAMES, "never")  # a fourth class with no pixel anywhere
    with caplog.at_level(logging.WARNING, logger="segcore"):
        _, meta, history = _train(images, masks, class_names=names, epochs=1, val_split="tail",
                                  recipe=Recipe(min_epoch_patches=0, largest_region="off"))
    p = meta.provenance
    assert p["val_absent"] == [CLASS_NAMES[2], "never"]
    assert p["val_dice_mean_fg"] == pytest.approx(p["val_dice"][CLASS_NAMES[1]])  # the one class present
    assert history[0]["val_dice_mean_fg"] == p["val_dice_mean_fg"]
    assert f"class(es) {CLASS_NAMES[2]}, never have no pixel in the 1 validation image(s)" in caplog.text
    assert "1 of the 3 foreground class(es) have no pixel in the training images (never)" in caplog.text
