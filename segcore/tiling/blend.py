"""Blending the logits of the lattice tiles over one core (semantic models), in any number of
spatial dimensions: tile weights, flip test-time augmentation, :func:`blend_block_nd`."""

from __future__ import annotations

import itertools
from functools import lru_cache, reduce
from typing import Callable, Sequence

import numpy as np
import torch

from segcore.errors import ConfigError
from segcore.tiling.windows import Sizes, Window, WindowND, per_axis

#: Blending schemes of :func:`tile_weights`.
BLENDS = ("gaussian", "linear")
#: Smallest weight of a 2-D tile pixel (the Gaussian's rim would otherwise be ~0 and divide badly).
#: Tiles of other dimensions are not floored (see :func:`tile_weights_nd`).
MIN_WEIGHT = 1e-3


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
    forward passes (4 for an image: x, y, both; 8 for a volume). An axis of size 1 (a volume of one
    slice) flips to itself and is left out: no forward pass repeats another.
    """

    def run(x: torch.Tensor) -> torch.Tensor:
        ndim = x.dim() - 2
        spatial = range(ndim) if axes is None else axes
        if any(a not in range(ndim) for a in spatial):
            raise ConfigError(f"flip axes {tuple(spatial)} must be spatial axes in [0, {ndim}) of a "
                              f"(B, C, ...) input of shape {tuple(x.shape)}")
        dims = sorted({a - ndim for a in spatial if x.shape[2 + a] > 1}, reverse=True)  # -1 (the last axis) first
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
