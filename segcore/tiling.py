"""Tiled inference of images too large for one forward pass.

A large image is stored spatially chunked (see :mod:`segcore.collection.store`); each chunk is one work
unit and one chunk of every output array, so every output pixel is written by exactly one unit
(the chunk is the unit's *core*). Around its core a unit reads a *halo*; how it is used depends
on the model kind.

Semantic models (:func:`blend_block`): model tiles lie on one lattice for the whole image
(:func:`axis_starts`: step ``tile - overlap``, the last tile flush with the image edge). A unit
runs every lattice tile that touches its core and accumulates ``weight * logits`` over the core
only, with Gaussian weights (sigma = ``tile / 8``, as nnU-Net and MONAI) or linear ramps over the
overlap. A core pixel therefore gets the contributions of exactly the tiles that cover it in a
whole-image sliding window, whichever unit computes it: there are no seams between units, and
memory is bounded by the core and the tile batch, never by the image. The argmax of the blended
logits is the label.

Instance models (:func:`keep_core_objects`): the detector runs on a core plus a halo of
``overlap`` pixels and keeps the objects whose box centre lies in its core. Cores partition
the image, so every object is kept by exactly one core, provided it lies whole inside that core's
window: an object no larger than the overlap always does. An object that touches the window
edge where that edge is not the image edge may have been cut: it is kept and *reported*
(``cut_risk``), never silently dropped. Kept objects carry global boxes and box-sized masks; the
pipeline pastes each output chunk from the objects of all units whose boxes reach into it
(:func:`paste_objects`, higher score wins where objects overlap), so objects that cross a seam
stay whole and ids are unique across the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from segcore.errors import ConfigError

#: Blending schemes of :func:`tile_weights`.
BLENDS = ("gaussian", "linear")
#: Smallest weight of a tile pixel (the Gaussian's rim would otherwise be ~0 and divide badly).
MIN_WEIGHT = 1e-3


@dataclass(frozen=True)
class Window:
    """The half-open pixel window ``[y0, y1) x [x0, x1)`` of an image."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    def intersects(self, other: "Window") -> bool:
        return self.y0 < other.y1 and other.y0 < self.y1 and self.x0 < other.x1 and other.x0 < self.x1

    def grow(self, halo: int, height: int, width: int) -> "Window":
        """This window plus ``halo`` pixels on every side, clipped to a ``height x width`` image."""
        return Window(max(0, self.y0 - halo), min(height, self.y1 + halo),
                      max(0, self.x0 - halo), min(width, self.x1 + halo))


def check_tiling(tile: int, overlap: int) -> None:
    """Refuse a tile size / overlap pair that cannot tile anything."""
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise ConfigError(f"tile size must be a positive integer, got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or not 0 <= overlap < tile:
        raise ConfigError(f"overlap must be an integer in [0, tile size {tile}), got {overlap!r}")


def axis_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the tiles along one axis of ``length`` pixels.

    Tiles start every ``tile - overlap`` pixels; the last one is moved back to end flush with the
    axis (so it may overlap its neighbour by more). An axis no longer than ``tile`` has one tile,
    the whole axis.
    """
    check_tiling(tile, overlap)
    if length <= tile:
        return [0]
    step = tile - overlap
    n = math.ceil((length - tile) / step) + 1
    return sorted({min(i * step, length - tile) for i in range(n)})


def lattice(height: int, width: int, tile: int, overlap: int) -> list[Window]:
    """Every model tile of a ``height x width`` image, row by row (the whole-image sliding window)."""
    ys, xs = axis_starts(height, tile, overlap), axis_starts(width, tile, overlap)
    return [Window(y, min(y + tile, height), x, min(x + tile, width)) for y in ys for x in xs]


def chunk_windows(height: int, width: int, chunk: int) -> list[Window]:
    """The output chunks (unit cores) of a ``height x width`` image chunked by ``chunk``, row by row."""
    if chunk < 1:
        raise ConfigError(f"chunk size must be >= 1, got {chunk}")
    return [Window(y, min(y + chunk, height), x, min(x + chunk, width))
            for y in range(0, height, chunk) for x in range(0, width, chunk)]


def tiles_for(core: Window, height: int, width: int, tile: int, overlap: int) -> list[Window]:
    """The lattice tiles that touch ``core``, in lattice order."""
    ys = [y for y in axis_starts(height, tile, overlap) if y < core.y1 and core.y0 < min(y + tile, height)]
    xs = [x for x in axis_starts(width, tile, overlap) if x < core.x1 and core.x0 < min(x + tile, width)]
    return [Window(y, min(y + tile, height), x, min(x + tile, width)) for y in ys for x in xs]


def read_window(tiles: Sequence[Window]) -> Window:
    """The smallest window holding all ``tiles`` (what a unit reads: its core plus the halo)."""
    return Window(min(t.y0 for t in tiles), max(t.y1 for t in tiles),
                  min(t.x0 for t in tiles), max(t.x1 for t in tiles))


@lru_cache(maxsize=16)
def tile_weights(height: int, width: int, blend: str = "gaussian", overlap: int = 0) -> np.ndarray:
    """``(height, width)`` float32 blending weights of one tile, 1 at the centre.

    ``gaussian``: ``exp(-d^2 / (2 sigma^2))`` per axis with ``sigma = side / 8``; ``linear``: ramps
    from the edge over ``overlap`` pixels (flat 1 inside). Both are floored at :data:`MIN_WEIGHT`.
    The returned array is shared: do not modify it.
    """
    if blend not in BLENDS:
        raise ConfigError(f"blend must be one of {BLENDS}, got {blend!r}")

    def axis(n: int) -> np.ndarray:
        i = np.arange(n, dtype=np.float64)
        if blend == "gaussian":
            sigma = max(n / 8.0, 1e-6)
            return np.exp(-((i - (n - 1) / 2.0) ** 2) / (2.0 * sigma**2))
        ramp = max(int(overlap), 1)
        return np.clip(np.minimum(i + 1, n - i) / (ramp + 1), 0.0, 1.0)

    w = np.outer(axis(height), axis(width))
    w = np.maximum(w / w.max(), MIN_WEIGHT).astype(np.float32)
    w.setflags(write=False)
    return w


def flip_tta(model: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` averaged in logit space over the identity and the three flips (x, y, both)."""

    def run(x: torch.Tensor) -> torch.Tensor:
        total = model(x).float()
        for dims in ((-1,), (-2,), (-2, -1)):
            total += model(x.flip(dims)).float().flip(dims)
        return total / 4.0

    return run


def blend_block(logits_of: Callable[[torch.Tensor], torch.Tensor], image: np.ndarray, origin: tuple[int, int],
                core: Window, tiles: Sequence[Window], *, to_input: Callable[[np.ndarray], torch.Tensor],
                blend: str = "gaussian", overlap: int = 0, batch_size: int = 8) -> np.ndarray:
    """Blended ``(num_classes, core_h, core_w)`` float32 logits of ``core``.

    Args:
        logits_of: ``(B, C, h, w)`` model input -> ``(B, K, h, w)`` logits (same-shape tiles are
            batched ``batch_size`` at a time).
        image: ``(H', W', C)`` raw pixels of the read window, whose top-left pixel is image
            pixel ``origin``; it must hold every tile.
        core: the output window (image coordinates).
        tiles: the lattice tiles touching ``core`` (:func:`tiles_for`).
        to_input: raw ``(B, h, w, C)`` pixels -> normalised ``(B, C, h, w)`` float tensor.
        blend, overlap: see :func:`tile_weights`.
    """
    oy, ox = origin
    acc: np.ndarray | None = None
    wsum = np.zeros(core.shape, dtype=np.float32)
    by_shape: dict[tuple[int, int], list[Window]] = {}
    for t in tiles:
        by_shape.setdefault(t.shape, []).append(t)
    for shape, group in by_shape.items():
        weights = tile_weights(*shape, blend=blend, overlap=overlap)
        for s in range(0, len(group), batch_size):
            batch = group[s:s + batch_size]
            raw = np.stack([image[t.y0 - oy:t.y1 - oy, t.x0 - ox:t.x1 - ox] for t in batch])
            out = logits_of(to_input(raw)).float().cpu().numpy()
            if acc is None:
                acc = np.zeros((out.shape[1],) + core.shape, dtype=np.float32)
            for t, logits in zip(batch, out):
                # The part of the tile inside the core, in core and in tile coordinates.
                y0, y1, x0, x1 = max(t.y0, core.y0), min(t.y1, core.y1), max(t.x0, core.x0), min(t.x1, core.x1)
                w = weights[y0 - t.y0:y1 - t.y0, x0 - t.x0:x1 - t.x0]
                acc[:, y0 - core.y0:y1 - core.y0, x0 - core.x0:x1 - core.x0] += (
                    logits[:, y0 - t.y0:y1 - t.y0, x0 - t.x0:x1 - t.x0] * w)
                wsum[y0 - core.y0:y1 - core.y0, x0 - core.x0:x1 - core.x0] += w
    if acc is None:
        raise ConfigError(f"no tile covers the core {core}; the tiles must come from tiles_for(core, ...)")
    if (wsum <= 0).any():
        raise ConfigError(f"tiles leave part of the core {core} uncovered")
    return acc / wsum


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
