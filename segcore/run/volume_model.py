"""A volumetric (3-D) semantic model over a volume's slabs: 3-D tiles, blended, one slab per unit.

A volume lives in the store as a group of slices chunked in slabs (:mod:`segcore.collection.store`),
and a slab is one work unit. A 2-D model segments a slab's slices as images. A 3-D model
(:attr:`~segcore.models.predict.Predictor.spatial_dims` 3, e.g. ``unet3d``) needs the slices around
the slab too, so :func:`volume_slab_labels` runs it the way large images are tiled
(:mod:`segcore.tiling`), in three dimensions: the tiles lie on one lattice over the whole volume
(:func:`~segcore.tiling.lattice_nd`), the unit runs every tile that touches its slab (reading the
slices those tiles reach, a halo of up to one tile depth on each side) and blends their logits over
the slab only. Every voxel thus gets the contributions of exactly the tiles that cover it in a
whole-volume sliding window, whichever unit computes it: no seams between slabs.

Tiles are ``--tile-size`` voxels along each axis (default :data:`DEFAULT_VOLUME_TILE`, rounded up to
the model's divisor), cut to the volume's size where it is smaller; neighbours share ``--overlap``
voxels (default a quarter of the tile). ``--tile-size 0`` runs the whole volume as one tile (for
volumes that fit). Percentile normalisation uses the values of the whole volume (a strided sample
of up to :data:`STATS_SLICES` slices), the same in every unit. ``--tta`` averages the 8 flips.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from segcore.collection.store import StoreInfo, store_root
from segcore.models.predict import Predictor
from segcore.normalise import Stats, percentile_stats
from segcore.run.channels import adapt_images
from segcore.run.context import Tiling
from segcore.run.plan import DEFAULT_VOLUME_TILE
from segcore.tiling import WindowND, blend_block_nd, flip_tta, read_window_nd, tiles_for_nd

#: Slices sampled (evenly spread) for a volume's percentile normalisation values.
STATS_SLICES = 16
_STATS_PIXELS = 1 << 20  # about this many voxels of the sample


def volume_tiles(tiling: Tiling | None, shape: tuple[int, int, int]
                 ) -> tuple[tuple[int, ...], tuple[int, ...], str, bool]:
    """``(tile, overlap, blend, tta)`` per axis for a volume of ``shape`` ``(D, H, W)``: the run's
    tiling cut to the volume (an axis the tile covers whole needs no overlap); the whole volume as
    one tile when ``tiling`` is None."""
    if tiling is None:
        return tuple(shape), (0, 0, 0), "gaussian", False
    tile = tuple(min(tiling.tile, n) for n in shape)
    overlap = tuple(0 if t >= n else min(tiling.overlap, t - 1) for t, n in zip(tile, shape))
    return tile, overlap, tiling.blend, tiling.tta


def volume_stats(images: Any, predictor: Predictor) -> Stats | None:
    """Percentile normalisation values of a volume group's array ``(D, H, W, C)`` from up to
    :data:`STATS_SLICES` evenly spread slices, strided in-plane; None for other normalisations or
    when the channel policy refuses the sample."""
    meta = predictor.meta
    if meta.normalisation.mode != "percentile":
        return None
    depth, height, width, _ = images.shape
    picks = sorted({round(i * (depth - 1) / max(1, STATS_SLICES - 1)) for i in range(min(depth, STATS_SLICES))})
    step = max(1, math.ceil(math.sqrt(len(picks) * height * width / _STATS_PIXELS)))
    sample = np.stack([images[z][::step, ::step] for z in picks])
    pixels, _, refused = adapt_images(sample.reshape(1, -1, 1, sample.shape[-1]), model_channels=meta.in_channels)
    return None if refused else percentile_stats(pixels[0, :, 0], meta.normalisation)


@lru_cache(maxsize=32)
def _cached_stats(store_path: str, store_id: str | None, group: str, predictor: Predictor) -> Stats | None:
    return volume_stats(store_root(store_path)[f"images/{group}"], predictor)


def group_stats(store: StoreInfo, group: str, predictor: Predictor) -> Stats | None:
    """:func:`volume_stats` of a store group, computed once per worker process (every slab of a volume
    needs the same values; the sample spans the whole volume, so it is not read again per slab).
    Keyed by the store's id too: a store created anew at the same path is sampled anew."""
    if predictor.meta.normalisation.mode != "percentile":
        return None
    return _cached_stats(store.path, store.store_id, group, predictor)


def volume_slab_labels(predictor: Predictor, images: Any, start: int, stop: int, *, tiling: Tiling | None,
                       batch_size: int, stats: Stats | None) -> tuple[np.ndarray, dict[int, str]]:
    """``(stop - start, H, W)`` class labels of slices ``[start, stop)`` of a volume whose slices are
    ``images`` (the group's ``(D, H, W, C)`` Zarr array), and the slices the channel policy refused
    (index in the slab -> reason; their labels are background). ``batch_size`` tiles per forward pass;
    ``stats``: the volume's percentile values (:func:`group_stats`), None for other normalisations.
    """
    depth, height, width, _ = images.shape
    tile, overlap, blend, tta = volume_tiles(tiling, (depth, height, width))
    core = WindowND((start, 0, 0), (stop, height, width))
    tiles = tiles_for_nd(core, (depth, height, width), tile, overlap)
    window = read_window_nd(tiles)
    raw, _, refused = adapt_images(images[window.start[0]:window.stop[0]], model_channels=predictor.meta.in_channels)
    logits_of = flip_tta(predictor.logits) if tta else predictor.logits
    with torch.inference_mode():
        logits = blend_block_nd(logits_of, raw[:, window.start[1]:window.stop[1], window.start[2]:window.stop[2]],
                                window.start, core, tiles, to_input=lambda b: predictor.prepare(b, stats=stats),
                                blend=blend, overlap=overlap, batch_size=batch_size)
    labels = logits.argmax(axis=0).astype(predictor.label_dtype)
    in_slab = {i - (start - window.start[0]): why for i, why in refused.items()
               if start <= window.start[0] + i < stop}
    labels[list(in_slab)] = 0
    return labels, in_slab


__all__ = ["DEFAULT_VOLUME_TILE", "STATS_SLICES", "group_stats", "volume_slab_labels", "volume_stats", "volume_tiles"]
