"""Input handling every trainer shares: image (and volume) layout, the seeded validation split, reserved options."""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from segcore.errors import ConfigError

#: Builder options a trainer derives from the data (channels of the images, number of class names).
RESERVED_ARCH_KEYS = ("in_channels", "num_classes")


def as_nhwc(images: np.ndarray) -> np.ndarray:
    """``(N, H, W, C)`` images as given, ``(N, H, W)`` as ``(N, H, W, 1)`` (a view); other ranks refused."""
    images = np.asarray(images)
    if images.ndim == 3:
        return images[..., None]
    if images.ndim != 4:
        raise ConfigError(f"images must be (N, H, W, C) or (N, H, W), got shape {images.shape}")
    return images


def as_ndhwc(volumes: np.ndarray) -> np.ndarray:
    """``(N, D, H, W, C)`` volumes as given, ``(N, D, H, W)`` as ``(N, D, H, W, 1)`` (a view); other ranks refused."""
    volumes = np.asarray(volumes)
    if volumes.ndim == 4:
        return volumes[..., None]
    if volumes.ndim != 5:
        raise ConfigError(f"volumes must be (N, D, H, W, C) or (N, D, H, W), got shape {volumes.shape}")
    return volumes


def seeded_split(n: int, n_val: int, seed: int) -> tuple[np.random.Generator, np.ndarray, np.ndarray]:
    """``(rng, train_idx, val_idx)``: ``n_val`` of ``n`` images held out by a generator seeded with
    ``seed`` (indices sorted); the generator goes on to drive the augmentation."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    return rng, np.sort(order[n_val:]), np.sort(order[:n_val])


def check_refit(refit: bool, val_fraction: float) -> None:
    """Refuse a refit (``Recipe.refit``: train again on every image after a run with a validation
    split) when ``val_fraction`` is 0: there is no split to run first, and every image is trained on already."""
    if refit and val_fraction == 0:
        raise ConfigError("refit (--refit) trains again on every image after a run with a validation split, and "
                          "val_fraction 0 (--val-fraction 0) holds out none, so every image is trained on already: "
                          "leave out refit, or give val_fraction above 0")


def check_semantic_inputs(
    images: np.ndarray,
    masks: np.ndarray,
    *,
    class_names: Sequence[str],
    arch_kwargs: Mapping[str, Any],
    epochs: int,
    batch_size: int,
    lr: float,
    val_fraction: float,
    time_budget_s: float | None,
    refit: bool = False,
    noun: str = "image",
) -> tuple[int, int]:
    """Validate the arguments of :func:`segcore.training.semantic.fit_semantic_arrays`; returns ``(n_train, n_val)``.
    ``images`` are channel-last, ``(N, H, W, C)`` images or ``(N, D, H, W, C)`` volumes (``noun``).
    ``val_fraction`` 0 holds out nothing (``n_val`` 0); any fraction above 0 holds out at least one.
    ``refit`` (``Recipe.refit``) needs a validation split (:func:`check_refit`)."""
    n = images.shape[0]
    if masks.shape != images.shape[:-1]:
        layout, sides = (("(N, H, W)", "height and width") if images.ndim == 4
                         else ("(N, D, H, W)", "depth, height and width"))
        raise ConfigError(
            f"masks must be {layout} matching {noun}s {images.shape[:-1]}, got {masks.shape}; "
            f"give one class map per {noun}, same {sides}"
        )
    if not np.issubdtype(masks.dtype, np.integer):
        raise ConfigError(f"masks must hold integer class labels, got dtype {masks.dtype}")
    if len(class_names) < 2:
        raise ConfigError(f"class_names needs background plus at least one class, got {tuple(class_names)}")
    if masks.size and (int(masks.min()) < 0 or int(masks.max()) >= len(class_names)):
        raise ConfigError(
            f"mask labels must lie in [0, {len(class_names)}) for class_names {tuple(class_names)}, "
            f"got min {int(masks.min())}, max {int(masks.max())}; add the missing class names or fix the masks"
        )
    clash = sorted(set(arch_kwargs) & set(RESERVED_ARCH_KEYS))
    if clash:
        raise ConfigError(f"arch_kwargs must not set {clash}: they follow from the images and class_names")
    if int(epochs) != epochs or epochs < 1:
        raise ConfigError(f"epochs must be a positive integer, got {epochs!r}")
    if int(batch_size) != batch_size or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must lie in [0, 1): the share of the {noun}s held out for validation, 0 for "
                          f"none (train on every {noun} and keep the last epoch); got {val_fraction!r}")
    if time_budget_s is not None and not time_budget_s > 0:
        raise ConfigError(f"time_budget_s must be > 0 seconds or None (no limit), got {time_budget_s!r}")
    check_refit(refit, val_fraction)
    return split_counts(n, val_fraction, noun=noun)


def split_counts(n: int, val_fraction: float, *, noun: str = "image") -> tuple[int, int]:
    """``(n_train, n_val)`` of ``n`` images (or volumes: ``noun``) under ``val_fraction``; raises
    :class:`ConfigError` when none would be left for training."""
    n_val = max(1, int(round(n * val_fraction))) if val_fraction > 0 else 0
    n_train = n - n_val
    if n < 1:
        raise ConfigError(f"no {noun}s to train on; give at least one {noun} with its mask")
    if n_train < 1:  # with n = 1: validation holds out at least one, whatever the fraction above 0
        if n == 1:
            raise ConfigError(
                f"1 {noun} leaves none for training after a validation split of {val_fraction}: any fraction above "
                f"0 holds out at least one {noun}, so give at least 2 {noun}s, or a validation fraction of 0 "
                f"(--val-fraction 0) to train on it without validation and keep the last epoch")
        raise ConfigError(
            f"a validation fraction of {val_fraction} holds out all {n} {noun}s, leaving none for training: give "
            f"a smaller one (--val-fraction, e.g. 0.15), or 0 to train on every {noun} without validation")
    return n_train, n_val


__all__ = ["RESERVED_ARCH_KEYS", "as_ndhwc", "as_nhwc", "check_refit", "check_semantic_inputs", "seeded_split",
           "split_counts"]
