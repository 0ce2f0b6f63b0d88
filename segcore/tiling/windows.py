"""Windows and the tile lattice of tiled inference, in any number of spatial dimensions.

:class:`WindowND` is a half-open window per spatial axis; :class:`Window` is the 2-D one of
images (``y0, y1, x0, x1``), which the instance code and the run plan use. Model tiles lie on
one lattice for the whole image or volume (:func:`axis_starts`); a unit's core is one output
chunk (:func:`chunk_windows_nd`) and it runs the lattice tiles touching it (:func:`tiles_for_nd`).
Tile sizes and overlaps are one int for every axis or one per axis (volumes are often anisotropic).
"""

from __future__ import annotations

import itertools
import math
import operator
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from segcore.errors import ConfigError

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
