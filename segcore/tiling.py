"""Tiled inference of images and volumes too large for one forward pass.

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

The semantic part works in any number of spatial dimensions: :class:`WindowND` and the ``*_nd``
functions take per-axis shapes, tiles and overlaps (a volume ``(D, H, W)`` may have anisotropic
tiles such as ``(16, 128, 128)``). The 2-D functions (:class:`Window`, :func:`lattice`,
:func:`tiles_for`, :func:`blend_block`, ...) are the same computation on ``(H, W)``.

Instance models (:func:`keep_core_objects`, 2-D only): the detector runs on a core plus a halo of
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

import itertools
import math
import operator
from dataclasses import dataclass
from functools import lru_cache, reduce
from typing import Callable, Iterable, Sequence

import numpy as np
import torch

from segcore.errors import ConfigError

#: Blending schemes of :func:`tile_weights`.
BLENDS = ("gaussian", "linear")
#: Smallest weight of a 2-D tile pixel (the Gaussian's rim would otherwise be ~0 and divide badly).
#: Tiles of other dimensions are not floored (see :func:`tile_weights_nd`).
MIN_WEIGHT = 1e-3

#: A size given once for every axis (an int) or per spatial axis (a tuple, e.g. ``(D, H, W)`` order).
Sizes = int | Sequence[int]


@dataclass(frozen=True)
class WindowND:
    """The half-open window ``[start[i], stop[i])`` on every spatial axis ``i`` of an image or volume."""

    start: tuple[int, ...]
    stop: tuple[int, ...]

    def __post_init__(self) -> None:
        try:
            start, stop = tuple(map(operator.index, self.start)), tuple(map(operator.index, self.stop))
        except TypeError:
            raise ConfigError(f"window start {self.start} and stop {self.stop} must be integers") from None
        if len(start) != len(stop):
            raise ConfigError(f"window start {start} and stop {stop} must have one value per axis")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "stop", stop)

    @property
    def ndim(self) -> int:
        return len(self.start)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in zip(self.start, self.stop))

    def intersects(self, other: "WindowND") -> bool:
        return all(a0 < b1 and b0 < a1 for a0, a1, b0, b1 in zip(self.start, self.stop, other.start, other.stop))

    def intersection(self, other: "WindowND") -> "WindowND":
        """The common part of both windows (empty on an axis where they do not meet)."""
        start = tuple(max(a, b) for a, b in zip(self.start, other.start))
        return WindowND(start, tuple(max(s, min(a, b)) for s, a, b in zip(start, self.stop, other.stop)))

    def grow(self, halo: Sizes, shape: Sequence[int]) -> "WindowND":
        """This window plus ``halo`` voxels (one int, or one per axis) on every side, clipped to ``shape``."""
        halo = per_axis(halo, len(shape), "halo")
        return WindowND(tuple(max(0, a - h) for a, h in zip(self.start, halo)),
                        tuple(min(n, b + h) for b, h, n in zip(self.stop, halo, shape)))

    def slices(self, origin: Sequence[int] | None = None) -> tuple[slice, ...]:
        """Index of this window in an array whose element ``[0, 0, ...]`` is voxel ``origin`` (default 0)."""
        origin = (0,) * self.ndim if origin is None else origin
        return tuple(slice(a - o, b - o) for a, b, o in zip(self.start, self.stop, origin))


@dataclass(frozen=True)
class Window:
    """The half-open pixel window ``[y0, y1) x [x0, x1)`` of an image (the 2-D :class:`WindowND`)."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    @property
    def nd(self) -> WindowND:
        return WindowND((self.y0, self.x0), (self.y1, self.x1))

    @classmethod
    def from_nd(cls, window: WindowND) -> "Window":
        (y0, x0), (y1, x1) = window.start, window.stop
        return cls(y0, y1, x0, x1)

    def intersects(self, other: "Window") -> bool:
        return self.y0 < other.y1 and other.y0 < self.y1 and self.x0 < other.x1 and other.x0 < self.x1

    def grow(self, halo: int, height: int, width: int) -> "Window":
        """This window plus ``halo`` pixels on every side, clipped to a ``height x width`` image."""
        return Window(max(0, self.y0 - halo), min(height, self.y1 + halo),
                      max(0, self.x0 - halo), min(width, self.x1 + halo))


def per_axis(value: Sizes, ndim: int, what: str) -> tuple[int, ...]:
    """``value`` once per axis: an int is repeated ``ndim`` times, a sequence must have ``ndim`` values."""
    if isinstance(value, (int, np.integer)):
        return (value,) * ndim
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise ConfigError(f"{what} must be an integer or one integer per spatial axis, got {value!r}")
    if len(value) != ndim:
        raise ConfigError(f"{what} {tuple(value)} has {len(value)} values but the data has {ndim} spatial axes: "
                          f"give one value per axis, or one integer for all")
    return tuple(value)


def check_tiling(tile: int, overlap: int) -> None:
    """Refuse a tile size / overlap pair that cannot tile anything."""
    if isinstance(tile, bool) or not isinstance(tile, (int, np.integer)) or tile < 1:
        raise ConfigError(f"tile size must be a positive integer, got {tile!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or not 0 <= overlap < tile:
        raise ConfigError(f"overlap must be an integer in [0, tile size {tile}), got {overlap!r}")


def check_tiling_nd(tile: Sizes, overlap: Sizes, ndim: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(tile, overlap)`` per axis, refusing any axis where they cannot tile (:func:`check_tiling`)."""
    tiles, overlaps = per_axis(tile, ndim, "tile size"), per_axis(overlap, ndim, "overlap")
    for axis, (t, o) in enumerate(zip(tiles, overlaps)):
        try:
            check_tiling(t, o)
        except ConfigError as exc:
            raise ConfigError(f"spatial axis {axis} of tile size {tile!r} / overlap {overlap!r}: {exc}") from None
    return tiles, overlaps


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


def lattice_nd(shape: Sequence[int], tile: Sizes, overlap: Sizes) -> list[WindowND]:
    """Every model tile of an image or volume of ``shape`` (the whole-image sliding window), in C order
    (the last axis fastest); ``tile`` and ``overlap`` in voxels, one int or one per axis."""
    return tiles_for_nd(WindowND((0,) * len(shape), tuple(shape)), shape, tile, overlap)


def tiles_for_nd(core: WindowND, shape: Sequence[int], tile: Sizes, overlap: Sizes) -> list[WindowND]:
    """The lattice tiles (:func:`lattice_nd`) that touch ``core``, in lattice order."""
    if core.ndim != len(shape):
        raise ConfigError(f"core {core} has {core.ndim} axes but the shape {tuple(shape)} has {len(shape)}")
    tiles, overlaps = check_tiling_nd(tile, overlap, len(shape))
    starts = [[s for s in axis_starts(n, t, o) if s < b and a < min(s + t, n)]
              for n, t, o, a, b in zip(shape, tiles, overlaps, core.start, core.stop)]
    return [WindowND(c, tuple(min(s + t, n) for s, t, n in zip(c, tiles, shape))) for c in itertools.product(*starts)]


def chunk_windows_nd(shape: Sequence[int], chunk: Sizes) -> list[WindowND]:
    """The output chunks (unit cores) of ``shape`` chunked by ``chunk`` (one int or one per axis), in C order."""
    chunks = per_axis(chunk, len(shape), "chunk size")
    if any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) or c < 1 for c in chunks):
        raise ConfigError(f"chunk size must be >= 1 on every axis, got {chunk!r}")
    starts = [range(0, n, c) for n, c in zip(shape, chunks)]
    return [WindowND(c, tuple(min(s + k, n) for s, k, n in zip(c, chunks, shape))) for c in itertools.product(*starts)]


def read_window_nd(tiles: Sequence[WindowND]) -> WindowND:
    """The smallest window holding all ``tiles`` (what a unit reads: its core plus the halo)."""
    return WindowND(tuple(map(min, zip(*(t.start for t in tiles)))), tuple(map(max, zip(*(t.stop for t in tiles)))))


def lattice(height: int, width: int, tile: int, overlap: int) -> list[Window]:
    """Every model tile of a ``height x width`` image, row by row (the whole-image sliding window)."""
    return [Window.from_nd(t) for t in lattice_nd((height, width), tile, overlap)]


def chunk_windows(height: int, width: int, chunk: int) -> list[Window]:
    """The output chunks (unit cores) of a ``height x width`` image chunked by ``chunk``, row by row."""
    return [Window.from_nd(c) for c in chunk_windows_nd((height, width), chunk)]


def tiles_for(core: Window, height: int, width: int, tile: int, overlap: int) -> list[Window]:
    """The lattice tiles that touch ``core``, in lattice order."""
    return [Window.from_nd(t) for t in tiles_for_nd(core.nd, (height, width), tile, overlap)]


def read_window(tiles: Sequence[Window]) -> Window:
    """The smallest window holding all ``tiles`` (what a unit reads: its core plus the halo)."""
    return Window.from_nd(read_window_nd([t.nd for t in tiles]))


def tile_weights_nd(shape: Sequence[int], blend: str = "gaussian", overlap: Sizes = 0) -> np.ndarray:
    """``shape`` float32 blending weights of one tile, 1 at the centre: the product of one 1-D
    weight per axis, normalised to a maximum of 1.

    ``gaussian``: ``exp(-d^2 / (2 sigma^2))`` per axis with ``sigma = side / 8``; ``linear``: ramps
    from the edge over ``overlap`` voxels of that axis (one int, or one per axis; flat 1 inside).
    2-D weights are floored at :data:`MIN_WEIGHT`, as they always were; others are not: they are
    positive anyway (a Gaussian factor is at least ``e^-8``, a ramp at least ``1 / (overlap + 1)``),
    and on the faces of a volume, where the product of three rims is ~1e-10 for every tile, a floor
    would weight a voxel's tile and an edge-affected neighbour alike. The array is shared: do not modify it.
    """
    if blend not in BLENDS:
        raise ConfigError(f"blend must be one of {BLENDS}, got {blend!r}")
    overlaps = tuple(int(o) for o in per_axis(overlap, len(shape), "overlap"))
    return _weights(tuple(int(n) for n in shape), blend, overlaps)


@lru_cache(maxsize=16)
def _weights(shape: tuple[int, ...], blend: str, overlaps: tuple[int, ...]) -> np.ndarray:
    def axis(n: int, overlap: int) -> np.ndarray:
        i = np.arange(n, dtype=np.float64)
        if blend == "gaussian":
            sigma = max(n / 8.0, 1e-6)
            return np.exp(-((i - (n - 1) / 2.0) ** 2) / (2.0 * sigma**2))
        ramp = max(overlap, 1)
        return np.clip(np.minimum(i + 1, n - i) / (ramp + 1), 0.0, 1.0)

    w = reduce(np.multiply.outer, [axis(n, o) for n, o in zip(shape, overlaps)])
    w = np.maximum(w / w.max(), MIN_WEIGHT if len(shape) == 2 else 0.0).astype(np.float32)
    w.setflags(write=False)
    return w


def tile_weights(height: int, width: int, blend: str = "gaussian", overlap: int = 0) -> np.ndarray:
    """``(height, width)`` float32 blending weights of one tile (:func:`tile_weights_nd`). Shared: do not modify."""
    return tile_weights_nd((height, width), blend, overlap)


def flip_tta(model: Callable[[torch.Tensor], torch.Tensor], *, axes: Sequence[int] | None = None
             ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model`` averaged in logit space over the identity and every flip of the spatial ``axes``.

    The input is ``(B, C, *spatial)``; ``axes`` count the spatial axes from 0 (for ``(B, C, D, H, W)``,
    ``(1, 2)`` is H and W), default all of them: every combination of them is flipped, so ``2**len(axes)``
    forward passes (4 for an image: x, y, both; 8 for a volume).
    """

    def run(x: torch.Tensor) -> torch.Tensor:
        ndim = x.dim() - 2
        spatial = range(ndim) if axes is None else axes
        if any(a not in range(ndim) for a in spatial):
            raise ConfigError(f"flip axes {tuple(spatial)} must be spatial axes in [0, {ndim}) of a "
                              f"(B, C, ...) input of shape {tuple(x.shape)}")
        dims = sorted({a - ndim for a in spatial}, reverse=True)  # -1 (the last axis) first
        flips = [c for r in range(1, len(dims) + 1) for c in itertools.combinations(dims, r)]
        total = model(x).float()
        for d in flips:
            total += model(x.flip(d)).float().flip(d)
        return total / float(len(flips) + 1)

    return run


def blend_block_nd(logits_of: Callable[[torch.Tensor], torch.Tensor], image: np.ndarray, origin: Sequence[int],
                   core: WindowND, tiles: Sequence[WindowND], *, to_input: Callable[[np.ndarray], torch.Tensor],
                   blend: str = "gaussian", overlap: Sizes = 0, batch_size: int = 8) -> np.ndarray:
    """Blended ``(num_classes, *core.shape)`` float32 logits of ``core``; memory: the core, the tile batch.

    Args:
        logits_of: ``(B, C, *tile)`` model input -> ``(B, K, *tile)`` logits (same-shape tiles are
            batched ``batch_size`` at a time).
        image: ``(*read_shape, C)`` raw voxels of the read window (channels last), whose first voxel
            is voxel ``origin``; it must hold every tile.
        core: the output window (image coordinates).
        tiles: the lattice tiles touching ``core`` (:func:`tiles_for_nd`).
        to_input: raw ``(B, *tile, C)`` voxels -> normalised ``(B, C, *tile)`` float tensor.
        blend, overlap: see :func:`tile_weights_nd` (overlap in voxels, one int or one per axis).
    """
    if image.ndim != core.ndim + 1 or len(origin) != core.ndim:
        raise ConfigError(f"image {image.shape} must be (*spatial, C), channels last, with origin {tuple(origin)} "
                          f"on the {core.ndim} spatial axes of the core {core}")
    acc: np.ndarray | None = None
    wsum = np.zeros(core.shape, dtype=np.float32)
    by_shape: dict[tuple[int, ...], list[WindowND]] = {}
    for t in tiles:
        by_shape.setdefault(t.shape, []).append(t)
    for shape, group in by_shape.items():
        weights = tile_weights_nd(shape, blend=blend, overlap=overlap)
        for s in range(0, len(group), batch_size):
            batch = group[s:s + batch_size]
            raw = np.stack([image[t.slices(origin)] for t in batch])
            out = logits_of(to_input(raw)).float().cpu().numpy()
            if acc is None:
                acc = np.zeros((out.shape[1],) + core.shape, dtype=np.float32)
            for t, logits in zip(batch, out):
                part = t.intersection(core)  # the part of the tile inside the core
                w = weights[part.slices(t.start)]
                acc[(slice(None),) + part.slices(core.start)] += logits[(slice(None),) + part.slices(t.start)] * w
                wsum[part.slices(core.start)] += w
    if acc is None:
        raise ConfigError(f"no tile covers the core {core}; the tiles must come from tiles_for_nd(core, ...)")
    if (wsum <= 0).any():
        raise ConfigError(f"tiles leave part of the core {core} uncovered")
    return acc / wsum


def blend_block(logits_of: Callable[[torch.Tensor], torch.Tensor], image: np.ndarray, origin: tuple[int, int],
                core: Window, tiles: Sequence[Window], *, to_input: Callable[[np.ndarray], torch.Tensor],
                blend: str = "gaussian", overlap: int = 0, batch_size: int = 8) -> np.ndarray:
    """Blended ``(num_classes, core_h, core_w)`` float32 logits of ``core`` (:func:`blend_block_nd` in 2-D).

    Args:
        logits_of: ``(B, C, h, w)`` model input -> ``(B, K, h, w)`` logits.
        image: ``(H', W', C)`` raw pixels of the read window, whose top-left pixel is image
            pixel ``origin``; it must hold every tile.
        core: the output window (image coordinates); tiles: the lattice tiles touching it (:func:`tiles_for`).
        to_input: raw ``(B, h, w, C)`` pixels -> normalised ``(B, C, h, w)`` float tensor.
        blend, overlap, batch_size: see :func:`blend_block_nd`.
    """
    return blend_block_nd(logits_of, image, origin, core.nd, [t.nd for t in tiles], to_input=to_input,
                          blend=blend, overlap=overlap, batch_size=batch_size)


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
