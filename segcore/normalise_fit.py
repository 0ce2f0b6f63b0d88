"""Choosing and fitting a normalisation on a training set (the transform itself is :mod:`segcore.normalise`).

- :func:`parse_normalisation` turns a choice such as ``"ct"``, ``"window:abdomen"`` or
  ``"window:-200,300"`` into a :class:`~segcore.normalise.Normalisation` (``"auto"`` stays ``"auto"``);
- :func:`parse_given_normalisation` does the same for a model trained elsewhere, whose fitted values
  are given (``"zscore:MEAN,STD"``, ``"ct:LO,HI,MEAN,STD"``);
- :func:`choose_normalisation` resolves ``auto`` from a dataset fingerprint (what ingest recorded
  about the pixel values, :mod:`segcore.collection.fingerprint`) and says why;
- :func:`fit_normalisation` fills the values of the ``zscore`` and ``ct`` schemes from training
  images (``ct``: their foreground pixels, ``masks > 0``). The fitted object is what the checkpoint
  stores, so inference applies exactly the transform training used.

Degenerate data never give NaN: a standard deviation below :data:`MIN_STD` is replaced by 1
(constant data normalise to 0), and ``ct`` without any foreground pixel fits on all pixels.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal, Mapping

import numpy as np

from segcore.errors import ConfigError
from segcore.normalise import IMAGENET_MEAN, IMAGENET_STD, Normalisation

log = logging.getLogger(__name__)

#: Named CT windows ``name -> (lo, hi)`` in Hounsfield units (window width W, level L: L -/+ W/2).
WINDOW_PRESETS: Mapping[str, tuple[float, float]] = {
    "abdomen": (-160.0, 240.0),  # W400 L40
    "liver": (-45.0, 105.0),  # W150 L30
    "lung": (-1350.0, 150.0),  # W1500 L-600
    "bone": (-500.0, 1300.0),  # W1800 L400
    "brain": (0.0, 80.0),  # W80 L40
}
#: The choices ``segflow train --normalisation`` takes, besides ``window:LO,HI`` and ``window:<preset>``.
CHOICES = ("auto", "percentile", "range", "zscore", "ct")
#: A standard deviation below this is replaced by 1 (constant data).
MIN_STD = 1e-6
#: Foreground percentiles the ``ct`` scheme clips to (nnU-Net's).
CT_PERCENTILES = (0.5, 99.5)
#: At most this many pixels per channel enter a fit (an even stride over the selected pixels).
MAX_FIT_PIXELS = 10_000_000
#: ``auto`` takes a signed dataset for CT when its values reach below this and above :data:`CT_MAX_AT_LEAST`.
CT_MIN_AT_MOST = -500.0
CT_MAX_AT_LEAST = 300.0


def parse_normalisation(choice: str) -> Normalisation | Literal["auto"]:
    """``"auto"``, or the :class:`Normalisation` a choice names (unfitted for ``zscore``/``ct``).

    ``window:LO,HI`` is a fixed window; ``window:NAME`` one of :data:`WINDOW_PRESETS`.
    """
    text = choice.strip().lower()
    if text == "auto":
        return "auto"
    if text in ("percentile", "range", "zscore", "ct"):
        return Normalisation(mode=text)
    if text.startswith("window:"):
        arg = text.split(":", 1)[1].strip()
        if arg in WINDOW_PRESETS:
            return Normalisation(mode="window", window=WINDOW_PRESETS[arg], preset=arg)
        try:
            lo, hi = (float(v) for v in arg.split(","))
        except ValueError:
            lo = hi = None
        if lo is None or not lo < hi or not (math.isfinite(lo) and math.isfinite(hi)):
            raise ConfigError(f"window {arg!r} is neither LO,HI with finite LO < HI (e.g. window:-200,300) nor a preset "
                              f"({', '.join(WINDOW_PRESETS)})")
        return Normalisation(mode="window", window=(lo, hi))
    raise ConfigError(f"unknown normalisation {choice!r}; choose one of {', '.join(CHOICES)}, window:LO,HI or "
                      f"window:<{'|'.join(WINDOW_PRESETS)}>")


def _numbers(choice: str, arg: str, count: int, form: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in arg.split(","))
    except ValueError:
        values = ()
    if len(values) != count:
        raise ConfigError(f"normalisation {choice!r}: give {form} ({count} numbers separated by commas)")
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"normalisation {choice!r}: {form} must be finite numbers (no nan or inf)")
    return values


def parse_given_normalisation(choice: str, *, channels: int = 1) -> Normalisation:
    """The complete :class:`Normalisation` a choice names, for a model trained elsewhere (nothing is
    fitted here, so fitted schemes carry their values).

    Choices: ``percentile``; ``range`` (divide by 255); ``imagenet`` (divide by 255, then ImageNet's
    mean/std); ``window:LO,HI`` or ``window:<preset>``; ``zscore:MEAN,STD``; ``ct:LO,HI,MEAN,STD`` (clip to
    LO..HI, then ``(x - MEAN) / STD``, as nnU-Net's CT scheme with its fitted values). The values of
    ``zscore`` and ``ct`` are repeated for each of the model's ``channels``. Raises
    :class:`ConfigError` for anything else.
    """
    text = choice.strip().lower()
    name, _, arg = text.partition(":")
    if name == "imagenet" and not arg:
        return Normalisation(mode="range", scale=255.0, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    if name in ("percentile", "range") and not arg:
        return Normalisation(mode=name)
    if name == "window":
        return parse_normalisation(text)  # type: ignore[return-value]
    if name == "zscore" and arg:
        mean, std = _numbers(choice, arg, 2, "zscore:MEAN,STD")
        if not std > 0:
            raise ConfigError(f"normalisation {choice!r}: STD must be > 0")
        return Normalisation(mode="zscore", mean=(mean,) * channels, std=(std,) * channels)
    if name == "ct" and arg:
        lo, hi, mean, std = _numbers(choice, arg, 4, "ct:LO,HI,MEAN,STD")
        if not lo < hi or not std > 0:
            raise ConfigError(f"normalisation {choice!r}: needs LO < HI and STD > 0")
        return Normalisation(mode="ct", clip_low=(lo,) * channels, clip_high=(hi,) * channels,
                             mean=(mean,) * channels, std=(std,) * channels)
    raise ConfigError(f"normalisation {choice!r} is not one a model from elsewhere can declare; choose percentile, "
                      f"range, imagenet, window:LO,HI, window:<{'|'.join(WINDOW_PRESETS)}>, zscore:MEAN,STD or "
                      "ct:LO,HI,MEAN,STD (the values its training fitted)")


def choose_normalisation(fingerprint: Mapping[str, Any] | None) -> tuple[Normalisation, str]:
    """The scheme ``auto`` picks for a dataset, and why (one sentence).

    ``fingerprint``: ``{"dtype", "channels", "min", "max", "negative"}`` (see
    :mod:`segcore.collection.fingerprint`); ``None`` when unknown. Rules, in order: signed values
    reaching below -500 and above 300 in one channel look like CT Hounsfield units -> ``ct``; other
    data with negative values -> ``zscore`` over the dataset; everything else -> ``percentile``
    per image (robust for 8/16-bit microscopy and photographs).
    """
    if not fingerprint:
        return Normalisation(), "no dataset fingerprint: per-image percentile normalisation"
    lo, hi, channels = float(fingerprint["min"]), float(fingerprint["max"]), int(fingerprint["channels"])
    where = f"{fingerprint['dtype']}, {channels} channel(s), values {lo:g}..{hi:g}"
    if fingerprint.get("negative") and channels == 1 and lo <= CT_MIN_AT_MOST and hi >= CT_MAX_AT_LEAST:
        return Normalisation(mode="ct"), (f"{where}: signed values spanning Hounsfield units look like CT, so ct "
                                          "(clip to the foreground's 0.5-99.5th percentiles, then its z-score)")
    if fingerprint.get("negative"):
        return Normalisation(mode="zscore"), f"{where}: signed values, so zscore (mean/std over the training set)"
    return Normalisation(), f"{where}: non-negative values, so percentile (1st-99.8th per image)"


def _stats_pixels(images: np.ndarray, select: np.ndarray | None) -> np.ndarray:
    """``(P, C)`` float64 pixels of ``(N, H, W, C)`` images where ``select`` (``(N, H, W)`` bool) holds,
    at most :data:`MAX_FIT_PIXELS` of them by an even stride."""
    flat = images.reshape(-1, images.shape[-1])
    if select is not None:
        flat = flat[select.reshape(-1)]
    step = max(1, -(-flat.shape[0] // MAX_FIT_PIXELS))
    return flat[::step].astype(np.float64)


def _mean_std(pixels: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    mean = pixels.mean(axis=0)
    std = pixels.std(axis=0)
    return tuple(float(m) for m in mean), tuple(float(s) if s >= MIN_STD else 1.0 for s in std)


def fit_normalisation(norm: Normalisation, images: np.ndarray, masks: np.ndarray | None = None) -> Normalisation:
    """``norm`` with the values of its scheme fitted on a training set (other modes: unchanged).

    Args:
        norm: the scheme; ``zscore`` and ``ct`` are fitted, others returned as they are.
        images: ``(N, H, W, C)`` raw training images.
        masks: ``(N, H, W)`` labels, foreground ``> 0`` (``ct`` only; ``None``: every pixel).

    Returns:
        ``zscore``: ``mean``/``std`` per channel over every pixel. ``ct``: over the foreground
        pixels (every pixel when there are none), ``clip_low``/``clip_high`` their 0.5th/99.5th
        percentiles and ``mean``/``std`` their mean and standard deviation (nnU-Net's).
    """
    if norm.mode not in ("zscore", "ct"):
        return norm
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[0] == 0:
        raise ConfigError(f"fitting a normalisation needs (N, H, W, C) images with N > 0, got {images.shape}")
    select = None
    if norm.mode == "ct" and masks is not None:
        select = np.asarray(masks) > 0
        if not select.any():
            log.warning("ct normalisation: the training set has no foreground pixel; fitting on every pixel")
            select = None
    pixels = _stats_pixels(images, select)
    mean, std = _mean_std(pixels)
    if norm.mode == "zscore":
        return norm.model_copy(update={"mean": mean, "std": std})
    lo, hi = np.percentile(pixels, CT_PERCENTILES, axis=0)
    return norm.model_copy(update={"clip_low": tuple(float(v) for v in lo), "clip_high": tuple(float(v) for v in hi),
                                   "mean": mean, "std": std})


def describe(norm: Normalisation) -> str:
    """A short description of a (fitted) scheme, e.g. ``ct (clip -40.2..210.5, mean 95.1, std 48.3)``:
    the values the scheme uses, and no others."""
    def fmt(values: tuple[float, ...] | None) -> str:
        return "/".join(f"{v:.4g}" for v in values or ())

    if norm.mode == "steps":
        return "steps: " + ", ".join(step.op for step in norm.steps)
    if norm.mode == "ct":
        return f"ct (clip {fmt(norm.clip_low)}..{fmt(norm.clip_high)}, mean {fmt(norm.mean)}, std {fmt(norm.std)})"
    if norm.mode == "zscore":
        return f"zscore (mean {fmt(norm.mean)}, std {fmt(norm.std)})"
    if norm.mode == "window":
        text = f"window {norm.window[0]:g}..{norm.window[1]:g}" + (f" ({norm.preset})" if norm.preset else "")
    elif norm.mode == "range":
        text = f"range (divide by {norm.scale:g})"
    else:
        text = f"percentile ({norm.low:g}-{norm.high:g} per image)"
    return text + (f", then mean {fmt(norm.mean)}, std {fmt(norm.std)}" if norm.mean is not None else "")


__all__ = ["CHOICES", "CT_PERCENTILES", "MIN_STD", "WINDOW_PRESETS", "choose_normalisation", "describe",
           "fit_normalisation", "parse_given_normalisation", "parse_normalisation"]
