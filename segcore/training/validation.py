"""Scoring a semantic model on its validation images, and what the scores decide after training.

:func:`pooled_dice` is the figure the semantic trainers keep their best epoch by; after the last
epoch, :func:`decide_largest_region` uses it to decide whether the model's masks keep only each
image's largest foreground region (:attr:`segcore.models.outputs.OutputRule.largest_region`), and
:func:`refit_on_all` trains again on every image for the best epoch's number of epochs
(``Recipe.refit``). :func:`no_validation` is the check of a run that holds nothing out
(``val_fraction`` 0, and the refit): its last epoch is kept.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from segcore.errors import ConfigError
from segcore.metrics.dice import confusion_counts, dice_from_counts
from segcore.models.checkpoint import ModelMeta
from segcore.models.predict import TorchPredictor
from segcore.training.loop import FitResult, Validation

log = logging.getLogger(__name__)


def pooled_dice(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """``(num_classes,)`` Dice per class of ``(N, *spatial)`` predicted labels against the truth,
    pooled over the images (2 ΣTP / (2 ΣTP + ΣFP + ΣFN)); a volume counts as the image of its
    stacked slices."""
    width = truth.shape[-1]
    tp, fp, fn = (c.sum(axis=0) for c in confusion_counts(pred.reshape(len(pred), -1, width),
                                                          truth.reshape(len(truth), -1, width), num_classes))
    return dice_from_counts(tp, fp, fn)[0]


def foreground_mean(per_class: np.ndarray, present: np.ndarray) -> float:
    """Mean Dice of the foreground classes that ``present`` (``(num_classes,)`` bool: the class has a
    pixel in the validation ground truth) marks: a class absent there scores 1.0 or 0.0 by the rule
    for empty classes, whatever the model learnt, and would decide the best epoch by predicting
    nothing of it. With no foreground class present, of every foreground class."""
    fg = np.asarray(present[1:], dtype=bool)
    return float((per_class[1:][fg] if fg.any() else per_class[1:]).mean())


def classes_present(truth: np.ndarray, num_classes: int) -> np.ndarray:
    """``(num_classes,)`` bool: which classes have a pixel in the label array ``truth``."""
    return np.bincount(np.asarray(truth).ravel().astype(np.int64), minlength=num_classes)[:num_classes] > 0


def decide_largest_region(model: nn.Module, meta: ModelMeta, choice: str, without: float | None, *,
                          x_val: np.ndarray, y_val: np.ndarray, device: torch.device, batch_size: int, dims: int
                          ) -> tuple[ModelMeta, dict[str, Any]]:
    """The meta with :attr:`~segcore.models.outputs.OutputRule.largest_region` as ``choice`` says, and
    what was decided and measured (for the provenance).

    ``auto`` turns the rule on when ``model`` with it scores a higher mean foreground Dice on the
    validation images (``x_val`` raw, ``y_val`` labels) than ``without`` (the same model's score
    without it); ``on`` and ``off`` force it. With no validation images (``val_fraction`` 0;
    ``without`` is then ``None``) ``auto`` has nothing to decide by and leaves the rule off, and
    ``on`` keeps it unmeasured; the record's ``reason`` says so. Volumetric models (``dims`` 3)
    never have it.
    """
    if dims != 2:
        if choice == "on":
            raise ConfigError("keeping the largest foreground region applies to 2-D models only")
        return meta, {"choice": choice, "kept": False, "reason": "volumetric model"}
    if choice == "off":
        return meta, {"choice": choice, "kept": False}
    ruled = meta.model_copy(update={"output": meta.output.model_copy(update={"largest_region": True})})
    if len(x_val) == 0:
        if choice == "on":
            return ruled, {"choice": choice, "kept": True, "reason": "forced; no validation images to measure it on"}
        reason = "no validation images to decide by (val_fraction 0); --largest-region on keeps it"
        log.info("largest foreground region of each image: not kept: %s", reason)  # the summary says it
        return meta, {"choice": choice, "kept": False, "reason": reason}
    pred = TorchPredictor(model, ruled, device=str(device), precision="fp32").labels(x_val,
                                                                                     batch_size=max(batch_size, 32))
    per_class = pooled_dice(pred, y_val, meta.num_classes)
    with_rule = foreground_mean(per_class, classes_present(y_val, meta.num_classes))
    kept = choice == "on" or with_rule > without
    log.info("largest foreground region of each image: validation mean foreground Dice %.4f with it, %.4f "
             "without; %s", with_rule, without, "kept" if kept else "not kept")
    return (ruled if kept else meta), {
        "choice": choice, "kept": kept, "val_dice_mean_fg_with": with_rule, "val_dice_mean_fg_without": without,
        "val_dice_with": {name: float(d) for name, d in zip(meta.class_names, per_class)}}


def no_validation(model: nn.Module, *, summary: str = "no validation") -> Validation:
    """The check of a run with nothing held out (``val_fraction`` 0, or a refit on every image): no
    score, so every epoch replaces the kept one and the last is kept; no ``val_*`` history entries.
    ``summary``: the validation part of the epoch's log line."""
    return Validation(fields={}, score=None, summary=summary)


def refit_on_all(model: nn.Module, result: FitResult,
                 train_all: Callable[[Callable[[dict], None] | None], tuple[nn.Module, FitResult]], *,
                 n_images: int, spent: bool, progress: Callable[[dict], None] | None
                 ) -> tuple[nn.Module, dict[str, Any]]:
    """Train again on every image, validation split included, for as many epochs as the run with the
    split kept (``result.best_epoch``, under a schedule sized to them), and keep the last epoch.

    Args:
        model: the run's best model (kept when the refit cannot be done).
        result: that run's :class:`FitResult`.
        train_all: ``report -> (model, FitResult)``: the same recipe on every image, fresh from the
            run's starting weights, ``report`` called with each epoch's record.
        n_images: how many images that is (for the record).
        spent: the run's time budget is spent: no refit.
        progress: called with each refit epoch's record, marked ``"stage": "refit"`` with the refit's
            ``"epochs"``.

    Returns:
        The model to keep and the provenance's ``refit`` record: ``done``, ``epochs``, ``images``, the
        last epoch's ``loss`` and ``seconds``; or ``done`` False with the ``reason`` the run's model
        was kept (a time budget spent before the refit or during it).
    """
    epochs = int(result.best_epoch)
    if spent:
        log.warning("the time budget was spent before the refit on every image; the validated model is kept")
        return model, {"done": False, "epochs": epochs, "reason": "time budget spent before the refit"}
    t0 = time.perf_counter()
    report = None if progress is None else (lambda rec: progress({**rec, "stage": "refit", "epochs": epochs}))
    refitted, fitted = train_all(report)
    if fitted.stopped_early:
        log.warning("the time budget ran out after %d of %d refit epochs; the validated model is kept",
                    len(fitted.history), epochs)
        return model, {"done": False, "epochs": epochs, "epochs_run": len(fitted.history),
                       "reason": "time budget spent during the refit"}
    seconds = round(time.perf_counter() - t0, 3)
    log.info("refit on all %d images for %d epochs (%.1f s): loss %.4f", n_images, epochs, seconds,
             fitted.history[-1]["loss"])
    return refitted, {"done": True, "epochs": epochs, "images": int(n_images),
                      "loss": float(fitted.history[-1]["loss"]), "seconds": seconds}


__all__ = ["decide_largest_region", "no_validation", "pooled_dice", "refit_on_all"]
