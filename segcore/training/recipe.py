"""Pieces of the semantic training recipe: validation split, patch sampling, augmentation, schedule.

- :func:`split_indices`: hold out images for validation at random, as a contiguous tail (in
  natural order of the image ids), or by *group* (a regular expression on the image ids names the
  volume or source an image comes from; a group never straddles the split);
- :class:`PatchSampler`: training patches of ``patch`` pixels (of images or volumes); in every batch a share
  (``fg_fraction``, default a third) is centred on a labelled pixel of a foreground class drawn
  uniformly, so that small classes are seen; images no larger than the patch are taken whole
  (the foreground draw then picks an image that holds the class);
- :func:`augment`: flips and 90-degree turns, intensity scale/shift, a small random affine (images);
  :func:`flip_axes`: flips along every spatial axis (volumes);
- :func:`lr_factor`: linear warm-up, then poly or cosine decay.

Everything random draws from a :class:`numpy.random.Generator` the caller seeds.
"""

from __future__ import annotations

import logging
import math
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from segcore.collection.grouping import compile_pattern, group_of, natural_key
from segcore.errors import ConfigError

log = logging.getLogger(__name__)

#: How the validation images are chosen.
SplitKind = Literal["random", "tail", "group"]
#: Share of every batch centred on a foreground pixel.
FG_FRACTION = 1 / 3
#: Largest rotation (degrees) and relative scale change of the random affine.
AFFINE_DEGREES = 15.0
AFFINE_SCALE = 0.1
#: Probability of the affine, the intensity scale and the intensity shift per sample.
AFFINE_P = 0.3
INTENSITY_P = 0.5
#: Intensity scale factor drawn from ``1 +/- INTENSITY_SCALE``, shift from ``+/- INTENSITY_SHIFT`` (normalised units).
INTENSITY_SCALE = 0.1
INTENSITY_SHIFT = 0.1


def groups_of(ids: Sequence[str], pattern: str) -> list[str]:
    """The group of each image id: the pattern's first capture group (or whole match) found in the
    id by :func:`re.search` (:mod:`segcore.collection.grouping`); an id it does not match is a group
    of its own."""
    rx = compile_pattern(pattern)
    return [group_of(rx, image_id) or image_id for image_id in ids]


def check_group_pattern(ids: Sequence[str], group_pattern: str | None) -> list[str]:
    """Raise :class:`ConfigError` when ``group_pattern`` cannot split ``ids`` by group (none given, it
    matches no id, or it puts every image in one group); returns the ids it does not match (each a
    group of its own)."""
    n = len(ids)
    if not group_pattern:
        raise ConfigError("a group split needs a group pattern (--group-pattern REGEX on the image ids)")
    rx = compile_pattern(group_pattern)
    unmatched = [image_id for image_id in ids if group_of(rx, image_id) is None]
    if len(unmatched) == n:
        raise ConfigError(f"group pattern {group_pattern!r} matches none of the {n} image ids (e.g. {ids[0]!r}), so "
                          "every image would be a group of its own: a split of neighbouring slices that leaks; fix "
                          "the pattern (it is searched in the image id, its first capture group names the group)")
    names = set(groups_of(ids, group_pattern))
    if len(names) < 2:
        raise ConfigError(f"group pattern {group_pattern!r} puts all {n} images in one group ({next(iter(names))!r}); "
                          "a group split needs two or more groups: use --val-split tail for one volume, or "
                          "--val-fraction 0 to train on all of it without validation")
    return unmatched


def split_indices(ids: Sequence[str], *, n_val: int, rng: np.random.Generator, how: SplitKind,
                  group_pattern: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(train_idx, val_idx)``, sorted int64 indices into ``ids``.

    ``random``: ``n_val`` images drawn by ``rng``. ``tail``: the last ``n_val`` ids in natural
    order (a contiguous hold-out of consecutive slices). ``group``: whole groups
    (:func:`groups_of`), drawn by ``rng`` until at least ``n_val`` images are held out, passing
    over a group that would take the count further from ``n_val`` than it is (else one large group
    could hold out nearly everything); at least one group is held out and one stays for training.
    """
    n = len(ids)
    if not 0 < n_val < n:
        raise ConfigError(f"a validation split needs 0 < n_val < {n} images, got {n_val}")
    if how == "random":
        order = rng.permutation(n)
        return np.sort(order[n_val:]), np.sort(order[:n_val])
    if how == "tail":
        order = np.array(sorted(range(n), key=lambda i: natural_key(ids[i])), dtype=np.int64)
        return np.sort(order[:-n_val]), np.sort(order[-n_val:])
    if how != "group":
        raise ConfigError(f"unknown validation split {how!r}; choose random, tail or group")
    unmatched = check_group_pattern(ids, group_pattern)
    if unmatched:
        log.warning("group pattern %r matches %d of %d image ids; each of the other %d (e.g. %r) is a group of its "
                    "own", group_pattern, n - len(unmatched), n, len(unmatched), unmatched[0])
    groups = groups_of(ids, group_pattern)
    names = sorted(set(groups), key=natural_key)
    size = {g: groups.count(g) for g in names}
    held: set[str] = set()
    count = 0
    for g in (names[i] for i in rng.permutation(len(names))):
        if count >= n_val or len(held) == len(names) - 1:
            break
        if abs(count + size[g] - n_val) < abs(count - n_val):  # a group that would overshoot more is passed over
            held.add(g)
            count += size[g]
    if not held:  # every group is larger than twice the target: the smallest one
        smallest = min(names, key=lambda g: (size[g], natural_key(g)))
        held, count = {smallest}, size[smallest]
    if count > 2 * n_val:
        log.warning("group split: %d of %d images held out, more than twice the %d the validation fraction asks: "
                    "the smallest group has %d; more, smaller groups (--group-pattern) split closer to it",
                    count, n, n_val, min(size.values()))
    val = np.array([i for i, g in enumerate(groups) if g in held], dtype=np.int64)
    train = np.array([i for i, g in enumerate(groups) if g not in held], dtype=np.int64)
    return train, val


class PatchSampler:
    """Draws training patches ``(image, y0, x0)`` of a ``(N, H, W)`` label set, or
    ``(volume, z0, y0, x0)`` of a ``(N, D, H, W)`` one.

    Args:
        masks: ``(N, H, W)`` or ``(N, D, H, W)`` integer labels of the training images or volumes
            (0 = background).
        patch: patch side in pixels (every spatial axis), or one side per spatial axis; a side of
            the images no larger than the patch's is taken whole.
        num_classes: number of classes, background included.
        fg_fraction: share of each batch centred on a foreground pixel (rounded per batch).
    """

    def __init__(self, masks: np.ndarray, *, patch: int | Sequence[int], num_classes: int,
                 fg_fraction: float = FG_FRACTION) -> None:
        if masks.ndim not in (3, 4) or masks.shape[0] == 0:
            raise ConfigError(f"a patch sampler needs (N, H, W) or (N, D, H, W) labels with N > 0, got {masks.shape}")
        sides = (patch,) * (masks.ndim - 1) if isinstance(patch, (int, np.integer)) else tuple(patch)
        if len(sides) != masks.ndim - 1 or min(sides) < 1 or not 0.0 <= fg_fraction <= 1.0:
            raise ConfigError(f"patch must be positive (one side, or one per spatial axis of {masks.shape[1:]}) and "
                              f"fg_fraction in [0, 1], got {patch}, {fg_fraction}")
        self.n = masks.shape[0]
        #: Spatial size of the images and of the patches (``(H, W)`` or ``(D, H, W)``).
        self.size = tuple(int(s) for s in masks.shape[1:])
        self.patch = tuple(min(int(p), s) for p, s in zip(sides, self.size))
        self.fg_fraction = fg_fraction
        flat = masks.reshape(-1)
        #: Flat pixel indices per foreground class present (at most a million each, evenly strided).
        self.pixels = {}
        for c in range(1, num_classes):
            where = np.flatnonzero(flat == c)
            if where.size:
                self.pixels[c] = where[:: max(1, -(-where.size // 1_000_000))]

    @property
    def ph(self) -> int:
        """Patch height (pixels)."""
        return self.patch[-2]

    @property
    def pw(self) -> int:
        """Patch width (pixels)."""
        return self.patch[-1]

    def _corner(self, centre: int, side: int, size: int) -> int:
        return int(min(max(centre - side // 2, 0), size - side))

    def batch(self, rng: np.random.Generator, size: int) -> list[tuple]:
        """``size`` patches ``(image, *corner, centred_on_foreground)`` (corner ``y0, x0`` or
        ``z0, y0, x0``); the last ``round(size * fg_fraction)`` are centred on foreground (when the
        set has any)."""
        n_fg = int(round(size * self.fg_fraction)) if self.pixels else 0
        out: list[tuple] = []
        for i in range(size):
            if i >= size - n_fg:
                classes = sorted(self.pixels)
                c = classes[int(rng.integers(len(classes)))]
                p = int(self.pixels[c][int(rng.integers(self.pixels[c].size))])
                img, *centre = (int(v) for v in np.unravel_index(p, (self.n, *self.size)))
                corner = [self._corner(m, side, s) for m, side, s in zip(centre, self.patch, self.size)]
                out.append((img, *corner, True))
            else:
                img = int(rng.integers(self.n))
                corner = [int(rng.integers(s - side + 1)) for side, s in zip(self.patch, self.size)]
                out.append((img, *corner, False))
        return out

    def crop(self, x: torch.Tensor, y: torch.Tensor, picks: Sequence[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
        """The patches ``picks`` (from :meth:`batch`) of ``x (N, C, *size)`` inputs and ``y (N, *size)``
        labels: ``(B, C, *patch)`` and ``(B, *patch)``."""
        windows = [(pick[0], tuple(slice(a, a + side) for a, side in zip(pick[1:-1], self.patch))) for pick in picks]
        return (torch.stack([x[(i, slice(None), *w)] for i, w in windows]),
                torch.stack([y[(i, *w)] for i, w in windows]))


def _affine(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A small random rotation + scale of ``x (C, H, W)`` (bilinear, border) and ``y (H, W)`` (nearest)."""
    angle = math.radians(rng.uniform(-AFFINE_DEGREES, AFFINE_DEGREES))
    s = 1.0 + rng.uniform(-AFFINE_SCALE, AFFINE_SCALE)
    cos, sin = math.cos(angle) / s, math.sin(angle) / s
    theta = torch.tensor([[[cos, -sin, 0.0], [sin, cos, 0.0]]], dtype=torch.float32)
    grid = F.affine_grid(theta, [1, x.shape[0], x.shape[1], x.shape[2]], align_corners=False)
    xo = F.grid_sample(x[None].float(), grid, mode="bilinear", padding_mode="border", align_corners=False)[0]
    yo = F.grid_sample(y[None, None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False)[0, 0]
    return xo.to(x.dtype), yo.round().to(y.dtype)


def augment(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator, *, full: bool = True
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment a batch: ``x (B, C, H, W)`` float inputs and ``y (B, H, W)`` labels alike.

    Per sample: a random 90-degree turn (square patches; else 0 or 180) and a horizontal flip;
    with ``full`` also, each with its probability, a small affine (:data:`AFFINE_DEGREES`,
    :data:`AFFINE_SCALE`), an intensity scale and an intensity shift (inputs only).
    """
    square = x.shape[-1] == x.shape[-2]
    xs, ys = [], []
    for xi, yi in zip(x, y):
        k = int(rng.integers(0, 4)) if square else 2 * int(rng.integers(0, 2))
        flip = bool(rng.integers(0, 2))
        xi, yi = torch.rot90(xi, k, dims=(-2, -1)), torch.rot90(yi, k, dims=(-2, -1))
        if flip:
            xi, yi = xi.flip(-1), yi.flip(-1)
        if full:
            draws = rng.random(3)
            if draws[0] < AFFINE_P:
                xi, yi = _affine(xi, yi, rng)
            if draws[1] < INTENSITY_P:
                xi = xi * float(1.0 + rng.uniform(-INTENSITY_SCALE, INTENSITY_SCALE))
            if draws[2] < INTENSITY_P:
                xi = xi + float(rng.uniform(-INTENSITY_SHIFT, INTENSITY_SHIFT))
        xs.append(xi)
        ys.append(yi)
    return torch.stack(xs), torch.stack(ys)


def flip_axes(x: torch.Tensor, y: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip each sample of a batch along each spatial axis with probability 1/2 (inputs and
    labels alike): ``x (B, C, *S)`` float inputs, ``y (B, *S)`` labels, any number of spatial axes
    (three for volumes: z, y and x)."""
    spatial = y.ndim - 1
    xs, ys = [], []
    for xi, yi in zip(x, y):
        dims = [a for a, flip in enumerate(rng.integers(0, 2, size=spatial)) if flip]
        if dims:
            xi, yi = xi.flip([d + 1 for d in dims]), yi.flip(dims)
        xs.append(xi)
        ys.append(yi)
    return torch.stack(xs), torch.stack(ys)


def lr_factor(step: int, *, total: int, warmup: int, kind: Literal["poly", "cosine"]) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based) of ``total``.

    Linear warm-up over the first ``warmup`` steps (``(step + 1) / warmup``), then ``poly``:
    ``(1 - t) ** 0.9`` or ``cosine``: ``0.5 * (1 + cos(pi t))``, with ``t`` the share of the
    remaining steps done (0 at the end of warm-up, 1 at ``total``).
    """
    if step < warmup:
        return (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "poly":
        return (1.0 - t) ** 0.9
    if kind == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    raise ConfigError(f"unknown schedule {kind!r}; choose poly or cosine")


__all__ = ["FG_FRACTION", "PatchSampler", "SplitKind", "augment", "flip_axes", "groups_of", "lr_factor",
           "natural_key", "split_indices"]
