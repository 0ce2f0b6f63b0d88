"""Instance-segmentation metrics for one image: object matching, F1, panoptic quality, COCO AP.

Inputs are ``(H, W)`` integer instance-label images (any integer dtype, usually uint16/uint32):
0 is background, every other value is one object. Ids need not be consecutive (``{3, 7, 183}``
is fine) and prediction ids are unrelated to ground-truth ids.

- :func:`instance_iou` -- the ``(P, G)`` IoU matrix of every prediction against every
  ground-truth object, from one pass over the pixels (no loop over pairs).
- :func:`match_instances` -- one-to-one matches with IoU >= a threshold. The assignment maximises
  the number of matches first, then their summed IoU (``scipy.optimize.linear_sum_assignment``),
  so it stays optimal below IoU 0.5 where one object may overlap several others well.
- :func:`coco_average_precision` -- AP per IoU threshold exactly as pycocotools' ``COCOeval``
  computes it for one image, one category, area range "all", no crowd regions and
  ``maxDets = [max_detections]`` (default :data:`DEFAULT_MAX_DETECTIONS` = 100 000, not COCO's 100,
  so that crowded microscopy images are not truncated): detections are taken in descending score
  order (ties keep ascending prediction id: COCO's stable sort of the listing order) and each one
  takes the still-unmatched ground truth of highest IoU >= t (ties go to the later ground truth,
  as in COCO); precision is made monotone and read at the 101 recall points 0.00:0.01:1.00.
- :func:`instance_scores` / :func:`instance_scores_per_class` -- a report dict per image (per class).

Counts and quality figures at one IoU threshold (``iou_threshold``, default 0.5, IoU >= threshold):
TP = matched pairs, FP = unmatched predictions, FN = unmatched ground-truth objects;
precision = TP/(TP+FP), recall = TP/(TP+FN), F1 = 2TP/(2TP+FP+FN);
panoptic quality PQ = (sum of matched IoU) / (TP + FP/2 + FN/2) = SQ x RQ, with segmentation
quality SQ = (sum of matched IoU)/TP and recognition quality RQ = TP/(TP + FP/2 + FN/2) (= F1).

Empty-case policy (``empty_gt`` in the report flags images without ground-truth objects):

- an image with neither predictions nor ground truth scores 1.0 in precision, recall, F1, PQ,
  SQ and RQ (nothing to find, nothing claimed);
- otherwise a ratio with nothing to count is 0.0, as every figure is without a match (TP = 0):
  precision without predictions (a model that finds nothing is not precise), recall without ground
  truth, F1 = PQ = SQ = RQ = 0.0 (SQ = 0 as in the panoptic reference);
- ``mean_matched_iou`` is NaN without a match (a mean of nothing);
- AP, AP50 and AP75 are NaN without ground truth (COCO reports -1 there), and 0.0 with ground
  truth but no predictions.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import numpy as np
from scipy.optimize import linear_sum_assignment

from segcore.errors import ConfigError

log = logging.getLogger(__name__)

#: COCO IoU thresholds 0.50:0.05:0.95, built exactly as pycocotools builds them (T = 10).
COCO_IOU_THRESHOLDS: np.ndarray = np.linspace(0.5, 0.95, int(np.round((0.95 - 0.5) / 0.05)) + 1, endpoint=True)
#: COCO recall points 0.00:0.01:1.00, built exactly as pycocotools builds them (R = 101).
COCO_RECALL_THRESHOLDS: np.ndarray = np.linspace(0.0, 1.00, int(np.round((1.00 - 0.0) / 0.01)) + 1, endpoint=True)
COCO_IOU_THRESHOLDS.setflags(write=False)
COCO_RECALL_THRESHOLDS.setflags(write=False)
#: Detections per image kept by :func:`coco_average_precision` (COCO's ``maxDets``; COCO uses 100).
DEFAULT_MAX_DETECTIONS = 100_000

_AP50_INDEX = int(np.flatnonzero(np.isclose(COCO_IOU_THRESHOLDS, 0.50))[0])
_AP75_INDEX = int(np.flatnonzero(np.isclose(COCO_IOU_THRESHOLDS, 0.75))[0])
# Label values up to this bound (or up to the pixel count) are indexed with a lookup table;
# larger ids fall back to np.unique (a sort, slower but memory-safe for ids such as 2**40).
_DENSE_ID_LIMIT = 1 << 22


def _check_labels(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise ConfigError(f"prediction labels have shape {pred.shape} but ground truth has {gt.shape}; "
                          "pass two label images of the same size")
    for name, arr in (("prediction", pred), ("ground-truth", gt)):
        if arr.dtype.kind not in "biu":
            raise ConfigError(f"{name} labels have dtype {arr.dtype}; instance labels must be integers "
                              "(cast with .astype(np.uint32) after checking the values are whole numbers)")
        if arr.dtype.kind == "i" and arr.size and int(arr.min()) < 0:
            raise ConfigError(f"{name} labels hold negative ids (min {int(arr.min())}); "
                              "use 0 for background and positive ids for objects")
        if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
            raise ConfigError(f"{name} labels hold ids above 2**63 - 1; relabel the objects "
                              "(for example with consecutive ids) before scoring them")
    return pred, gt


def _index_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Object ids ``(K,)`` int64 ascending, flat per-pixel object index ``(N,)`` int64 (-1 for
    background) and object areas ``(K,)`` int64 in pixels."""
    flat = labels.ravel()
    if flat.dtype.kind == "b":
        flat = flat.view(np.uint8)
    max_id = int(flat.max(initial=0))
    if max_id <= max(_DENSE_ID_LIMIT, flat.size):
        if flat.dtype == np.uint64:  # bincount refuses uint64; the ids are small here
            flat = flat.astype(np.int64)
        counts = np.bincount(flat, minlength=1)
        counts[0] = 0
        ids = np.flatnonzero(counts)
        lut = np.full(max_id + 1, -1, dtype=np.int64)
        lut[ids] = np.arange(ids.size, dtype=np.int64)
        return ids.astype(np.int64), lut[flat], counts[ids].astype(np.int64)
    log.debug("labels reach id %d: indexing them with np.unique", max_id)
    ids, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1).astype(np.int64)
    if ids.size and ids[0] == 0:
        ids, counts, inverse = ids[1:], counts[1:], inverse - 1
    return ids.astype(np.int64), inverse, counts.astype(np.int64)


def instance_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairwise IoU of every predicted object with every ground-truth object.

    Args:
        pred: ``(H, W)`` integer instance labels (0 = background); any shape equal to ``gt`` works.
        gt: ``(H, W)`` integer instance labels (0 = background).

    Returns:
        ``(iou, pred_ids, gt_ids)``: ``iou`` is ``(P, G)`` float64 in [0, 1], row ``i`` for object
        ``pred_ids[i]`` and column ``j`` for ``gt_ids[j]``; the ids are ``(P,)`` and ``(G,)`` int64,
        ascending, background excluded.

    All intersections come from one ``bincount`` over the codes ``pred_index * G + gt_index`` of
    the pixels that are foreground in both images (linear in the pixel count).
    """
    pred, gt = _check_labels(pred, gt)
    pred_ids, pred_index, pred_area = _index_labels(pred)
    gt_ids, gt_index, gt_area = _index_labels(gt)
    n_pred, n_gt = pred_ids.size, gt_ids.size
    both = (pred_index >= 0) & (gt_index >= 0)
    codes = pred_index[both] * n_gt + gt_index[both]
    inter = np.bincount(codes, minlength=n_pred * n_gt).reshape(n_pred, n_gt)
    union = pred_area[:, None] + gt_area[None, :] - inter  # >= 1: every object has a pixel
    iou = inter / np.maximum(union, 1)
    return iou.astype(np.float64), pred_ids, gt_ids


def _check_iou(iou: np.ndarray) -> np.ndarray:
    iou = np.asarray(iou, dtype=np.float64)
    if iou.ndim != 2:
        raise ConfigError(f"expected a (P, G) IoU matrix, got shape {iou.shape}; build it with instance_iou")
    return iou


def match_instances(iou: np.ndarray, *, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one matches between predictions (rows) and ground truth (columns) with IoU >= threshold.

    Args:
        iou: ``(P, G)`` float IoU matrix (see :func:`instance_iou`).
        threshold: smallest IoU of a match, in (0, 1].

    Returns:
        ``(pred_index, gt_index, matched_iou)``: ``(M,)`` int64, ``(M,)`` int64 and ``(M,)``
        float64, sorted by ``pred_index``. Where no object has two candidates (always so above
        IoU 0.5) the candidate pairs are the matches; otherwise the assignment maximises the
        number of matches, then their summed IoU.
    """
    iou = _check_iou(iou)
    if not 0.0 < float(threshold) <= 1.0:
        raise ConfigError(f"IoU threshold must lie in (0, 1], got {threshold}")
    empty = np.zeros(0, dtype=np.int64)
    rows, cols = np.nonzero(iou >= threshold)
    if rows.size == 0:
        return empty, empty.copy(), np.zeros(0, dtype=np.float64)
    if np.bincount(rows).max() > 1 or np.bincount(cols).max() > 1:
        sub_rows, sub_cols = np.unique(rows), np.unique(cols)
        sub = iou[np.ix_(sub_rows, sub_cols)]
        eligible = sub >= threshold
        # Every match is worth 1 plus a tie-breaking share of its IoU that sums to less than 1,
        # so a larger matching always wins and, among the largest, the highest summed IoU.
        weight = np.where(eligible, 1.0 + sub / (min(sub.shape) + 1.0), 0.0)
        r, c = linear_sum_assignment(weight, maximize=True)
        keep = eligible[r, c]
        rows, cols = sub_rows[r[keep]], sub_cols[c[keep]]
        order = np.argsort(rows, kind="stable")
        rows, cols = rows[order], cols[order]
    return rows.astype(np.int64), cols.astype(np.int64), iou[rows, cols]


def _coco_greedy_hits(ious: np.ndarray, threshold: float) -> np.ndarray:
    """COCO's matching at one IoU threshold: ``(D,)`` bool, True where detection ``d`` (rows of
    ``ious`` in descending score order) takes a ground-truth object."""
    n_det, n_gt = ious.shape
    hit = np.zeros(n_det, dtype=bool)
    taken = np.zeros(n_gt, dtype=bool)
    rows, cols = np.nonzero(ious >= threshold)  # row-major: columns ascend within a row
    values = ious[rows, cols].tolist()
    rows, cols = rows.tolist(), cols.tolist()
    k = 0
    while k < len(rows):
        det, best, match = rows[k], threshold, -1
        while k < len(rows) and rows[k] == det:
            g = cols[k]
            if not taken[g] and values[k] >= best:  # '>=': ties go to the later GT, as in COCO
                best, match = values[k], g
            k += 1
        if match >= 0:
            taken[match] = True
            hit[det] = True
    return hit


def coco_average_precision(iou: np.ndarray, scores: np.ndarray, *,
                           max_detections: int = DEFAULT_MAX_DETECTIONS) -> np.ndarray:
    """COCO average precision of one image and one category at each IoU threshold.

    Args:
        iou: ``(P, G)`` float IoU matrix, rows in listing order (the tie-break for equal scores).
        scores: ``(P,)`` float detection confidences (higher = more confident).
        max_detections: COCO's ``maxDets``: only this many top-scoring detections are evaluated.

    Returns:
        ``(T,)`` float64 AP at each of :data:`COCO_IOU_THRESHOLDS`; NaN when ``G == 0``. The COCO
        "AP" is their mean, "AP50" entry 0, "AP75" entry 5.
    """
    iou = _check_iou(iou)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if scores.size != iou.shape[0]:
        raise ConfigError(f"got {scores.size} scores for {iou.shape[0]} predictions; give one score per row")
    if not np.all(np.isfinite(scores)):
        raise ConfigError("detection scores must be finite numbers")
    if int(max_detections) < 1:
        raise ConfigError(f"max_detections must be at least 1, got {max_detections}")
    n_gt = iou.shape[1]
    if n_gt == 0:
        return np.full(COCO_IOU_THRESHOLDS.size, np.nan)
    order = np.argsort(-scores, kind="mergesort")[: int(max_detections)]
    ious = iou[order]
    n_det = order.size
    precision = np.zeros((COCO_IOU_THRESHOLDS.size, COCO_RECALL_THRESHOLDS.size))
    if n_det == 0:
        return precision.mean(axis=1)
    for t, thr in enumerate(COCO_IOU_THRESHOLDS):
        hit = _coco_greedy_hits(ious, min(float(thr), 1 - 1e-10))
        tp = np.cumsum(hit).astype(np.float64)
        fp = np.cumsum(~hit).astype(np.float64)
        recall = tp / n_gt
        prec = tp / (fp + tp + np.spacing(1))
        prec = np.maximum.accumulate(prec[::-1])[::-1]  # precision envelope: monotone in recall
        at = np.searchsorted(recall, COCO_RECALL_THRESHOLDS, side="left")
        reached = at < n_det
        precision[t, reached] = prec[at[reached]]
    return precision.mean(axis=1)


def _scores_for(pred_ids: np.ndarray, scores: Mapping[int, float] | None) -> np.ndarray:
    if scores is None:
        return np.ones(pred_ids.size, dtype=np.float64)
    missing = [int(i) for i in pred_ids if int(i) not in scores]
    if missing:
        raise ConfigError(f"scores lack prediction ids {missing[:10]} ({len(missing)} in all); "
                          "give a confidence for every predicted object or pass scores=None")
    return np.array([float(scores[int(i)]) for i in pred_ids], dtype=np.float64)


def _classes_for(ids: np.ndarray, classes: Mapping[int, int], name: str) -> np.ndarray:
    missing = [int(i) for i in ids if int(i) not in classes]
    if missing:
        raise ConfigError(f"{name} lacks object ids {missing[:10]} ({len(missing)} in all); "
                          "give a class for every object in the label image")
    return np.array([int(classes[int(i)]) for i in ids], dtype=np.int64)


def detection_ratios(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Precision, recall and F1 of ``tp`` matched pairs, ``fp`` unmatched predictions and ``fn``
    unmatched ground-truth objects, under the module's empty-case policy: all 1.0 when there is
    nothing at all (0, 0, 0), else a ratio with nothing to count is 0.0."""
    if tp + fp + fn == 0:
        return 1.0, 1.0, 1.0
    return (tp / (tp + fp) if tp + fp else 0.0, tp / (tp + fn) if tp + fn else 0.0,
            2.0 * tp / (2 * tp + fp + fn))


def _scores_from_iou(iou: np.ndarray, det_scores: np.ndarray, *, iou_threshold: float,
                     max_detections: int) -> dict[str, float | int | bool]:
    n_pred, n_gt = iou.shape
    _, _, matched = match_instances(iou, threshold=iou_threshold)
    tp = int(matched.size)
    fp, fn = n_pred - tp, n_gt - tp
    iou_sum = float(matched.sum())
    if n_pred == 0 and n_gt == 0:
        rq = sq = pq = 1.0
    else:
        denom = tp + 0.5 * fp + 0.5 * fn
        rq = tp / denom
        sq = iou_sum / tp if tp else 0.0
        pq = iou_sum / denom
    ap = coco_average_precision(iou, det_scores, max_detections=max_detections)
    precision, recall, _ = detection_ratios(tp, fp, fn)
    return {
        "n_pred": n_pred, "n_gt": n_gt, "tp": tp, "fp": fp, "fn": fn,
        "precision": precision, "recall": recall,
        "f1": rq,
        "mean_matched_iou": iou_sum / tp if tp else float("nan"),
        "panoptic_quality": pq, "segmentation_quality": sq, "recognition_quality": rq,
        "ap": float(ap.mean()) if n_gt else float("nan"),
        "ap50": float(ap[_AP50_INDEX]), "ap75": float(ap[_AP75_INDEX]),
        "empty_gt": n_gt == 0,
    }


def instance_scores(pred_labels: np.ndarray, gt_labels: np.ndarray, *,
                    scores: Mapping[int, float] | None = None, iou_threshold: float = 0.5,
                    max_detections: int = DEFAULT_MAX_DETECTIONS) -> dict[str, float | int | bool]:
    """Object counts, F1, panoptic quality and COCO AP of one predicted label image.

    Args:
        pred_labels: ``(H, W)`` integer predicted instance labels (0 = background).
        gt_labels: ``(H, W)`` integer ground-truth instance labels (0 = background).
        scores: confidence per predicted object id (extra ids are ignored); ``None`` = all 1.0,
            in which case AP ranks detections by id only.
        iou_threshold: smallest IoU of a match for the counts, F1 and PQ (AP uses 0.50:0.95).
        max_detections: COCO ``maxDets`` for AP (see :func:`coco_average_precision`).

    Returns:
        A dict of plain Python values: ``n_pred, n_gt, tp, fp, fn`` (objects, int);
        ``precision, recall, f1, mean_matched_iou, panoptic_quality, segmentation_quality,
        recognition_quality, ap, ap50, ap75`` (float) and ``empty_gt`` (bool). See the module
        docstring for the empty-case policy.
    """
    iou, pred_ids, _ = instance_iou(pred_labels, gt_labels)
    return _scores_from_iou(iou, _scores_for(pred_ids, scores), iou_threshold=iou_threshold,
                            max_detections=max_detections)


def instance_scores_per_class(pred_labels: np.ndarray, gt_labels: np.ndarray, *,
                              pred_classes: Mapping[int, int], gt_classes: Mapping[int, int] | None = None,
                              scores: Mapping[int, float] | None = None, iou_threshold: float = 0.5,
                              max_detections: int = DEFAULT_MAX_DETECTIONS) -> dict[int, dict[str, float | int | bool]]:
    """:func:`instance_scores` per class, matching objects only within their class.

    Args:
        pred_labels: ``(H, W)`` integer predicted instance labels (0 = background).
        gt_labels: ``(H, W)`` integer ground-truth instance labels (0 = background).
        pred_classes: class id of every predicted object id (extra ids are ignored).
        gt_classes: class id of every ground-truth object id; ``None`` = every object is class 1.
        scores, iou_threshold, max_detections: as in :func:`instance_scores`.

    Returns:
        ``{class_id: report}`` for every class present among the predicted or ground-truth objects
        of this image, in ascending class order; classes absent from both are not reported.
    """
    iou, pred_ids, gt_ids = instance_iou(pred_labels, gt_labels)
    pred_cls = _classes_for(pred_ids, pred_classes, "pred_classes")
    gt_cls = (np.ones(gt_ids.size, dtype=np.int64) if gt_classes is None
              else _classes_for(gt_ids, gt_classes, "gt_classes"))
    det_scores = _scores_for(pred_ids, scores)
    reports: dict[int, dict[str, float | int | bool]] = {}
    for cls in sorted(set(pred_cls.tolist()) | set(gt_cls.tolist())):
        rows, cols = pred_cls == cls, gt_cls == cls
        reports[int(cls)] = _scores_from_iou(iou[np.ix_(rows, cols)], det_scores[rows],
                                             iou_threshold=iou_threshold, max_detections=max_detections)
    return reports
