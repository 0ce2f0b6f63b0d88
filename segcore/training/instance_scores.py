"""Scoring instance segmentations against instance label images (training validation, evaluation).

:func:`pooled_instance_scores` pools the per-image figures of :mod:`segcore.metrics.instance` over
several images (F1 at IoU 0.5, COCO AP, panoptic quality, foreground Dice);
:func:`prediction_scores` applies it to :class:`~segcore.models.instances.InstancePrediction`
records, as a predictor returns them; :func:`evaluate_instances` segments images through a
:class:`~segcore.models.predict.Predictor` first.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from segcore.errors import ConfigError
from segcore.metrics.instance import detection_ratios, instance_scores
from segcore.models.instances import InstancePrediction
from segcore.models.predict import Predictor
from segcore.training.inputs import as_nhwc

#: The pooled figures a training history records per epoch (as ``val_<name>``).
VAL_KEYS = ("f1", "precision", "recall", "ap", "pq", "dice_fg")


def pooled_instance_scores(pred_labels: Sequence[np.ndarray], gt_labels: Sequence[np.ndarray], *,
                           scores: Sequence[Mapping[int, float]] | None = None) -> dict[str, float | int]:
    """Instance figures of several images, pooled.

    Args:
        pred_labels: per image, ``(H, W)`` integer predicted instance ids (0 = background).
        gt_labels: per image, ``(H, W)`` integer ground-truth instance ids, same shapes.
        scores: per image, predicted id -> confidence (for AP); ``None`` = all 1.0.

    Returns ``n_images``, ``tp``, ``fp``, ``fn`` (objects, IoU >= 0.5), ``precision``, ``recall``,
    ``f1`` and ``pq`` (panoptic quality) from the summed counts (all 1.0 when there is nothing at
    all; else a ratio with nothing to count is 0.0, see :func:`~segcore.metrics.instance.detection_ratios`), ``ap`` (COCO AP 0.50:0.95, mean over the images with ground-truth objects; NaN if
    none) and ``dice_fg`` (Dice of foreground vs background over all pixels; 1.0 when both are
    empty). See :mod:`segcore.metrics.instance` for the per-image definitions.
    """
    if len(pred_labels) != len(gt_labels) or (scores is not None and len(scores) != len(gt_labels)):
        raise ConfigError(f"got {len(pred_labels)} predictions and {len(gt_labels)} ground-truth images"
                          + ("" if scores is None else f" and {len(scores)} score maps") + "; give one of each per image")
    tp = fp = fn = inter = total = 0
    iou_sum, aps = 0.0, []
    for i, (pred, gt) in enumerate(zip(pred_labels, gt_labels)):
        s = instance_scores(pred, gt, scores=None if scores is None else scores[i])
        tp, fp, fn = tp + int(s["tp"]), fp + int(s["fp"]), fn + int(s["fn"])
        iou_sum += float(s["mean_matched_iou"]) * int(s["tp"]) if s["tp"] else 0.0
        if not s["empty_gt"]:
            aps.append(float(s["ap"]))
        p, g = np.asarray(pred) > 0, np.asarray(gt) > 0
        inter, total = inter + int((p & g).sum()), total + int(p.sum()) + int(g.sum())
    denom = tp + 0.5 * (fp + fn)
    precision, recall, f1 = detection_ratios(tp, fp, fn)
    return {
        "n_images": len(gt_labels), "tp": tp, "fp": fp, "fn": fn,
        "precision": precision, "recall": recall, "f1": f1,
        "pq": iou_sum / denom if denom else 1.0,
        "ap": float(np.mean(aps)) if aps else float("nan"),
        "dice_fg": 2.0 * inter / total if total else 1.0,
    }


def prediction_scores(predictions: Sequence[InstancePrediction], labels: np.ndarray) -> dict[str, float | int]:
    """:func:`pooled_instance_scores` of one prediction per image against ``labels``
    (``(N, H, W)`` integer ground-truth instance ids), each detection's score as its confidence."""
    return pooled_instance_scores([p.labels for p in predictions], list(np.asarray(labels)),
                                  scores=[{r["instance_id"]: r["score"] for r in p.records} for p in predictions])


def evaluate_instances(predictor: Predictor, images: np.ndarray, labels: np.ndarray, *,
                       batch_size: int = 4) -> dict[str, float | int]:
    """Segment ``images`` with an instance model's predictor and score them against ``labels``.

    Args:
        predictor: e.g. ``TorchPredictor(model.eval(), meta)`` (:mod:`segcore.models.predict`).
        images: ``(N, H, W, C)`` raw images (``(N, H, W)`` means C = 1).
        labels: ``(N, H, W)`` integer ground-truth instance ids (0 = background).
        batch_size: images per forward pass.

    Returns the figures of :func:`pooled_instance_scores` over the ``N`` images.
    """
    return prediction_scores(predictor.instances(as_nhwc(images), batch_size=batch_size), labels)


__all__ = ["VAL_KEYS", "evaluate_instances", "pooled_instance_scores", "prediction_scores"]
