"""Tests for segcore.metrics.dice: hand-computed Dice on tiny masks, the empty-GT policy, a batch
equals a per-image loop, validation, and agreement with torchmetrics on random masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from torchmetrics.functional.classification import multiclass_f1_score
from torchmetrics.functional.segmentation import dice_score

from segcore.metrics.dice import confusion_counts, dice_from_counts, dice_per_class

# 2x2, two classes. class 0: TP (0,0); FN (1,0). class 1: TP (0,1),(1,1); FP (1,0).
PRED_2x2 = np.array([[[0, 1], [1, 1]]])
GT_2x2 = np.array([[[0, 1], [0, 1]]])

# 3x3, three classes.
# class 0: gt (0,0),(0,1),(1,0); pred (0,0),(1,0)           -> TP 2, FP 0, FN 1 -> 4/5
# class 1: gt (0,2),(1,1),(1,2); pred (0,1),(0,2),(1,1)     -> TP 2, FP 1, FN 1 -> 4/6
# class 2: gt (2,0),(2,1),(2,2); pred (1,2),(2,0),(2,1),(2,2) -> TP 3, FP 1, FN 0 -> 6/7
GT_3x3 = np.array([[[0, 0, 1], [0, 1, 1], [2, 2, 2]]])
PRED_3x3 = np.array([[[0, 1, 1], [0, 1, 2], [2, 2, 2]]])


def _reference_counts(pred: np.ndarray, gt: np.ndarray, c: int) -> tuple[np.ndarray, ...]:
    """Per-image, per-class counts by explicit boolean masks (independent of the bincount trick)."""
    n = pred.shape[0]
    tp, fp, fn = (np.zeros((n, c), dtype=np.int64) for _ in range(3))
    for i in range(n):
        for k in range(c):
            p, g = pred[i] == k, gt[i] == k
            tp[i, k] = np.sum(p & g)
            fp[i, k] = np.sum(p & ~g)
            fn[i, k] = np.sum(~p & g)
    return tp, fp, fn


def test_counts_and_dice_on_2x2_by_hand() -> None:
    tp, fp, fn = confusion_counts(PRED_2x2, GT_2x2, 2)
    np.testing.assert_array_equal(tp, [[1, 2]])
    np.testing.assert_array_equal(fp, [[0, 1]])
    np.testing.assert_array_equal(fn, [[1, 0]])
    assert tp.dtype == fp.dtype == fn.dtype == np.int64
    np.testing.assert_allclose(dice_per_class(PRED_2x2, GT_2x2, 2), [[2 / 3, 4 / 5]], rtol=0, atol=1e-12)


def test_counts_and_dice_on_3x3_by_hand() -> None:
    tp, fp, fn = confusion_counts(PRED_3x3, GT_3x3, 3)
    np.testing.assert_array_equal(tp, [[2, 2, 3]])
    np.testing.assert_array_equal(fp, [[0, 1, 1]])
    np.testing.assert_array_equal(fn, [[1, 1, 0]])
    dice, empty = dice_from_counts(tp, fp, fn)
    np.testing.assert_allclose(dice, [[4 / 5, 4 / 6, 6 / 7]], rtol=0, atol=1e-12)
    assert dice.dtype == np.float64
    assert not empty.any()


def test_empty_gt_both_empty_is_one() -> None:
    # Class 2 is absent from both prediction and ground truth.
    pred = np.array([[[0, 1], [1, 0]]], dtype=np.uint8)
    gt = np.array([[[0, 1], [1, 1]]], dtype=np.uint8)
    tp, fp, fn = confusion_counts(pred, gt, 3)
    dice, empty = dice_from_counts(tp, fp, fn)
    assert dice[0, 2] == 1.0
    assert empty[0, 2]
    assert not empty[0, 0] and not empty[0, 1]
    np.testing.assert_allclose(dice[0, :2], [2 / 3, 4 / 5])  # class 0: TP1 FN0 FP1; class 1: TP2 FN1 FP0


def test_empty_gt_with_prediction_is_zero() -> None:
    pred = np.array([[[0, 1], [0, 0]]])
    gt = np.zeros((1, 2, 2), dtype=np.int64)
    dice, empty = dice_from_counts(*confusion_counts(pred, gt, 2))
    assert dice[0, 1] == 0.0
    assert empty[0, 1]
    assert dice[0, 0] == pytest.approx(6 / 7)  # TP 3, FN 1, FP 0
    assert not empty[0, 0]


def test_gt_present_prediction_empty_is_zero_not_flagged() -> None:
    pred = np.zeros((1, 2, 2), dtype=np.int64)
    gt = np.array([[[0, 1], [0, 0]]])
    dice, empty = dice_from_counts(*confusion_counts(pred, gt, 2))
    assert dice[0, 1] == 0.0
    assert not empty[0, 1]


def test_dice_from_counts_keeps_any_shape() -> None:
    tp = np.array([1, 0, 0, 5])
    fp = np.array([1, 0, 2, 0])
    fn = np.array([0, 0, 0, 5])
    dice, empty = dice_from_counts(tp, fp, fn)
    np.testing.assert_allclose(dice, [2 / 3, 1.0, 0.0, 10 / 15])
    np.testing.assert_array_equal(empty, [False, True, True, False])


def test_batch_equals_per_image_loop() -> None:
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 4, size=(7, 9, 11))
    gt = rng.integers(0, 4, size=(7, 9, 11))
    gt[3] = 0  # one image whose GT holds only background
    pred[5] = gt[5]  # one perfect image
    batch = confusion_counts(pred, gt, 4)
    for i in range(7):
        one = confusion_counts(pred[i : i + 1], gt[i : i + 1], 4)
        for b, o in zip(batch, one):
            np.testing.assert_array_equal(b[i], o[0])
    for b, r in zip(batch, _reference_counts(pred, gt, 4)):
        np.testing.assert_array_equal(b, r)
    np.testing.assert_array_equal(dice_per_class(pred[5:6], gt[5:6], 4), np.ones((1, 4)))


def test_counts_are_conserved() -> None:
    rng = np.random.default_rng(1)
    pred = rng.integers(0, 3, size=(4, 5, 6))
    gt = rng.integers(0, 3, size=(4, 5, 6))
    tp, fp, fn = confusion_counts(pred, gt, 3)
    np.testing.assert_array_equal(tp + fn, [[np.sum(g == k) for k in range(3)] for g in gt])
    np.testing.assert_array_equal(tp + fp, [[np.sum(p == k) for k in range(3)] for p in pred])
    np.testing.assert_array_equal(fp.sum(axis=1), fn.sum(axis=1))


def test_empty_batch_gives_empty_counts() -> None:
    tp, fp, fn = confusion_counts(np.zeros((0, 3, 3), np.int64), np.zeros((0, 3, 3), np.int64), 2)
    assert tp.shape == fp.shape == fn.shape == (0, 2)


@pytest.mark.parametrize(
    ("pred", "gt"),
    [
        (np.array([[[0, 2]]]), np.array([[[0, 1]]])),  # prediction label == num_classes
        (np.array([[[0, 1]]]), np.array([[[0, 5]]])),  # ground-truth label above range
        (np.array([[[0, -1]]]), np.array([[[0, 1]]])),  # negative prediction label
        (np.array([[[0, 1]]]), np.array([[[-3, 1]]])),  # negative ground-truth label
    ],
)
def test_labels_out_of_range_raise(pred: np.ndarray, gt: np.ndarray) -> None:
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        confusion_counts(pred, gt, 2)


def test_shape_mismatch_raises() -> None:
    with pytest.raises(ValueError, match="differs"):
        confusion_counts(np.zeros((1, 2, 2), np.int64), np.zeros((1, 2, 3), np.int64), 2)
    with pytest.raises(ValueError, match="differs"):
        dice_per_class(np.zeros((2, 2, 2), np.int64), np.zeros((1, 2, 2), np.int64), 2)


def test_wrong_ndim_raises() -> None:
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        confusion_counts(np.zeros((2, 2), np.int64), np.zeros((2, 2), np.int64), 2)


@pytest.mark.parametrize("seed", range(20))
def test_matches_torchmetrics(seed: int) -> None:
    rng = np.random.default_rng(seed)
    c = int(rng.integers(2, 6))
    n, h, w = int(rng.integers(1, 5)), int(rng.integers(1, 9)), int(rng.integers(1, 9))
    # A skewed label distribution so that some classes are absent from some images.
    probs = rng.dirichlet(np.full(c, 0.5))
    pred = rng.choice(c, size=(n, h, w), p=probs)
    gt = rng.choice(c, size=(n, h, w), p=probs)
    tp, fp, fn = confusion_counts(pred, gt, c)
    ours, empty = dice_from_counts(tp, fp, fn)

    pt, gtt = torch.from_numpy(pred), torch.from_numpy(gt)
    # dice_score gives NaN where a class is absent from both; our policy gives 1.0 there.
    ref = dice_score(pt, gtt, num_classes=c, average="none", input_format="index").double().numpy()
    both_empty = (tp + fp + fn) == 0
    np.testing.assert_array_equal(np.isnan(ref), both_empty)
    np.testing.assert_allclose(ours[~both_empty], ref[~both_empty], rtol=0, atol=1e-6)
    assert np.all(ours[both_empty] == 1.0) and np.all(empty[both_empty])

    # Per-image F1 per class equals Dice; zero_division=1 is the same empty policy as ours.
    f1 = multiclass_f1_score(pt, gtt, num_classes=c, average="none", multidim_average="samplewise",
                             zero_division=1).double().numpy()
    np.testing.assert_allclose(ours, f1, rtol=0, atol=1e-6)
    f1_zero = multiclass_f1_score(pt, gtt, num_classes=c, average="none", multidim_average="samplewise",
                                  zero_division=0).double().numpy()
    np.testing.assert_allclose(ours[~both_empty], f1_zero[~both_empty], rtol=0, atol=1e-6)


_label_maps = st.integers(1, 4).flatmap(
    lambda c: st.tuples(
        st.just(c),
        st.tuples(st.integers(1, 3), st.integers(1, 5), st.integers(1, 5)).flatmap(
            lambda shape: st.tuples(
                hnp.arrays(np.int64, shape, elements=st.integers(0, c)),
                hnp.arrays(np.int64, shape, elements=st.integers(0, c)),
            )
        ),
    )
)


@settings(max_examples=80, deadline=None, database=None)
@given(_label_maps)
def test_properties(case: tuple[int, tuple[np.ndarray, np.ndarray]]) -> None:
    c_max, (pred, gt) = case
    c = c_max + 1
    d = dice_per_class(pred, gt, c)
    assert d.shape == (pred.shape[0], c)
    assert np.all((d >= 0.0) & (d <= 1.0))
    np.testing.assert_array_equal(dice_per_class(gt, pred, c), d)  # symmetric
    np.testing.assert_array_equal(dice_per_class(gt, gt, c), np.ones_like(d))
    np.testing.assert_array_equal(dice_per_class(pred, pred, c), np.ones_like(d))
