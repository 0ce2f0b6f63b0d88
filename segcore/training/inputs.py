"""Input handling every trainer shares: image (and volume) layout, the seeded validation split, reserved options."""

from __future__ import annotations

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


__all__ = ["RESERVED_ARCH_KEYS", "as_ndhwc", "as_nhwc", "seeded_split"]
