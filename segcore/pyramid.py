"""Multiscale pyramids of label images: downsampling by the most frequent label.

Labels cannot be averaged (the mean of classes 1 and 3 is not class 2), so each level keeps, of
every 2x2 (2-D) or 2x2x2 (3-D) block of the level above, its most frequent label; on a tie the
smallest label. :func:`downsample_mode` is that rule on one array (pure numpy, vectorised);
:func:`write_label_pyramid` applies it level by level to a label image of :mod:`segcore.ngff`,
one output chunk at a time, so a large volume never needs to fit in memory.

Edges: a level has ``ceil(n / 2)`` voxels along an axis of ``n``. Where ``n`` is odd, the last
block along that axis holds only the voxels that exist, and their mode is taken (nothing is padded
or dropped), so every label of a border row still votes. The scale of a level doubles per
downsampled axis even so: its last voxel reaches half a voxel beyond the image. An axis of size 1
is not downsampled further (factor 1), and non-spatial axes (``image``) never are.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import zarr

from segcore.errors import ConfigError
from segcore.ngff import LEVEL0, multiscale, spatial_axes

log = logging.getLogger(__name__)

#: Levels are added until the largest spatial side is at most this many voxels ...
DEFAULT_MAX_SIDE = 256
#: ... or the pyramid has this many levels (the full resolution included).
DEFAULT_MAX_LEVELS = 8


def downsample_mode(labels: np.ndarray, factors: Sequence[int]) -> np.ndarray:
    """The most frequent label of each block of ``factors`` voxels (ties: the smallest label).

    ``labels`` is an integer array of any shape; ``factors`` one positive block size per axis (1:
    that axis is kept). The result has ``ceil(n / f)`` voxels per axis and ``labels``' dtype; a
    block cut by the end of an axis takes the mode of the voxels it holds (see the module docstring).
    Cost: ``k`` comparisons per voxel for blocks of ``k`` voxels (4 in 2-D, 8 in 3-D).
    """
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ConfigError(f"labels must be integers to be downsampled by mode, not {labels.dtype}")
    factors = tuple(int(f) for f in factors)
    if len(factors) != labels.ndim or min(factors, default=1) < 1:
        raise ConfigError(f"one block size >= 1 per axis of the {labels.ndim}-D labels is needed, not {factors}")
    out_shape = tuple(-(-n // f) for n, f in zip(labels.shape, factors))
    pad = [(0, o * f - n) for o, f, n in zip(out_shape, factors, labels.shape)]
    valid = None
    if any(p for _, p in pad):
        valid = np.pad(np.ones(labels.shape, bool), pad)
        labels = np.pad(labels, pad)
    k = int(np.prod(factors))
    # (o0, f0, o1, f1, ...) -> (o0, o1, ..., f0 * f1 * ...): the voxels of each block on the last axis
    split = [s for o, f in zip(out_shape, factors) for s in (o, f)]
    order = [*range(0, 2 * labels.ndim, 2), *range(1, 2 * labels.ndim, 2)]

    def blocks(a: np.ndarray) -> np.ndarray:
        return a.reshape(split).transpose(order).reshape(*out_shape, k)

    values = blocks(labels)
    present = None if valid is None else blocks(valid)
    counts = np.zeros(values.shape, np.min_scalar_type(k))
    for i in range(k):  # counts[..., j]: voxels of the block equal to voxel j (padding does not vote)
        same = values == values[..., i:i + 1]
        if present is not None:
            same &= present[..., i:i + 1]
        counts += same
    if present is not None:
        counts[~present] = 0  # a padding voxel is never the mode
    best = counts.max(axis=-1, keepdims=True)
    candidates = np.where(counts == best, values, np.iinfo(values.dtype).max)
    return candidates.min(axis=-1)


@dataclass(frozen=True)
class Level:
    """One level of a pyramid: its array ``path``, ``shape``, ``factors`` from the full resolution
    (per axis) and ``step``: the factors from the level above (all ones for the full resolution)."""

    path: str
    shape: tuple[int, ...]
    factors: tuple[int, ...]
    step: tuple[int, ...]


def plan_levels(shape: Sequence[int], dimension_names: Sequence[str], *, max_side: int = DEFAULT_MAX_SIDE,
                max_levels: int = DEFAULT_MAX_LEVELS) -> list[Level]:
    """The levels of the pyramid of a label array of ``shape``: halve every spatial axis longer than
    1 until the longest spatial side is at most ``max_side`` or there are ``max_levels`` levels."""
    if max_side < 1 or max_levels < 1:
        raise ConfigError(f"max_side and max_levels must be >= 1, not {max_side} and {max_levels}")
    space = spatial_axes(dimension_names)
    if len(shape) != len(dimension_names):
        raise ConfigError(f"shape {tuple(shape)} does not match the dimensions {tuple(dimension_names)}")
    ones = (1,) * len(shape)
    levels = [Level(LEVEL0, tuple(shape), ones, ones)]
    while len(levels) < max_levels and max(levels[-1].shape[i] for i in space) > max_side:
        last = levels[-1]
        step = tuple(2 if i in space and n > 1 else 1 for i, n in enumerate(last.shape))
        levels.append(Level(str(len(levels)), tuple(-(-n // f) for n, f in zip(last.shape, step)),
                            tuple(a * b for a, b in zip(last.factors, step)), step))
    return levels


def downsample_array(source: zarr.Array, target: zarr.Array, step: Sequence[int]) -> None:
    """Write ``target`` = :func:`downsample_mode` of ``source`` by ``step``, one chunk of ``target`` at a
    time (it reads the ``step``-times larger region of ``source`` under that chunk): the result equals
    downsampling the whole array at once, and memory holds only a few chunks."""
    expected = tuple(-(-n // f) for n, f in zip(source.shape, step))
    if tuple(target.shape) != expected:
        raise ConfigError(f"a target of shape {expected} is needed to downsample {source.shape} by {tuple(step)}, "
                          f"not {target.shape}")
    grid = [range(0, n, c) for n, c in zip(target.shape, target.chunks)]
    for origin in itertools.product(*grid):
        out = tuple(slice(o, min(o + c, n)) for o, c, n in zip(origin, target.chunks, target.shape))
        region = tuple(slice(s.start * f, min(s.stop * f, n)) for s, f, n in zip(out, step, source.shape))
        target[out] = downsample_mode(source[region], step)


def list_levels(image: zarr.Group, factors: Sequence[Sequence[int]]) -> None:
    """List the levels of label image ``image`` in its ``multiscales``: ``0`` .. ``len(factors) - 1``, with
    their factors from the full resolution (``[(1, ...)]`` lists the full resolution alone: the levels
    beyond it are out of date until written again)."""
    ome = dict(image.attrs["ome"])
    first = ome["multiscales"][0]
    scale = first["datasets"][0]["coordinateTransformations"][0]["scale"]
    entry = multiscale(first.get("name", image.basename), first["axes"], scale, factors)
    image.attrs["ome"] = {**ome, "multiscales": [entry, *ome["multiscales"][1:]]}


def write_label_pyramid(image: zarr.Group | str, *, max_side: int = DEFAULT_MAX_SIDE,
                        max_levels: int = DEFAULT_MAX_LEVELS, overwrite: bool = False) -> int:
    """Write levels ``1``, ``2``, ... of label image ``image`` (a group or its location, made by
    :func:`segcore.ngff.create_label_image`) from its complete full-resolution level ``0``, then list
    them in its ``multiscales`` (written last: it lists only levels that are complete). Returns the
    number of levels. Levels already listed as planned are kept unless ``overwrite`` (the labels at
    level 0 changed). The levels have the dtype, dimension names and chunk shape (cut to their
    shape) of level 0; scales: level 0's times each level's factors.
    """
    if not isinstance(image, zarr.Group):
        image = zarr.open_group(image, mode="r+")
    first = image.attrs["ome"]["multiscales"][0]
    if first["datasets"][0]["path"] != LEVEL0:
        raise ConfigError(f"label image {image.path!r} keeps its full resolution at "
                          f"{first['datasets'][0]['path']!r}, not {LEVEL0!r}: recreate it with create_label_image")
    base = image[LEVEL0]
    names = [a["name"] for a in first["axes"]]
    levels = plan_levels(base.shape, names, max_side=max_side, max_levels=max_levels)
    if not overwrite and [d["path"] for d in first["datasets"]] == [lv.path for lv in levels]:
        return len(levels)
    if len(first["datasets"]) > 1:  # until every level is rewritten, only level 0 is listed
        list_levels(image, [levels[0].factors])
    source = base
    for lv in levels[1:]:
        target = image.create_array(lv.path, shape=lv.shape, chunks=tuple(min(c, n) for c, n in zip(base.chunks,
                                                                                                     lv.shape)),
                                    dtype=base.dtype, fill_value=0, dimension_names=tuple(names), overwrite=True)
        downsample_array(source, target, lv.step)
        source = target
    list_levels(image, [lv.factors for lv in levels])
    log.info("label pyramid of %s: %s", image.path or image.store_path, " ".join(str(lv.shape) for lv in levels))
    return len(levels)
