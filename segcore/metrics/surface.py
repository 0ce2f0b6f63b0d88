"""Per-volume, per-class metrics in physical units: Dice, IoU, HD95 and ASSD of label maps.

Inputs are label maps of any dimension (``(H, W)`` images, ``(D, H, W)`` volumes) and their
``spacing``: the physical size of one voxel along each array axis, in the order of the axes (for
example millimetres, ``(2.5, 0.7, 0.9)`` for ``(D, H, W)``); one number means isotropic voxels.
Distances come back in the unit of ``spacing``. The conventions are MONAI's (``monai==1.6.1``,
``compute_hausdorff_distance(..., percentile=95)`` and ``compute_average_surface_distance(...,
symmetric=True)``), against which the tests check these functions:

- **Surface** of a boolean mask: its voxels with at least one face-connected neighbour (2 per
  axis) outside the mask; the array edge counts as outside, so a mask touching the edge has
  surface there (``mask & ~binary_erosion(mask)``, cross-shaped structure, border value 0).
- **Surface distances**: from the centre of each surface voxel of one mask to the centre of the
  nearest surface voxel of the other, Euclidean with the spacing (exact nearest neighbours of a
  k-d tree over the surface voxels' physical coordinates, ``scipy.spatial.cKDTree``), in both
  directions.
- **HD95**: the larger of the two directed 95th percentiles,
  ``max(q95(pred -> gt), q95(gt -> pred))``, each percentile with linear interpolation between
  order statistics (``numpy.percentile``'s default, as ``torch.quantile``). It is not the 95th
  percentile of the pooled distances.
- **ASSD**: the mean of the pooled distances of both directions,
  ``(sum(pred -> gt) + sum(gt -> pred)) / (n_pred_surface + n_gt_surface)``.

Surfaces are found on the bounding box of the union of both masks plus a one-voxel margin, not on
the whole volume; this changes no value (every surface voxel lies in the box, and the array edge
is outside in both cases). Memory follows the surfaces (a few coordinates per surface voxel), not
the volume, so a 400 x 512 x 512 volume is scored in well under a gigabyte.

Empty policies of :func:`volume_metrics` (one row per class):

- Dice is :func:`segcore.metrics.dice.dice_from_counts`'s: a class absent from both the prediction
  and the ground truth scores 1.0, a class absent from the ground truth only scores 0.0, and
  ``empty_gt`` marks both. IoU = TP / (TP + FP + FN) follows the same rule (1.0 when both are
  empty), so IoU = Dice / (2 - Dice) on every row.
- HD95 and ASSD are NaN when either mask is empty, and ``surface_status`` says why:
  ``"empty_gt"``, ``"empty_pred"`` or ``"both_empty"``; ``"ok"`` when both have voxels;
  ``"skipped"`` for the background class (0) unless ``include_background=True`` (MONAI's default
  also leaves it out: its surface is mostly the array edge, and it costs a whole-volume transform).
  MONAI itself returns inf (one mask empty) or NaN (both empty) there.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from segcore.errors import ConfigError
from segcore.metrics.dice import confusion_counts, dice_from_counts

log = logging.getLogger(__name__)

#: Values of ``surface_status`` in :func:`volume_metrics`.
SURFACE_STATUSES: tuple[str, ...] = ("ok", "empty_gt", "empty_pred", "both_empty", "skipped")
#: Voxels per call of :func:`segcore.metrics.dice.confusion_counts` (bounds its int64 temporaries).
_COUNT_CHUNK = 1 << 22


def _as_spacing(spacing: float | Sequence[float] | np.ndarray, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        raise ConfigError(f"spacing is required: pass the voxel size along each of the {ndim} axes, "
                          f"for example spacing={(1.0,) * ndim} for distances in voxels")
    try:
        values = np.atleast_1d(np.asarray(spacing, dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"spacing {spacing!r} is not a number or a sequence of numbers") from exc
    if values.ndim != 1 or values.size not in (1, ndim):
        raise ConfigError(f"spacing {spacing!r} does not fit {ndim}-D arrays: pass one number "
                          f"(isotropic) or {ndim} numbers, one per array axis")
    if not np.all(np.isfinite(values) & (values > 0)):
        raise ConfigError(f"spacing {spacing!r} must be finite and positive along every axis")
    return tuple(float(v) for v in np.broadcast_to(values, (ndim,)))


def _as_masks(pred_mask: np.ndarray, gt_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pred_mask, gt_mask = np.asarray(pred_mask, dtype=bool), np.asarray(gt_mask, dtype=bool)
    if pred_mask.shape != gt_mask.shape:
        raise ConfigError(f"prediction mask has shape {pred_mask.shape} but ground truth has {gt_mask.shape}; "
                          "pass two masks of the same size")
    if pred_mask.ndim == 0:
        raise ConfigError("masks are scalars; pass arrays with at least one axis")
    return pred_mask, gt_mask


def _union_box(a: np.ndarray, b: np.ndarray) -> tuple[slice, ...] | None:
    """Bounding box of ``a | b`` plus one voxel on every side (clipped to the array), or None."""
    box = []
    for axis in range(a.ndim):  # projections of each mask: no union array as large as the volume
        others = tuple(i for i in range(a.ndim) if i != axis)
        hit = np.flatnonzero((a.any(axis=others) | b.any(axis=others)) if others else (a | b))
        if not hit.size:
            return None
        box.append(slice(max(int(hit[0]) - 1, 0), min(int(hit[-1]) + 2, a.shape[axis])))
    return tuple(box)


def surface_mask(mask: np.ndarray) -> np.ndarray:
    """The surface voxels of a mask (see the module docstring): same-shape bool array.

    Args:
        mask: boolean mask of any dimension (non-zero values count as inside).
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim == 0:
        raise ConfigError("mask is a scalar; pass an array with at least one axis")
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    return mask & ~ndimage.binary_erosion(mask, structure=structure, border_value=0)


def _directed(from_surface: np.ndarray, to_surface: np.ndarray, spacing: tuple[float, ...]) -> np.ndarray:
    """Distance from each voxel of ``from_surface`` (C order) to the nearest voxel of ``to_surface``:
    a k-d tree over the surface voxels' physical coordinates, so memory follows the surfaces, not
    the box (a distance transform of a 400 x 512 x 512 box alone takes gigabytes)."""
    if not to_surface.any():
        return np.full(int(from_surface.sum()), np.inf)
    if not from_surface.any():
        return np.zeros(0)
    scale = np.asarray(spacing, dtype=np.float64)
    to_points, from_points = np.argwhere(to_surface), np.argwhere(from_surface)
    origin = np.minimum(to_points.min(axis=0), from_points.min(axis=0))  # the same values wherever the box lies
    tree = cKDTree((to_points - origin) * scale)
    return tree.query((from_points - origin) * scale)[0]


def _distances_in_box(pred_mask: np.ndarray, gt_mask: np.ndarray, spacing: tuple[float, ...],
                      ) -> tuple[np.ndarray, np.ndarray]:
    box = _union_box(pred_mask, gt_mask)
    if box is None:
        return np.zeros(0), np.zeros(0)
    pred_surface, gt_surface = surface_mask(pred_mask[box]), surface_mask(gt_mask[box])
    return _directed(pred_surface, gt_surface, spacing), _directed(gt_surface, pred_surface, spacing)


def surface_distances(pred_mask: np.ndarray, gt_mask: np.ndarray, *,
                      spacing: float | Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Distances between the surfaces of two masks, both directions, in the unit of ``spacing``.

    Args:
        pred_mask: predicted boolean mask, any dimension (non-zero values count as inside).
        gt_mask: ground-truth boolean mask, same shape.
        spacing: voxel size along each array axis (one number: isotropic), e.g. millimetres.

    Returns:
        ``(pred_to_gt, gt_to_pred)``, 1-D float64: for each surface voxel of the prediction (in
        C order of position), the distance to the nearest ground-truth surface voxel, and the
        reverse. A direction towards an empty mask gives ``inf`` for every voxel; an empty mask
        has no surface voxels (a length-0 array).
    """
    pred_mask, gt_mask = _as_masks(pred_mask, gt_mask)
    return _distances_in_box(pred_mask, gt_mask, _as_spacing(spacing, pred_mask.ndim))


def _scores(pred_to_gt: np.ndarray, gt_to_pred: np.ndarray, *, pred_empty: bool,
            gt_empty: bool) -> tuple[float, float, str]:
    """``(hd95, assd, surface_status)`` of both directions' distances."""
    if pred_empty or gt_empty:
        status = "both_empty" if pred_empty and gt_empty else ("empty_gt" if gt_empty else "empty_pred")
        return float("nan"), float("nan"), status
    hd = max(float(np.percentile(pred_to_gt, 95.0)), float(np.percentile(gt_to_pred, 95.0)))
    mean = (float(pred_to_gt.sum()) + float(gt_to_pred.sum())) / (pred_to_gt.size + gt_to_pred.size)
    return hd, mean, "ok"


def hd95(pred_mask: np.ndarray, gt_mask: np.ndarray, *, spacing: float | Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance of two masks (module docstring), in the unit of
    ``spacing``; NaN when either mask is empty. Arguments as :func:`surface_distances`."""
    pred_mask, gt_mask = _as_masks(pred_mask, gt_mask)
    pg, gp = surface_distances(pred_mask, gt_mask, spacing=spacing)
    return _scores(pg, gp, pred_empty=not pred_mask.any(), gt_empty=not gt_mask.any())[0]


def assd(pred_mask: np.ndarray, gt_mask: np.ndarray, *, spacing: float | Sequence[float]) -> float:
    """Average symmetric surface distance of two masks (module docstring), in the unit of
    ``spacing``; NaN when either mask is empty. Arguments as :func:`surface_distances`."""
    pred_mask, gt_mask = _as_masks(pred_mask, gt_mask)
    pg, gp = surface_distances(pred_mask, gt_mask, spacing=spacing)
    return _scores(pg, gp, pred_empty=not pred_mask.any(), gt_empty=not gt_mask.any())[1]


def _check_labels(pred: np.ndarray, gt: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray, int]:
    pred, gt = np.asarray(pred), np.asarray(gt)
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
        raise ConfigError(f"num_classes must be a positive integer (background included), got {num_classes!r}")
    if pred.shape != gt.shape:
        raise ConfigError(f"prediction has shape {pred.shape} but ground truth has {gt.shape}; "
                          "pass two label maps of the same size")
    if pred.ndim == 0:
        raise ConfigError("label maps are scalars; pass (H, W) or (D, H, W) arrays")
    c = int(num_classes)
    for name, arr in (("prediction", pred), ("ground truth", gt)):
        if arr.dtype.kind not in "biu":
            raise ConfigError(f"{name} has dtype {arr.dtype}; class labels must be integers "
                              "(cast with .astype(np.int64) after checking the values are whole numbers)")
        if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= c):
            raise ConfigError(f"{name} has labels outside [0, {c}) (min {int(arr.min())}, max {int(arr.max())}); "
                              "check num_classes or the label map")
    return pred, gt, c


def volume_counts(pred: np.ndarray, gt: np.ndarray, *, num_classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-class TP, FP and FN voxel counts of one label map of any dimension.

    Args:
        pred: predicted integer class labels in ``[0, num_classes)``, any shape.
        gt: ground-truth integer class labels, same shape.
        num_classes: number of classes, background (class 0) included.

    Returns:
        ``(tp, fp, fn)``, each ``(num_classes,)`` int64 (through
        :func:`segcore.metrics.dice.confusion_counts`, in flat chunks of bounded memory).
    """
    pred, gt, c = _check_labels(pred, gt, num_classes)
    return _counts(pred, gt, c)


def _counts(pred: np.ndarray, gt: np.ndarray, c: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    flat_pred, flat_gt = pred.reshape(-1), gt.reshape(-1)
    totals = np.zeros((3, c), dtype=np.int64)
    for start in range(0, flat_pred.size, _COUNT_CHUNK):
        part = slice(start, start + _COUNT_CHUNK)
        counts = confusion_counts(flat_pred[part].reshape(1, 1, -1), flat_gt[part].reshape(1, 1, -1), c)
        totals += np.stack([k[0] for k in counts])
    return totals[0], totals[1], totals[2]


def volume_metrics(pred: np.ndarray, gt: np.ndarray, *, num_classes: int, spacing: float | Sequence[float],
                   include_background: bool = False) -> dict[str, np.ndarray]:
    """Per-class metrics of one label map (a volume or an image) against its ground truth.

    Args:
        pred: predicted integer class labels in ``[0, num_classes)``, ``(D, H, W)`` or ``(H, W)``
            (any dimension).
        gt: ground-truth integer class labels, same shape.
        num_classes: number of classes, background (class 0) included.
        spacing: voxel size along each array axis (one number: isotropic), e.g. millimetres.
        include_background: also compute HD95/ASSD for class 0 (else its ``surface_status`` is
            ``"skipped"``; its counts, Dice and IoU are always given).

    Returns:
        Columns of one row per class, each a ``(num_classes,)`` array: ``class_id`` int64;
        ``tp``, ``fp``, ``fn`` int64 voxel counts; ``dice``, ``iou`` float64; ``empty_gt``,
        ``empty_pred`` bool; ``hd95``, ``assd`` float64 in the unit of ``spacing`` (NaN unless
        ``surface_status == "ok"``); ``surface_status`` str (:data:`SURFACE_STATUSES`). The
        empty policies are the module docstring's.
    """
    pred, gt, c = _check_labels(pred, gt, num_classes)
    sampling = _as_spacing(spacing, pred.ndim)
    tp, fp, fn = _counts(pred, gt, c)
    dice, empty_gt = dice_from_counts(tp, fp, fn)
    union = tp + fp + fn
    iou = np.where(union > 0, tp / np.maximum(union, 1), 1.0).astype(np.float64)
    empty_pred = (tp + fp) == 0
    hd = np.full(c, np.nan)
    mean = np.full(c, np.nan)
    status = ["skipped"] * c
    for k in range(0 if include_background else 1, c):
        if empty_pred[k] or empty_gt[k]:
            pg = gp = np.zeros(0)
        else:
            pg, gp = _distances_in_box(pred == k, gt == k, sampling)
        hd[k], mean[k], status[k] = _scores(pg, gp, pred_empty=bool(empty_pred[k]), gt_empty=bool(empty_gt[k]))
        log.debug("class %d: %s, %d + %d surface voxels", k, status[k], pg.size, gp.size)
    return {"class_id": np.arange(c, dtype=np.int64), "tp": tp, "fp": fp, "fn": fn, "dice": dice, "iou": iou,
            "empty_gt": empty_gt, "empty_pred": empty_pred, "hd95": hd, "assd": mean,
            "surface_status": np.asarray(status, dtype=str)}
