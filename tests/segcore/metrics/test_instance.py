"""Tests for segcore.metrics.instance: a hand-computed split/merge/false-positive image, ids with
gaps, the empty-case policy, validation, properties, and AP agreement with pycocotools COCOeval."""

from __future__ import annotations

import contextlib
import io
import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage

from segcore.errors import ConfigError
from segcore.metrics.instance import (
    COCO_IOU_THRESHOLDS,
    coco_average_precision,
    instance_iou,
    instance_scores,
    instance_scores_per_class,
    match_instances,
)

# Two identical rows, 16 pixels wide. Ground truth: A (id 2) on columns 0-5, B (id 9) on 8-11.
# Predictions: p3 on 0-3 (a split part of A), p7 on 5-11 (merges A's column 5, the gap and B),
# p42 on 13-14 (a false positive).
#   IoU(p3, A) = 4/6; IoU(p7, A) = 1/(7+6-1) = 1/12; IoU(p7, B) = 4/(7+4-4) = 4/7; p42: 0.
# At IoU 0.5: TP 2 (4/6, 4/7), FP 1 (p42), FN 0 -> precision 2/3, recall 1, F1 = 4/5,
# SQ = (4/6 + 4/7)/2 = 13/21, PQ = (26/21)/(2 + 1/2) = 52/105.
_GT_ROW = [2, 2, 2, 2, 2, 2, 0, 0, 9, 9, 9, 9, 0, 0, 0, 0]
_PRED_ROW = [3, 3, 3, 3, 0, 7, 7, 7, 7, 7, 7, 7, 0, 42, 42, 0]
GT = np.array([_GT_ROW, _GT_ROW], dtype=np.uint16)
PRED = np.array([_PRED_ROW, _PRED_ROW], dtype=np.uint16)
# Score order p3 (0.9), p42 (0.8), p7 (0.6). IoU 0.50, 0.55: TP, FP, TP -> precision envelope 1 up to
# recall 0.5 (51 recall points), 2/3 above (50 points): AP = (51 + 100/3)/101 = 253/303.
# IoU 0.60, 0.65: only p3 hits -> 51/101. IoU >= 0.70: nothing -> 0.
SCORES = {3: 0.9, 7: 0.6, 42: 0.8}
AP_PER_THRESHOLD = np.array([253 / 303, 253 / 303, 51 / 101, 51 / 101, 0, 0, 0, 0, 0, 0])

labels_2d = hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=8),
                       elements=st.integers(0, 4))


def test_iou_matrix_by_hand() -> None:
    iou, pred_ids, gt_ids = instance_iou(PRED, GT)
    np.testing.assert_array_equal(pred_ids, [3, 7, 42])
    np.testing.assert_array_equal(gt_ids, [2, 9])
    np.testing.assert_allclose(iou, [[4 / 6, 0], [1 / 12, 4 / 7], [0, 0]], rtol=0, atol=1e-15)
    assert iou.dtype == np.float64 and pred_ids.dtype == gt_ids.dtype == np.int64


def test_scores_by_hand() -> None:
    r = instance_scores(PRED, GT, scores=SCORES)
    assert (r["n_pred"], r["n_gt"], r["tp"], r["fp"], r["fn"]) == (3, 2, 2, 1, 0)
    expected = {"precision": 2 / 3, "recall": 1.0, "f1": 4 / 5, "recognition_quality": 4 / 5,
                "mean_matched_iou": 13 / 21, "segmentation_quality": 13 / 21, "panoptic_quality": 52 / 105,
                "ap": float(AP_PER_THRESHOLD.mean()), "ap50": 253 / 303, "ap75": 0.0}
    for key, value in expected.items():
        assert r[key] == pytest.approx(value, abs=1e-12), key
    assert r["empty_gt"] is False


def test_ap_per_threshold_by_hand() -> None:
    iou, pred_ids, _ = instance_iou(PRED, GT)
    ap = coco_average_precision(iou, np.array([SCORES[int(i)] for i in pred_ids]))
    np.testing.assert_allclose(ap, AP_PER_THRESHOLD, rtol=0, atol=1e-12)


def test_stricter_threshold_drops_the_weaker_match() -> None:
    r = instance_scores(PRED, GT, iou_threshold=0.6)  # 4/7 < 0.6: p7 and B no longer match
    assert (r["tp"], r["fp"], r["fn"]) == (1, 2, 1)
    assert r["panoptic_quality"] == pytest.approx((4 / 6) / (1 + 1 + 0.5), abs=1e-12)


def test_ap_follows_coco_greedy_order_while_matching_is_optimal() -> None:
    # Two detections of one object: the confident one fits worse (IoU 0.62) than the other (0.92).
    iou = np.array([[0.62], [0.92]])
    pred_idx, gt_idx, matched = match_instances(iou, threshold=0.5)
    assert pred_idx.tolist() == [1] and gt_idx.tolist() == [0] and matched.tolist() == [0.92]
    # COCO: up to IoU 0.60 the confident one takes it (AP 1); 0.65..0.90 only the second hits
    # (precision 1/2 everywhere, AP 0.5); at 0.95 nothing does.
    ap = coco_average_precision(iou, np.array([0.9, 0.5]))
    np.testing.assert_allclose(ap, [1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0], rtol=0, atol=1e-12)


def test_matching_below_one_half_prefers_more_matches_over_a_higher_iou() -> None:
    # One 0.9 pair, or two 0.3 pairs: at threshold 0.25 the two matches win (F1 counts objects).
    iou = np.array([[0.9, 0.3], [0.3, 0.0]])
    pred_idx, gt_idx, matched = match_instances(iou, threshold=0.25)
    assert pred_idx.tolist() == [0, 1] and gt_idx.tolist() == [1, 0] and matched.tolist() == [0.3, 0.3]
    pred_idx, gt_idx, _ = match_instances(iou, threshold=0.5)
    assert pred_idx.tolist() == [0] and gt_idx.tolist() == [0]


def test_coco_ties_in_iou_go_to_the_later_ground_truth() -> None:
    # Detection 0 fits both objects equally; COCO gives it the later one, so detection 1 still hits.
    iou = np.array([[0.7, 0.7], [0.7, 0.0]])
    ap = coco_average_precision(iou, np.array([0.9, 0.8]))
    assert ap[0] == pytest.approx(1.0, abs=1e-12)


def test_equal_scores_keep_ascending_prediction_order() -> None:
    # Same score: the first row goes first; a false positive ranked first lowers AP.
    iou = np.array([[0.0], [0.9]])
    assert coco_average_precision(iou, np.array([0.5, 0.5]))[0] == pytest.approx(0.5, abs=1e-12)
    assert coco_average_precision(iou[::-1], np.array([0.5, 0.5]))[0] == pytest.approx(1.0, abs=1e-12)


def test_max_detections_truncates_the_ranking() -> None:
    iou = np.array([[0.9, 0.0], [0.0, 0.9]])
    full = coco_average_precision(iou, np.array([0.9, 0.8]))
    top1 = coco_average_precision(iou, np.array([0.9, 0.8]), max_detections=1)
    assert full[0] == pytest.approx(1.0, abs=1e-12)
    assert top1[0] == pytest.approx(51 / 101, abs=1e-12)  # recall stops at 1/2


def test_ids_with_gaps_and_any_integer_dtype() -> None:
    rng = np.random.default_rng(3)
    ids = np.sort(np.concatenate([rng.choice(np.arange(1, 183), 124, replace=False), [183]]))
    gt = np.zeros((48, 48), dtype=np.int64)
    pred = np.zeros_like(gt)
    pred_ids = rng.permutation(np.arange(1000, 1000 + ids.size))
    for k, (gid, pid) in enumerate(zip(ids, pred_ids)):
        r, c = divmod(k, 12)
        gt[4 * r:4 * r + 3, 4 * c:4 * c + 3] = gid
        pred[4 * r:4 * r + 3, 4 * c:4 * c + 3] = pid
    for dtype in (np.uint16, np.uint32, np.int64, np.uint64):
        iou, p_ids, g_ids = instance_iou(pred.astype(dtype), gt.astype(dtype))
        np.testing.assert_array_equal(g_ids, ids)
        np.testing.assert_array_equal(p_ids, np.sort(pred_ids))
        assert iou.shape == (125, 125)
        rows, cols = np.nonzero(iou)
        np.testing.assert_array_equal(iou[rows, cols], 1.0)
        assert dict(zip(p_ids[rows].tolist(), g_ids[cols].tolist())) == dict(zip(pred_ids.tolist(), ids.tolist()))
    r = instance_scores(pred.astype(np.uint16), gt.astype(np.uint16))
    assert (r["tp"], r["fp"], r["fn"], r["f1"]) == (125, 0, 0, 1.0)


def test_huge_ids_take_the_sorting_path_with_the_same_result() -> None:
    big = np.where(GT > 0, GT.astype(np.uint64) + np.uint64(2**62), np.uint64(0))
    huge = np.where(PRED > 0, PRED.astype(np.int64) + 2**40, 0)
    iou, pred_ids, gt_ids = instance_iou(huge, big)
    ref, _, _ = instance_iou(PRED, GT)
    np.testing.assert_array_equal(iou, ref)
    np.testing.assert_array_equal(pred_ids, np.array([3, 7, 42]) + 2**40)
    np.testing.assert_array_equal(gt_ids, np.array([2, 9]) + 2**62)


def test_empty_policy() -> None:
    empty = np.zeros((4, 5), dtype=np.uint16)
    obj = empty.copy()
    obj[1:3, 1:4] = 5
    both = instance_scores(empty, empty)
    assert (both["n_pred"], both["n_gt"], both["tp"], both["empty_gt"]) == (0, 0, 0, True)
    for key in ("precision", "recall", "f1", "panoptic_quality", "segmentation_quality", "recognition_quality"):
        assert both[key] == 1.0, key
    for key in ("mean_matched_iou", "ap", "ap50", "ap75"):
        assert np.isnan(both[key]), key

    no_gt = instance_scores(obj, empty, scores={5: 0.3})
    assert (no_gt["fp"], no_gt["precision"], no_gt["recall"]) == (1, 0.0, 0.0)  # nothing to find, one claimed
    assert (no_gt["f1"], no_gt["panoptic_quality"]) == (0.0, 0.0)
    assert no_gt["segmentation_quality"] == 0.0 and no_gt["empty_gt"] is True
    assert np.isnan(no_gt["ap"]) and np.isnan(no_gt["mean_matched_iou"])

    no_pred = instance_scores(empty, obj)
    # a model that finds nothing where there is something is not precise
    assert (no_pred["fn"], no_pred["precision"], no_pred["recall"], no_pred["f1"]) == (1, 0.0, 0.0, 0.0)
    assert (no_pred["ap"], no_pred["ap50"], no_pred["ap75"], no_pred["empty_gt"]) == (0.0, 0.0, 0.0, False)


def test_per_class_matches_only_within_a_class() -> None:
    gt_classes = {2: 1, 9: 2}
    pred_classes = {3: 1, 7: 1, 42: 2}  # p7 fits B but says class 1
    reports = instance_scores_per_class(PRED, GT, pred_classes=pred_classes, gt_classes=gt_classes, scores=SCORES)
    assert sorted(reports) == [1, 2]
    assert (reports[1]["tp"], reports[1]["fp"], reports[1]["fn"]) == (1, 1, 0)
    assert (reports[2]["tp"], reports[2]["fp"], reports[2]["fn"]) == (0, 1, 1)
    assert reports[1]["panoptic_quality"] == pytest.approx((4 / 6) / (1 + 0.5), abs=1e-12)
    assert reports[2]["panoptic_quality"] == 0.0 and reports[2]["ap"] == 0.0
    # No gt_classes: every ground-truth object is class 1, so class 1 alone equals the class-blind scores.
    single = instance_scores_per_class(PRED, GT, pred_classes=dict.fromkeys(SCORES, 1), scores=SCORES)
    assert list(single) == [1]
    assert single[1] == instance_scores(PRED, GT, scores=SCORES)


@pytest.mark.parametrize(("call", "match"), [
    (lambda: instance_iou(PRED, GT[:, :8]), "same size"),
    (lambda: instance_iou(PRED.astype(np.float32), GT), "integers"),
    (lambda: instance_iou(PRED.astype(np.int32) - 1, GT), "negative"),
    (lambda: instance_iou(PRED, GT.astype(np.uint64) + np.uint64(2**63)), "relabel"),
    (lambda: instance_scores(PRED, GT, scores={3: 0.5}), r"lack prediction ids \[7, 42\]"),
    (lambda: instance_scores(PRED, GT, iou_threshold=0.0), "threshold"),
    (lambda: instance_scores(PRED, GT, max_detections=0), "max_detections"),
    (lambda: instance_scores(PRED, GT, scores={3: np.nan, 7: 1, 42: 1}), "finite"),
    (lambda: instance_scores_per_class(PRED, GT, pred_classes={3: 1}), "pred_classes lacks"),
    (lambda: match_instances(np.zeros(3)), r"\(P, G\)"),
])
def test_invalid_input_raises_config_error(call, match) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        call()
    assert isinstance(info.value, ValueError)


def test_caller_mappings_are_not_modified() -> None:
    scores, classes = dict(SCORES), dict.fromkeys(SCORES, 1)
    instance_scores_per_class(PRED, GT, pred_classes=classes, scores=scores)
    assert scores == SCORES and classes == dict.fromkeys(SCORES, 1)


@settings(max_examples=60, deadline=None)
@given(labels_2d, labels_2d)
def test_iou_equals_a_loop_over_masks(a, b) -> None:
    b = np.resize(b, a.shape)
    iou, pred_ids, gt_ids = instance_iou(a, b)
    assert pred_ids.tolist() == sorted(set(np.unique(a).tolist()) - {0})
    assert gt_ids.tolist() == sorted(set(np.unique(b).tolist()) - {0})
    for i, p in enumerate(pred_ids):
        for j, g in enumerate(gt_ids):
            inter = np.sum((a == p) & (b == g))
            assert iou[i, j] == inter / np.sum((a == p) | (b == g))


@settings(max_examples=60, deadline=None)
@given(labels_2d)
def test_perfect_prediction_scores_one(gt) -> None:
    pred = np.where(gt > 0, gt.astype(np.uint16) * 7 + 3, 0)  # same objects, unrelated ids
    r = instance_scores(pred, gt)
    assert r["f1"] == 1.0 and r["fp"] == r["fn"] == 0
    assert r["panoptic_quality"] == pytest.approx(1.0, abs=1e-12)
    if r["n_gt"]:
        assert r["ap"] == pytest.approx(1.0, abs=1e-12) and r["mean_matched_iou"] == 1.0
    else:
        assert np.isnan(r["ap"])


@settings(max_examples=80, deadline=None)
@given(labels_2d, labels_2d, st.floats(0.05, 1.0))
def test_swapping_prediction_and_truth_is_symmetric_and_bounded(a, b, threshold) -> None:
    b = np.resize(b, a.shape)
    ab = instance_scores(a, b, iou_threshold=threshold)
    ba = instance_scores(b, a, iou_threshold=threshold)
    assert ab["tp"] == ba["tp"] and ab["f1"] == ba["f1"]
    assert (ab["precision"], ab["recall"]) == (ba["recall"], ba["precision"])
    assert ab["panoptic_quality"] == pytest.approx(ba["panoptic_quality"], abs=1e-12)
    assert ab["tp"] + ab["fp"] == ab["n_pred"] and ab["tp"] + ab["fn"] == ab["n_gt"]
    for key in ("precision", "recall", "f1", "mean_matched_iou", "panoptic_quality",
                "segmentation_quality", "recognition_quality", "ap", "ap50", "ap75"):
        assert np.isnan(ab[key]) or 0.0 <= ab[key] <= 1.0, key


@settings(max_examples=80, deadline=None)
@given(hnp.arrays(np.float64, st.tuples(st.integers(0, 4), st.integers(0, 4)),
                  elements=st.sampled_from([0.0, 0.2, 0.3, 0.45, 0.5, 0.6, 0.9]), fill=st.nothing()),
       st.sampled_from([0.2, 0.3, 0.5, 0.6]))
def test_matching_is_a_largest_then_best_one_to_one_assignment(iou, threshold) -> None:
    pred_idx, gt_idx, matched = match_instances(iou, threshold=threshold)
    assert len(set(pred_idx.tolist())) == len(pred_idx) and len(set(gt_idx.tolist())) == len(gt_idx)
    assert np.all(matched >= threshold) and np.array_equal(matched, iou[pred_idx, gt_idx])
    n = max(iou.shape)
    padded = np.zeros((n, n))
    padded[: iou.shape[0], : iou.shape[1]] = iou
    best = (0, 0.0)
    for perm in itertools.permutations(range(n)):
        vals = [padded[i, j] for i, j in enumerate(perm) if padded[i, j] >= threshold]
        best = max(best, (len(vals), sum(vals)))
    assert len(matched) == best[0]
    assert matched.sum() == pytest.approx(best[1], abs=1e-9)


# --- agreement with pycocotools COCOeval --------------------------------------------------------

def _disc_scene(seed: int, *, size: int, n_objects: int, radius: tuple[float, float]):
    """Ground truth of random discs; predictions shifted, dilated or eroded copies (a later one
    hides an earlier one), some objects missed, a few false positives; ids with gaps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    gt = np.zeros((size, size), dtype=np.uint16)
    pred = np.zeros_like(gt)

    def disc() -> np.ndarray:
        cy, cx = rng.uniform(0, size, 2)
        r = rng.uniform(*radius)
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r

    for k in range(n_objects):
        gt[disc()] = 2 * k + 1
    pid = 0
    for gid in np.unique(gt)[1:]:
        if rng.random() < 0.15:
            continue
        mask = gt == gid
        op = rng.integers(4)
        if op == 0:
            mask = np.roll(mask, tuple(rng.integers(-3, 4, 2)), axis=(0, 1))
        elif op == 1:
            mask = ndimage.binary_dilation(mask, iterations=int(rng.integers(1, 3)))
        elif op == 2:
            mask = ndimage.binary_erosion(mask)
        pid += int(rng.integers(1, 4))
        pred[mask] = pid
    for _ in range(int(rng.integers(0, 4))):
        pid += 1
        pred[disc()] = pid
    ids = np.unique(pred)[1:]
    raw = rng.uniform(size=ids.size)
    scores = np.round(raw, 1) if seed % 2 else raw  # odd seeds: many equal scores
    return pred, gt, {int(i): float(s) for i, s in zip(ids, scores)}


def _cocoeval_ap(pred, gt, scores, *, max_detections: int) -> np.ndarray:
    """``(T,)`` AP from COCOeval for one image and one category, area range "all"."""
    mask_util = pytest.importorskip("pycocotools.mask")
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    def rle(mask: np.ndarray) -> dict:
        return mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))

    anns = []
    for k, gid in enumerate(np.unique(gt)[1:], start=1):
        seg = rle(gt == gid)
        anns.append({"id": k, "image_id": 1, "category_id": 1, "segmentation": seg, "iscrowd": 0,
                     "area": float(mask_util.area(seg)), "bbox": mask_util.toBbox(seg).tolist()})
    dets = [{"image_id": 1, "category_id": 1, "segmentation": rle(pred == pid), "score": scores[int(pid)]}
            for pid in np.unique(pred)[1:]]
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        coco_gt.dataset = {"images": [{"id": 1, "height": gt.shape[0], "width": gt.shape[1]}],
                           "annotations": anns, "categories": [{"id": 1, "name": "object"}]}
        coco_gt.createIndex()
        ev = COCOeval(coco_gt, coco_gt.loadRes(dets), iouType="segm")
        ev.params.imgIds, ev.params.catIds, ev.params.maxDets = [1], [1], [max_detections]
        ev.evaluate()
        ev.accumulate()
    area_all = ev.params.areaRngLbl.index("all")
    precision = ev.eval["precision"][:, :, 0, area_all, -1]  # (T, R)
    assert np.all(precision > -1)
    return precision.mean(axis=1)


@pytest.mark.parametrize(("seed", "size", "n_objects", "radius", "max_detections"), [
    *[(seed, 96, 14, (3.0, 10.0), 100_000) for seed in range(8)],
    (8, 160, 140, (2.0, 6.0), 100_000),  # more than COCO's default 100 detections
    (9, 96, 14, (3.0, 10.0), 5),  # truncated ranking
])
def test_ap_equals_pycocotools(seed, size, n_objects, radius, max_detections) -> None:
    pred, gt, scores = _disc_scene(seed, size=size, n_objects=n_objects, radius=radius)
    expected = _cocoeval_ap(pred, gt, scores, max_detections=max_detections)
    iou, pred_ids, _ = instance_iou(pred, gt)
    ap = coco_average_precision(iou, np.array([scores[int(i)] for i in pred_ids]), max_detections=max_detections)
    np.testing.assert_allclose(ap, expected, rtol=0, atol=1e-3)
    r = instance_scores(pred, gt, scores=scores, max_detections=max_detections)
    assert r["ap"] == pytest.approx(expected.mean(), abs=1e-3)
    assert r["ap50"] == pytest.approx(expected[0], abs=1e-3)
    assert r["ap75"] == pytest.approx(expected[np.isclose(COCO_IOU_THRESHOLDS, 0.75)][0], abs=1e-3)
    assert 0.0 < expected.mean() < 1.0  # the scene is neither trivial nor hopeless
