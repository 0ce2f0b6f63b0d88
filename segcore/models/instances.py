"""Instance predictions as label images: bounded mask pasting, training targets, the prediction adapter.

Mask R-CNN predicts, per detection, a box and a ``28 x 28`` mask probability map over it (ROI
form). torchvision pastes every detection full-size (``(K, 1, H, W)`` float32: 1.6 GB for 100
detections on a 2048 x 2048 image). Here each detection is pasted only into its own box window
(the box torchvision would paste into, clipped to the image) with torchvision's own
``expand_masks``, ``expand_boxes`` and ``paste_mask_in_image``, so the pixels are identical to
torchvision's full paste, and folded straight into one ``(H, W) uint32`` label image. Peak extra
memory is one box window of float32 plus the label and class images, whatever ``K`` is.

The ROI masks come from :meth:`segcore.models.maskrcnn.InstanceSegmenter.detect`, whose input
transform leaves masks unpasted (see :mod:`segcore.models.maskrcnn`).

Conventions: boxes are ``(x0, y0, x1, y1)`` with ``x1``/``y1`` exclusive in records and targets
(``labels[y0:y1, x0:x1]`` holds the whole instance); a pixel is foreground when its probability
is ``> mask_threshold``; where instances overlap the higher score wins (ties: earlier detection),
and with an ``overlap_threshold`` a detection mostly covered by higher-scoring ones is dropped.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor

from segcore.errors import ConfigError
from segcore.models.failures import forward_errors

if TYPE_CHECKING:
    from segcore.models.maskrcnn import InstanceSegmenter

log = logging.getLogger(__name__)

_MASK_PADDING = 1  # torchvision's paste_masks_in_image default


@dataclass(frozen=True)
class InstancePrediction:
    """Instances of one image.

    - ``labels``: ``(H, W) uint32`` instance ids, 0 = background, ids ``1..n`` consecutive and
      assigned in descending score order;
    - ``classes``: ``(H, W) uint8`` class of the instance owning each pixel (0 = background);
    - ``records``: one dict per instance, in id order: ``instance_id`` (int), ``class_id`` (int),
      ``score`` (float), ``bbox`` (``(x0, y0, x1, y1)`` ints, tight, ``x1``/``y1`` exclusive),
      ``area`` (int, pixels owned).
    """

    labels: np.ndarray
    classes: np.ndarray
    records: list[dict[str, Any]]


def _as_tensor(value: Any, *, dtype: torch.dtype) -> Tensor:
    t = value if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value))
    return t.detach().to(device="cpu", dtype=dtype)


def _paste_window(mask: Tensor, box: Tensor, height: int, width: int
                  ) -> tuple[tuple[int, int, int, int], Tensor] | None:
    """Paste one padded ROI mask ``(M+2, M+2)`` at its expanded int64 box, only over the box's
    window in the image. Returns ``((y0, y1, x0, x1), (y1-y0, x1-x0) float32)`` or ``None`` when
    the box lies outside the image. Equals ``paste_mask_in_image(mask, box, height, width)[y0:y1, x0:x1]``
    (zero outside the window)."""
    bx0, by0, bx1, by1 = (int(v) for v in box)
    x0, y0 = max(bx0, 0), max(by0, 0)
    x1, y1 = min(bx1 + 1, width), min(by1 + 1, height)
    if x1 <= x0 or y1 <= y0:
        return None
    from torchvision.models.detection.roi_heads import paste_mask_in_image  # torchvision only once it is needed

    shifted = box - torch.tensor([x0, y0, x0, y0], dtype=box.dtype)
    return (y0, y1, x0, x1), paste_mask_in_image(mask, shifted, y1 - y0, x1 - x0)


def instances_to_labels(*, boxes: Any, scores: Any, labels: Any, masks: Any, image_size: tuple[int, int],
                        mask_threshold: float = 0.5, mask_form: Literal["roi", "image"] = "roi",
                        overlap_threshold: float | None = None) -> InstancePrediction:
    """Fold ``K`` detections into one instance label image, pasting one detection at a time.

    Args (tensors or arrays, any device; keyword names match torchvision's output dict):
        boxes: ``(K, 4)`` float, ``(x0, y0, x1, y1)`` in image pixels.
        scores: ``(K,)`` float.
        labels: ``(K,)`` int class ids in ``1..255``.
        masks: ``(K, 1, M, M)`` float probabilities over each box (``mask_form="roi"``, what
            :meth:`InstanceSegmenter.detect` returns) or ``(K, 1, H, W)`` already pasted
            (``mask_form="image"``, torchvision's eval output).
        image_size: ``(H, W)`` of the output.
        mask_threshold: a pixel is foreground where its probability is ``> mask_threshold``.
        overlap_threshold: ``None`` keeps whatever is left of every detection (torchvision's
            behaviour). A share in ``(0, 1]`` drops a detection when higher-scoring detections
            already kept hold more than that share of its own mask (a part or duplicate of an
            object already found, the rule of panoptic merging); its pixels stay with their
            owners or the background.

    Returns an :class:`InstancePrediction`. Higher scores win overlaps; detections left with no
    pixel are dropped and the remaining ids stay consecutive.
    """
    height, width = (int(v) for v in image_size)
    if height < 1 or width < 1:
        raise ConfigError(f"image_size must be positive (H, W), got {image_size}")
    if mask_form not in ("roi", "image"):
        raise ConfigError(f"mask_form must be 'roi' or 'image', got {mask_form!r}")
    check_overlap_threshold(overlap_threshold)
    boxes_t = _as_tensor(boxes, dtype=torch.float32)
    scores_np = _as_tensor(scores, dtype=torch.float32).numpy()
    classes_np = _as_tensor(labels, dtype=torch.int64).numpy()
    masks_t = _as_tensor(masks, dtype=torch.float32)
    k = boxes_t.shape[0]
    if boxes_t.shape != (k, 4) or scores_np.shape != (k,) or classes_np.shape != (k,) or masks_t.ndim != 4 \
            or masks_t.shape[:2] != (k, 1):
        raise ConfigError(f"expected boxes (K, 4), scores (K,), labels (K,), masks (K, 1, h, w); got "
                          f"{tuple(boxes_t.shape)}, {scores_np.shape}, {classes_np.shape}, {tuple(masks_t.shape)}")
    if mask_form == "image" and masks_t.shape[2:] != (height, width):
        raise ConfigError(f"image-form masks must be (K, 1, {height}, {width}), got {tuple(masks_t.shape)}")
    if k and (classes_np.min() < 1 or classes_np.max() > 255):
        raise ConfigError(f"class ids must lie in 1..255 (0 is background), got {sorted(set(classes_np.tolist()))}")

    label_img = np.zeros((height, width), dtype=np.uint32)
    order = np.argsort(-scores_np, kind="stable")
    if mask_form == "roi" and k:
        from torchvision.models.detection.roi_heads import expand_boxes, expand_masks

        padded, scale = expand_masks(masks_t, padding=_MASK_PADDING)
        int_boxes = expand_boxes(boxes_t, scale).to(dtype=torch.int64)
    windows: list[tuple[int, int, int, int] | None] = []
    for rank, i in enumerate(order.tolist()):
        if mask_form == "roi":
            pasted = _paste_window(padded[i, 0], int_boxes[i], height, width)
            if pasted is None:
                windows.append(None)
                continue
            win, prob = pasted
            fg = prob.numpy() > mask_threshold
        else:
            full = masks_t[i, 0].numpy() > mask_threshold
            rows, cols = np.flatnonzero(full.any(axis=1)), np.flatnonzero(full.any(axis=0))
            if rows.size == 0:
                windows.append(None)
                continue
            win = (int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1)
            fg = full[win[0]:win[1], win[2]:win[3]]
        view = label_img[win[0]:win[1], win[2]:win[3]]
        free = fg & (view == 0)
        if overlap_threshold is not None:
            area = int(np.count_nonzero(fg))
            if area and area - int(np.count_nonzero(free)) > overlap_threshold * area:
                windows.append(None)
                continue
        view[free] = rank + 1
        windows.append(win)
    return _finish(label_img, windows, order, scores_np, classes_np)


def check_overlap_threshold(value: float | None) -> None:
    """Refuse an ``overlap_threshold`` that is neither ``None`` nor a share in ``(0, 1]``."""
    if value is not None and not 0.0 < value <= 1.0:
        raise ConfigError(f"overlap_threshold is a share of a detection's mask in (0, 1] (or None: never drop), "
                          f"got {value}")


def _finish(label_img: np.ndarray, windows: list[tuple[int, int, int, int] | None], order: np.ndarray,
            scores: np.ndarray, classes: np.ndarray) -> InstancePrediction:
    """Tight boxes and areas per provisional id (``rank + 1``), then consecutive ids."""
    remap = np.zeros(len(windows) + 1, dtype=np.uint32)
    class_of = np.zeros(len(windows) + 1, dtype=np.uint8)
    records: list[dict[str, Any]] = []
    for rank, win in enumerate(windows):
        if win is None:
            continue
        y0, _, x0, _ = win
        ys, xs = np.nonzero(label_img[win[0]:win[1], win[2]:win[3]] == rank + 1)
        if ys.size == 0:
            continue
        new_id = len(records) + 1
        remap[rank + 1] = new_id
        det = int(order[rank])
        class_of[new_id] = classes[det]
        records.append({
            "instance_id": new_id,
            "class_id": int(classes[det]),
            "score": float(scores[det]),
            "bbox": (x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1),
            "area": int(ys.size),
        })
    if len(records) < len(windows):  # some were dropped: make ids consecutive
        label_img = remap[label_img]
    return InstancePrediction(labels=label_img, classes=class_of[label_img], records=records)


def targets_from_instance_labels(labels: Any, classes: Mapping[int, int] | None = None) -> dict[str, Tensor]:
    """A Mask R-CNN training target from an ``(H, W)`` integer instance label image (0 = background).

    Instances are the nonzero ids in ascending order (gaps allowed). ``classes`` maps instance id
    -> class id (``>= 1``); ``None`` makes every instance class 1. Returns ``boxes (K, 4)
    float32`` (tight, ``x1``/``y1`` exclusive, so never degenerate), ``labels (K,) int64`` and
    ``masks (K, H, W) uint8``; an empty image gives ``K = 0`` (boxes of shape ``(0, 4)``).
    """
    arr = np.asarray(labels.detach().cpu() if isinstance(labels, Tensor) else labels)
    if arr.ndim != 2 or arr.dtype.kind not in "iub":
        raise ConfigError(f"expected an (H, W) integer instance label image, got shape {arr.shape} dtype {arr.dtype}")
    if arr.dtype.kind == "i" and arr.size and arr.min() < 0:
        raise ConfigError("instance label images must not hold negative ids")
    ids = [int(v) for v in np.unique(arr) if v != 0]
    if classes is None:
        class_ids = [1] * len(ids)
    else:
        missing = [i for i in ids if i not in classes]
        if missing:
            raise ConfigError(f"classes has no entry for instance id(s) {missing[:10]}; map every id to a class >= 1")
        class_ids = [int(classes[i]) for i in ids]
        if any(c < 1 for c in class_ids):
            raise ConfigError("instance classes must be >= 1 (0 is the background)")
    height, width = arr.shape
    masks = np.zeros((len(ids), height, width), dtype=np.uint8)
    boxes = np.zeros((len(ids), 4), dtype=np.float32)
    for j, inst in enumerate(ids):
        m = arr == inst
        masks[j] = m
        rows, cols = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
        boxes[j] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return {"boxes": torch.from_numpy(boxes), "labels": torch.tensor(class_ids, dtype=torch.int64),
            "masks": torch.from_numpy(masks)}


def predict_instances(model: InstanceSegmenter, x: Tensor, *, score_threshold: float | None = None,
                      mask_threshold: float | None = None) -> list[InstancePrediction]:
    """Run an eval-mode :class:`InstanceSegmenter` on a normalised ``(N, C, H, W)`` float batch
    under ``torch.inference_mode`` and return one :class:`InstancePrediction` per image.

    ``score_threshold`` (keep ``score > t``) and ``mask_threshold`` default to the model's own;
    the model's ``overlap_threshold`` applies (see :func:`instances_to_labels`).
    A score threshold below the model's cannot bring back detections the model already dropped
    and is refused. Masks are pasted one box at a time (see the module docstring).
    """
    if model.training:
        raise ConfigError("predict_instances needs an eval-mode model; call model.eval() first")
    floor = model.score_threshold
    score_t = floor if score_threshold is None else float(score_threshold)
    if score_t < floor:
        raise ConfigError(f"score_threshold {score_t} is below the model's {floor}; rebuild the model with "
                          f"score_threshold <= {score_t} (arch_kwargs) to see lower-scoring detections")
    mask_t = model.mask_threshold if mask_threshold is None else float(mask_threshold)
    with torch.inference_mode(), forward_errors(x.shape):
        detections = model.detect(x)
    height, width = (int(v) for v in x.shape[-2:])
    out = []
    for det in detections:
        keep = det["scores"] > score_t
        out.append(instances_to_labels(boxes=det["boxes"][keep], scores=det["scores"][keep],
                                       labels=det["labels"][keep], masks=det["masks"][keep],
                                       image_size=(height, width), mask_threshold=mask_t,
                                       overlap_threshold=model.overlap_threshold))
    log.debug("predicted %s instances", [len(p.records) for p in out])
    return out


__all__ = ["InstancePrediction", "check_overlap_threshold", "instances_to_labels", "predict_instances",
           "targets_from_instance_labels"]
