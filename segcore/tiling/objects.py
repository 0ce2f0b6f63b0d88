"""Instance models in tiled images (2-D): keep the objects whose box centre lies in a unit's core,
paste each output chunk from the kept objects of every unit reaching into it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from segcore.tiling.windows import Window


@dataclass
class BlockObjects:
    """The objects one unit keeps: global boxes, box-sized masks, classes, scores, flags."""

    boxes: np.ndarray  # (K, 4) int64 global [y0, x0, y1, x1), half-open
    masks: list[np.ndarray]  # K boolean (y1 - y0, x1 - x0) arrays
    classes: np.ndarray  # (K,) int64
    scores: np.ndarray  # (K,) float32
    cut_risk: np.ndarray  # (K,) bool: touches the window edge inside the image
    duplicates_dropped: int  # detections of this window whose centre lay in another core
    capped: int = 0  # detector windows whose detections reached the model's cap
    on_seams: int = 0  # kept objects reaching beyond the core that kept them (they cross a seam)

    def __len__(self) -> int:
        return len(self.masks)


def keep_core_objects(labels: np.ndarray, records: Sequence[dict], window: Window, core: Window,
                      height: int, width: int) -> BlockObjects:
    """Keep the detections of ``window`` whose box centre lies in ``core``.

    Args:
        labels: ``(h, w)`` instance ids predicted for the window (ids of ``records``).
        records: per instance ``instance_id``, ``class_id``, ``score`` and ``bbox``
            ``[x0, y0, x1, y1]`` in window pixels (as :func:`segcore.models.instances.predict_instances`).
        window: where ``labels`` lies in the image; ``core``: this unit's output chunk.
        height, width: the image size (window edges on the image edge cut nothing).
    """
    boxes, masks, classes, scores, cut = [], [], [], [], []
    dropped = 0
    for r in records:
        bx0, by0, bx1, by1 = (float(v) for v in r["bbox"])
        cy, cx = window.y0 + (by0 + by1) / 2.0, window.x0 + (bx0 + bx1) / 2.0
        if not (core.y0 <= cy < core.y1 and core.x0 <= cx < core.x1):
            dropped += 1
            continue
        ys, xs = np.nonzero(labels == r["instance_id"])
        if ys.size == 0:
            continue
        y0, y1, x0, x1 = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        masks.append(labels[y0:y1, x0:x1] == r["instance_id"])
        gy0, gy1, gx0, gx1 = y0 + window.y0, y1 + window.y0, x0 + window.x0, x1 + window.x0
        boxes.append((gy0, gx0, gy1, gx1))
        cut.append((gy0 == window.y0 and window.y0 > 0) or (gx0 == window.x0 and window.x0 > 0)
                   or (gy1 == window.y1 and window.y1 < height) or (gx1 == window.x1 and window.x1 < width))
        classes.append(int(r["class_id"]))
        scores.append(float(r["score"]))
    block = BlockObjects(boxes=np.asarray(boxes, dtype=np.int64).reshape(-1, 4), masks=masks,
                         classes=np.asarray(classes, dtype=np.int64), scores=np.asarray(scores, dtype=np.float32),
                         cut_risk=np.asarray(cut, dtype=bool), duplicates_dropped=dropped)
    block.on_seams = objects_on_seams(block, core)
    return block


def paste_objects(core: Window, objects: Iterable[tuple[int, BlockObjects]]) -> tuple[np.ndarray, np.ndarray]:
    """Instance ids and classes of ``core`` from the objects of every unit that may reach into it.

    Args:
        core: the output chunk to fill.
        objects: ``(first_id, block)`` per unit: the block's objects get ids ``first_id``,
            ``first_id + 1``, ... (unique across the image when the flow hands out the offsets).

    Returns ``(ids uint32, classes uint8)`` of shape ``core.shape``; where objects overlap, the
    higher score wins (ties: the lower id).
    """
    ids = np.zeros(core.shape, dtype=np.uint32)
    classes = np.zeros(core.shape, dtype=np.uint8)
    best = np.full(core.shape, -np.inf, dtype=np.float32)
    for first_id, block in objects:
        for k in range(len(block)):
            gy0, gx0, gy1, gx1 = (int(v) for v in block.boxes[k])
            y0, y1, x0, x1 = max(gy0, core.y0), min(gy1, core.y1), max(gx0, core.x0), min(gx1, core.x1)
            if y0 >= y1 or x0 >= x1:
                continue
            m = block.masks[k][y0 - gy0:y1 - gy0, x0 - gx0:x1 - gx0]
            sl = (slice(y0 - core.y0, y1 - core.y0), slice(x0 - core.x0, x1 - core.x0))
            oid = first_id + k
            win = m & ((block.scores[k] > best[sl]) | ((block.scores[k] == best[sl]) & (oid < ids[sl])))
            ids[sl][win] = oid
            classes[sl][win] = block.classes[k]
            best[sl][win] = block.scores[k]
    return ids, classes


def objects_on_seams(block: BlockObjects, core: Window) -> int:
    """How many of ``block``'s objects reach outside their core (they cross a seam between units)."""
    if not len(block):
        return 0
    b = block.boxes
    return int(((b[:, 0] < core.y0) | (b[:, 1] < core.x0) | (b[:, 2] > core.y1) | (b[:, 3] > core.x1)).sum())
