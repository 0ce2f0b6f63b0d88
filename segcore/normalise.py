"""Input normalisation, described by data (it travels in a checkpoint's metadata).

A batch of raw images ``(N, H, W, C)`` of any integer or float dtype becomes a float32 tensor
``(N, C, H, W)`` ready for the model; a batch of volumes ``(N, D, H, W, C)`` becomes
``(N, C, D, H, W)``, each volume treated as one image ("per image" below means per volume). Modes:

- ``percentile``: per image and channel, values between the ``low`` and ``high`` percentiles
  map linearly to 0..1 (robust for 16-bit microscopy whose range is far below 65535);
- ``range``: values are divided by ``scale`` (e.g. 255 for 8-bit data);
- ``window``: values are clipped to the fixed ``window`` ``(lo, hi)`` and mapped linearly to 0..1
  (CT windows in Hounsfield units; named presets in :data:`WINDOW_PRESETS`);
- ``zscore``: ``(x - mean) / std`` with per-channel values of the whole training set;
- ``ct``: clipped per channel to ``[clip_low, clip_high]`` (the 0.5th and 99.5th percentiles of
  the training set's foreground pixels), then ``(x - mean) / std`` with that foreground's mean
  and standard deviation (nnU-Net's CT scheme).

Then ``(x - mean) / std`` per channel, if given (for ``zscore`` and ``ct`` that is the scheme
itself). ``zscore`` and ``ct`` are *fitted* on the training set
(:func:`segcore.normalise_fit.fit_normalisation`) and the fitted values travel in the
checkpoint, so inference applies exactly the transform training used.

Another mode, ``steps``, applies a list of typed operations in order (the preprocessing that a
bioimage.io model package prescribes, see :mod:`segcore.models.bioimage`): ``scale_range``
(percentiles per image, per channel or over all channels), ``zero_mean_unit_variance`` (the
image's own mean and standard deviation), ``fixed_zero_mean_unit_variance`` (given mean/std, e.g.
of a training set), ``scale_linear``, ``clip``, ``binarize`` and ``sigmoid``. Their formulas are
the bioimage.io specification's (an ``eps`` added to the divisor).
"""

from __future__ import annotations

from typing import Annotated, Literal, Union

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from segcore.errors import ConfigError


#: Per-channel ``(low, high)`` percentile values of a whole image (:func:`percentile_stats`).
Stats = tuple[tuple[float, ...], tuple[float, ...]]
#: ImageNet's per-channel mean and standard deviation (RGB, of 0..1 values): what ImageNet-pretrained
#: encoders expect after division by 255.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _Step(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _per_channel(name: str, values: tuple[float, ...], channels: int) -> torch.Tensor:
    """``values`` (one, or one per channel) as a ``(1, C, 1, 1)`` float32 tensor."""
    if len(values) not in (1, channels):
        raise ValueError(f"{name} has {len(values)} values but the images have {channels} channel(s); "
                         "give one value, or one per channel")
    return torch.tensor(values, dtype=torch.float32).reshape(1, -1, 1, 1)


class ScaleRange(_Step):
    """``(x - p_low) / (p_high - p_low + eps)`` with the ``low``/``high`` percentiles of each image,
    per channel (``per_channel``) or over all its channels together."""

    op: Literal["scale_range"] = "scale_range"
    low: float = Field(0.0, ge=0.0, lt=100.0)
    high: float = Field(100.0, gt=0.0, le=100.0)
    per_channel: bool = True
    eps: float = Field(1e-6, gt=0.0)

    @model_validator(mode="after")
    def _order(self) -> "ScaleRange":
        if self.low >= self.high:
            raise ValueError(f"scale_range needs low < high percentiles, got {self.low} and {self.high}")
        return self

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        flat = x.reshape(n, c, -1) if self.per_channel else x.reshape(n, 1, -1)
        lo, hi = np.percentile(flat.numpy(), [self.low, self.high], axis=2)  # each (N, C) or (N, 1)
        lo_t = torch.from_numpy(lo.astype(np.float32))[:, :, None, None]
        hi_t = torch.from_numpy(hi.astype(np.float32))[:, :, None, None]
        return (x - lo_t) / (hi_t - lo_t + self.eps)


class ZeroMeanUnitVariance(_Step):
    """``(x - mean) / (std + eps)`` with each image's own mean and (population) standard deviation,
    per channel (``per_channel``) or over all its channels together."""

    op: Literal["zero_mean_unit_variance"] = "zero_mean_unit_variance"
    per_channel: bool = True
    eps: float = Field(1e-6, gt=0.0)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        dims = (2, 3) if self.per_channel else (1, 2, 3)
        x64 = x.to(torch.float64)
        mean = x64.mean(dim=dims, keepdim=True)
        std = x64.std(dim=dims, keepdim=True, correction=0)
        return ((x64 - mean) / (std + self.eps)).to(torch.float32)


class FixedZeroMeanUnitVariance(_Step):
    """``(x - mean) / (std + eps)`` with fixed values (one, or one per channel), e.g. a training
    set's statistics."""

    op: Literal["fixed_zero_mean_unit_variance"] = "fixed_zero_mean_unit_variance"
    mean: tuple[float, ...] = Field(min_length=1)
    std: tuple[float, ...] = Field(min_length=1)
    eps: float = Field(1e-6, ge=0.0)

    @model_validator(mode="after")
    def _check(self) -> "FixedZeroMeanUnitVariance":
        if len(self.mean) != len(self.std):
            raise ValueError(f"give as many std values as mean values, got {len(self.mean)} and {len(self.std)}")
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {self.std}")
        return self

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        return (x - _per_channel("mean", self.mean, c)) / (_per_channel("std", self.std, c) + self.eps)


class ScaleLinear(_Step):
    """``x * gain + offset`` (one value, or one per channel)."""

    op: Literal["scale_linear"] = "scale_linear"
    gain: tuple[float, ...] = (1.0,)
    offset: tuple[float, ...] = (0.0,)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        return x * _per_channel("gain", self.gain, c) + _per_channel("offset", self.offset, c)


class Clip(_Step):
    """Values below ``min`` become ``min``, above ``max`` become ``max`` (``None``: no bound)."""

    op: Literal["clip"] = "clip"
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> "Clip":
        if self.min is None and self.max is None:
            raise ValueError("clip needs min, max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"clip needs min <= max, got {self.min} > {self.max}")
        return self

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.min, max=self.max)


class Binarize(_Step):
    """1.0 where ``x > threshold`` (one value, or one per channel), else 0.0."""

    op: Literal["binarize"] = "binarize"
    threshold: tuple[float, ...] = Field(min_length=1)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return (x > _per_channel("threshold", self.threshold, x.shape[1])).to(torch.float32)


class Sigmoid(_Step):
    """``1 / (1 + exp(-x))``."""

    op: Literal["sigmoid"] = "sigmoid"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x)


#: One typed intensity operation of a ``steps`` normalisation (told apart by ``op``).
Step = Annotated[Union[ScaleRange, ZeroMeanUnitVariance, FixedZeroMeanUnitVariance, ScaleLinear, Clip, Binarize,
                       Sigmoid], Field(discriminator="op")]


def apply_steps(x: torch.Tensor, steps: tuple[Step, ...]) -> torch.Tensor:
    """Apply ``steps`` in order to a float32 ``(N, C, H, W)`` tensor."""
    for step in steps:
        x = step.apply(x)
    return x.to(torch.float32)


class Normalisation(BaseModel):
    """How raw pixel values become model inputs."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    mode: Literal["percentile", "range", "window", "zscore", "ct", "steps"] = "percentile"
    low: float = 1.0
    high: float = 99.8
    scale: float = 255.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    #: ``steps`` mode only: the operations, applied in order.
    steps: tuple[Step, ...] = ()
    #: ``window`` mode: ``(lo, hi)`` raw values mapped to 0 and 1 (outside: clipped).
    window: tuple[float, float] | None = None
    #: ``window`` mode: the name of the preset the window came from (informational).
    preset: str | None = None
    #: ``ct`` mode: per-channel clip bounds, fitted on the training set's foreground.
    clip_low: tuple[float, ...] | None = None
    clip_high: tuple[float, ...] | None = None

    @model_validator(mode="after")
    def _check(self) -> "Normalisation":
        if (self.mode == "steps") != bool(self.steps):
            raise ValueError("mode 'steps' needs a non-empty steps list, and steps need mode 'steps'")
        if self.mode == "steps" and self.mean is not None:
            raise ValueError("in mode 'steps', give mean/std as a fixed_zero_mean_unit_variance step")
        if self.mode == "percentile" and not 0.0 <= self.low < self.high <= 100.0:
            raise ValueError(f"percentiles need 0 <= low < high <= 100, got low={self.low}, high={self.high}")
        if self.mode == "range" and self.scale <= 0:
            raise ValueError(f"scale must be > 0, got {self.scale}")
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both mean and std, or neither")
        if self.mean is not None and len(self.mean) != len(self.std):
            raise ValueError(f"give one std value per mean value, got {len(self.mean)} and {len(self.std)}")
        if self.std is not None and any(s <= 0 for s in self.std):
            raise ValueError(f"std values must be > 0, got {self.std}")
        if self.mode == "window" and (self.window is None or not self.window[0] < self.window[1]):
            raise ValueError(f"window mode needs window=(lo, hi) with lo < hi, got {self.window}")
        if (self.clip_low is None) != (self.clip_high is None):
            raise ValueError("give both clip_low and clip_high, or neither")
        if self.clip_low is not None and (len(self.clip_low) != len(self.clip_high)
                                          or any(lo > hi for lo, hi in zip(self.clip_low, self.clip_high))):
            raise ValueError(f"clip bounds need one low <= high per channel, got {self.clip_low}, {self.clip_high}")
        return self

    @property
    def fitted(self) -> bool:
        """Whether the transform is complete: ``zscore`` needs mean/std, ``ct`` also its clip bounds
        (both come from :func:`segcore.normalise_fit.fit_normalisation`)."""
        if self.mode == "zscore":
            return self.mean is not None
        if self.mode == "ct":
            return self.mean is not None and self.clip_low is not None
        return True


def percentile_stats(pixels: np.ndarray, norm: Normalisation) -> Stats:
    """The ``(low, high)`` percentile values per channel of ``(..., C)`` pixels (e.g. a sample
    of a large image), to pass as ``stats`` to :func:`normalise_batch`."""
    flat = np.asarray(pixels).reshape(-1, pixels.shape[-1]).astype(np.float32)
    lo, hi = np.percentile(flat, [norm.low, norm.high], axis=0)
    return tuple(float(v) for v in lo), tuple(float(v) for v in hi)


def normalise_batch(images: np.ndarray, norm: Normalisation, *,
                    stats: Stats | None = None) -> torch.Tensor:
    """Normalise ``(N, H, W, C)`` raw images into a float32 ``(N, C, H, W)`` tensor, or
    ``(N, D, H, W, C)`` raw volumes into a float32 ``(N, C, D, H, W)`` tensor.

    Per-image statistics of a volume are those of the whole volume: it is normalised as the
    ``(D * H, W, C)`` image of its stacked slices, and every mode is per image (or per pixel).

    In mode ``steps``, statistics (percentiles, mean, std) are each image's own; ``stats`` is ignored.

    ``stats`` (percentile mode): per-channel ``(low, high)`` values to use for every image
    instead of each image's own percentiles, e.g. those of the whole large image a tile comes
    from (:func:`percentile_stats`).
    """
    if images.ndim == 5:
        n, d, h, w, c = images.shape
        return normalise_batch(images.reshape(n, d * h, w, c), norm, stats=stats).reshape(n, c, d, h, w)
    if images.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) images or (N, D, H, W, C) volumes, got shape {images.shape}")
    x = torch.from_numpy(np.ascontiguousarray(images)).to(torch.float32).permute(0, 3, 1, 2)
    if norm.mode == "steps":
        return apply_steps(x, norm.steps).contiguous()
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
    elif norm.mode == "range":
        x = x / norm.scale
    else:
        x = _fixed_transform(x, norm)
    if norm.mean is not None:
        if len(norm.mean) != x.shape[1]:
            raise ValueError(f"normalisation has {len(norm.mean)} mean/std values but the images have "
                             f"{x.shape[1]} channel(s)")
        mean = torch.tensor(norm.mean, dtype=torch.float32)[None, :, None, None]
        std = torch.tensor(norm.std, dtype=torch.float32)[None, :, None, None]
        x = (x - mean) / std
    return x.contiguous()


def _fixed_transform(x: torch.Tensor, norm: Normalisation) -> torch.Tensor:
    """The ``window``, ``zscore`` and ``ct`` steps before mean/std, on float32 ``(N, C, H, W)``."""
    if not norm.fitted:
        raise ConfigError(f"{norm.mode} normalisation has not been fitted (no mean/std); fit it on the training "
                          "set with segcore.normalise_fit.fit_normalisation, or load it from a checkpoint")
    if norm.mode == "window":
        lo, hi = norm.window
        return (x.clamp(lo, hi) - lo) / (hi - lo)
    if norm.mode == "ct":
        if len(norm.clip_low) != x.shape[1]:
            raise ValueError(f"normalisation has {len(norm.clip_low)} clip bound(s) but the images have "
                             f"{x.shape[1]} channel(s)")
        lo = torch.tensor(norm.clip_low, dtype=torch.float32)[None, :, None, None]
        hi = torch.tensor(norm.clip_high, dtype=torch.float32)[None, :, None, None]
        return torch.minimum(torch.maximum(x, lo), hi)
    return x  # zscore: only (x - mean) / std
