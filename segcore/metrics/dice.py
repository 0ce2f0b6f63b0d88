"""Per-image, per-class Dice from confusion counts, vectorised over a batch.

Dice = 2|X∩Y| / (|X|+|Y|) = 2TP / (2TP + FP + FN), for each image and each class.

Empty-ground-truth policy (a class absent from an image's ground truth):

- prediction also empty (TP = FP = FN = 0): Dice = 1.0 and ``empty_gt`` is True;
- prediction not empty (FP > 0): Dice = 0.0 and ``empty_gt`` is True.

Report rows carry ``empty_gt`` so that analysts can exclude or weigh such rows.
"""

from __future__ import annotations

import numpy as np


def confusion_counts(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image, per-class TP, FP and FN pixel counts.

    Args:
        pred: ``(N, H, W)`` integer class labels in ``[0, num_classes)``.
        gt: ``(N, H, W)`` integer class labels in ``[0, num_classes)``, same shape as ``pred``.
        num_classes: number of classes, background (class 0) included.

    Returns:
        ``(tp, fp, fn)``, each ``(N, num_classes)`` int64.
    """
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground-truth shape {gt.shape}")
    if pred.ndim != 3:
        raise ValueError(f"expected (N, H, W) label maps, got shape {pred.shape}")
    n = pred.shape[0]
    c = int(num_classes)
    for name, arr in (("prediction", pred), ("ground truth", gt)):
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= c):
            raise ValueError(f"{name} has labels outside [0, {c}): min {arr.min()}, max {arr.max()}")
    # One bincount over (image, gt, pred) codes gives every image's confusion matrix at once.
    codes = (np.arange(n, dtype=np.int64)[:, None, None] * (c * c)
             + gt.astype(np.int64) * c + pred.astype(np.int64))
    return counts_from_matrices(np.bincount(codes.ravel(), minlength=n * c * c).reshape(n, c, c))


def counts_from_matrices(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image, per-class ``(tp, fp, fn)``, each ``(N, K)`` int64, of ``(N, K, K)`` confusion
    matrices ``[image, gt class, predicted class]`` (pixel counts)."""
    cm = np.asarray(cm, dtype=np.int64)
    tp = np.diagonal(cm, axis1=1, axis2=2).copy()
    return tp, cm.sum(axis=1) - tp, cm.sum(axis=2) - tp


def dice_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dice and the empty-ground-truth flag from counts (any matching shapes).

    Returns ``(dice float64, empty_gt bool)``; see the module docstring for the empty policy.
    """
    tp = np.asarray(tp, dtype=np.int64)
    fp = np.asarray(fp, dtype=np.int64)
    fn = np.asarray(fn, dtype=np.int64)
    denom = 2 * tp + fp + fn
    empty_gt = (tp + fn) == 0
    with np.errstate(divide="ignore", invalid="ignore"):
        dice = np.where(denom > 0, 2.0 * tp / np.maximum(denom, 1), 1.0)
    return dice.astype(np.float64), empty_gt


def dice_per_class(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> np.ndarray:
    """``(N, num_classes)`` float64 Dice of ``(N, H, W)`` label maps (see module policy)."""
    dice, _ = dice_from_counts(*confusion_counts(pred, gt, num_classes))
    return dice
