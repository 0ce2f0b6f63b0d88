"""Input normalisation, described by data (it travels in a checkpoint's metadata).

A batch of raw images ``(N, H, W, C)`` of any integer or float dtype becomes a float32 tensor
``(N, C, H, W)`` ready for the model. Two modes:

- ``percentile``: per image and channel, values between the ``low`` and ``high`` percentiles
  map linearly to 0..1 (robust for 16-bit microscopy whose range is far below 65535);
- ``range``: values are divided by ``scale`` (e.g. 255 for 8-bit data).

Then ``(x - mean) / std`` per channel, if given.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, model_validator


#: Per-channel ``(low, high)`` percentile values of a whole image (:func:`percentile_stats`).
Stats = tuple[tuple[float, ...], tuple[float, ...]]


class Normalisation(BaseModel):
    """How raw pixel values become model inputs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["percentile", "range"] = "percentile"
    low: float = 1.0
    high: float = 99.8
    scale: float = 255.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @model_validator(mode="after")
    def _check(self) -> "Normalisation":
        if self.mode == "percentile" and not 0.0 <= self.low < self.high <= 100.0:
            raise ValueError(f"percentiles need 0 <= low < high <= 100, got low={self.low}, high={self.high}")
        if self.mode == "range" and self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {self.std}")
        return self


def percentile_stats(pixels: np.ndarray, norm: Normalisation) -> Stats:
    """The ``(low, high)`` percentile values per channel of ``(..., C)`` pixels (e.g. a sample
    of a large image), to pass as ``stats`` to :func:`normalise_batch`."""
    flat = np.asarray(pixels).reshape(-1, pixels.shape[-1]).astype(np.float32)
    lo, hi = np.percentile(flat, [norm.low, norm.high], axis=0)
    return tuple(float(v) for v in lo), tuple(float(v) for v in hi)


def normalise_batch(images: np.ndarray, norm: Normalisation, *,
                    stats: Stats | None = None) -> torch.Tensor:
    """Normalise ``(N, H, W, C)`` raw images into a float32 ``(N, C, H, W)`` tensor.

    ``stats`` (percentile mode): per-channel ``(low, high)`` values to use for every image
    instead of each image's own percentiles, e.g. those of the whole large image a tile comes
    from (:func:`percentile_stats`).
    """
    if images.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) images, got shape {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).permute(0, 3, 1, 2)
    if norm.mode == "percentile":
        n, c = x.shape[:2]
        if stats is None:
            lo, hi = np.percentile(x.reshape(n, c, -1).numpy(), [norm.low, norm.high], axis=2)  # each (N, C)
        else:
            lo = np.broadcast_to(np.asarray(stats[0], dtype=np.float64), (n, c))
            hi = np.broadcast_to(np.asarray(stats[1], dtype=np.float64), (n, c))
        lo_t = torch.from_numpy(lo.astype(np.float32))[:, :, None, None]
        span = torch.from_numpy(np.maximum(hi - lo, 1e-6).astype(np.float32))[:, :, None, None]
        x = (x - lo_t) / span
    else:
        x = x / norm.scale
    if norm.mean is not None:
        if len(norm.mean) != x.shape[1]:
            raise ValueError(f"normalisation has {len(norm.mean)} mean/std values but the images have "
                             f"{x.shape[1]} channel(s)")
        mean = torch.tensor(norm.mean, dtype=torch.float32)[None, :, None, None]
        std = torch.tensor(norm.std, dtype=torch.float32)[None, :, None, None]
        x = (x - mean) / std
    return x.contiguous()
