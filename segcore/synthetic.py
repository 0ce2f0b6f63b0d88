"""A synthetic, exactly labelled image collection for demos and end-to-end tests.

Each sample is an ``(H, W)`` uint8 grey image and its ``(H, W)`` uint8 class map
(0 = background, then :data:`CLASS_NAMES` order). The two foreground classes are told apart
by shape and texture, not by brightness: both have a mean near 155 grey levels.

- ``disc``: a filled, near-circular ellipse with a smooth dome profile (brightest at its centre);
- ``square``: a rotated, near-square rectangle filled with stripes and grain.

The background is textured: low-frequency blobs, a linear gradient and fine grain, and the
whole image carries Gaussian noise. Every image shows each foreground class on at least 1 % of
its pixels; its first object crosses the image border and its second one (of the other class)
overlaps the first. Objects are drawn one after another and a later one hides an earlier one,
in the image and in the class map alike, so the class map is exactly what was drawn.

A second, instance-labelled kind of sample (:func:`make_instance_sample`,
:func:`generate_instance_collection`) shows nuclei-like blobs: one class
(:data:`INSTANCE_CLASS_NAMES`), an ``(H, W)`` uint16 instance label image whose ids are
``1..K``, touching objects and objects cut by the image border.
"""

from __future__ import annotations

import functools

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter

from segcore.errors import ConfigError
from segcore.collection.imageio import write_png

log = logging.getLogger(__name__)

#: Class names; index = label value in the class maps.
CLASS_NAMES: tuple[str, ...] = ("background", "disc", "square")
#: Class names of the instance samples: every object is a nucleus (class 1).
INSTANCE_CLASS_NAMES: tuple[str, ...] = ("background", "nucleus")

_DISC, _SQUARE = 1, 2
MIN_SIZE = 32
# Every foreground class covers at least this fraction of an image (re-drawn otherwise, up to
# _MAX_ATTEMPTS times), so that no class is reduced to a sliver hidden under others.
_MIN_VISIBLE_FRACTION = 0.01
_MAX_ATTEMPTS = 20


def _check_size(size: int) -> int:
    if int(size) != size or size < MIN_SIZE:
        raise ConfigError(f"size must be an integer >= {MIN_SIZE} pixels, got {size!r}; use e.g. size=128")
    return int(size)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """``(size, size)`` float64 background: blobs + gradient + grain, around 55 grey levels."""
    blobs = gaussian_filter(rng.normal(size=(size, size)), sigma=size / 10, mode="wrap")
    blobs /= max(float(blobs.std()), 1e-9)
    grain = gaussian_filter(rng.normal(size=(size, size)), sigma=1.2)
    grain /= max(float(grain.std()), 1e-9)
    yy, xx = np.mgrid[0:size, 0:size] / (size - 1) - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    gradient = rng.uniform(-25, 25) * (xx * np.cos(angle) + yy * np.sin(angle))
    return 55.0 + rng.uniform(8, 14) * blobs + gradient + rng.uniform(3, 6) * grain


def local_coords(shape: tuple[int, int], cy: float, cx: float, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates rotated by ``theta`` about ``(cy, cx)``: ``(u, v)`` float64 maps."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    dy, dx = yy - cy, xx - cx
    c, s = np.cos(theta), np.sin(theta)
    return dx * c + dy * s, -dx * s + dy * c


def draw_disc(img: np.ndarray, labels: np.ndarray, rng: np.random.Generator, obj: dict) -> None:
    u, v = local_coords(img.shape, obj["cy"], obj["cx"], obj["theta"])
    d2 = (u / obj["a"]) ** 2 + (v / obj["b"]) ** 2
    inside = d2 <= 1.0
    dome = np.sqrt(np.clip(1.0 - d2[inside], 0.0, 1.0))
    img[inside] = rng.uniform(0.92, 1.08) * (110.0 + 70.0 * dome)
    labels[inside] = _DISC


def draw_square(img: np.ndarray, labels: np.ndarray, rng: np.random.Generator, obj: dict) -> None:
    u, v = local_coords(img.shape, obj["cy"], obj["cx"], obj["theta"])
    inside = (np.abs(u) <= obj["a"]) & (np.abs(v) <= obj["b"])
    phi = rng.uniform(0, np.pi)
    period = rng.uniform(4.0, 7.0)
    wave = np.sin(2 * np.pi * (u[inside] * np.cos(phi) + v[inside] * np.sin(phi)) / period + rng.uniform(0, 2 * np.pi))
    img[inside] = 158.0 + rng.uniform(40, 50) * wave + rng.normal(0.0, 12.0, size=wave.shape)
    labels[inside] = _SQUARE


def _plan_objects(rng: np.random.Generator, size: int) -> list[dict]:
    """Objects to draw, in drawing order: class, centre, half-sizes ``a >= b`` (pixels), angle."""
    n = int(rng.integers(5, 10) * (size / 128) ** 2) + 2
    classes = [_DISC, _SQUARE] if rng.random() < 0.5 else [_SQUARE, _DISC]
    classes += [int(c) for c in rng.integers(_DISC, _SQUARE + 1, size=n - 2)]
    objects: list[dict] = []
    for i, cls in enumerate(classes):
        a = rng.uniform(0.05, 0.10) * size
        b = a * rng.uniform(0.75, 1.0)
        obj = {"cls": cls, "a": a, "b": b, "theta": rng.uniform(0, np.pi)}
        if i == 0:
            # On the border line: its inscribed disc (radius b) crosses the border.
            along = rng.uniform(0.2, 0.8) * (size - 1)
            edge = float(rng.choice([0.0, size - 1.0])) + rng.uniform(-0.3, 0.3) * b
            obj["cy"], obj["cx"] = (along, edge) if rng.random() < 0.5 else (edge, along)
        elif i == 1 or rng.random() < 0.3:
            # Closer than the sum of the inscribed radii: the two objects overlap.
            other = objects[0] if i == 1 else objects[int(rng.integers(0, i))]
            dist = (other["b"] + b) * rng.uniform(0.7, 0.95)
            ang = rng.uniform(0, 2 * np.pi)
            obj["cy"], obj["cx"] = other["cy"] + dist * np.sin(ang), other["cx"] + dist * np.cos(ang)
        else:
            obj["cy"], obj["cx"] = rng.uniform(-0.05, 1.05, size=2) * (size - 1)
        objects.append(obj)
    return objects


def make_sample(rng: np.random.Generator, *, size: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image and its exact class map.

    Args:
        rng: the random source (the sample is a pure function of its state).
        size: side length in pixels (>= 32).

    Returns:
        ``(image, classes)``: ``(size, size)`` uint8 grey levels and ``(size, size)`` uint8
        labels in ``[0, len(CLASS_NAMES))``.
    """
    size = _check_size(size)
    background = _background(rng, size)
    min_pixels = _MIN_VISIBLE_FRACTION * size * size
    for _ in range(_MAX_ATTEMPTS):
        img = background.copy()
        labels = np.zeros((size, size), dtype=np.uint8)
        for obj in _plan_objects(rng, size):
            draw = draw_disc if obj["cls"] == _DISC else draw_square
            draw(img, labels, rng, obj)
        visible = np.bincount(labels.ravel(), minlength=len(CLASS_NAMES))[1:]
        if visible.min() >= min_pixels:
            break
    img += rng.normal(0.0, rng.uniform(5.0, 9.0), size=img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels


def generate_collection(
    out_dir: str | os.PathLike[str], *, n_images: int = 360, size: int = 128, seed: int = 0
) -> list[str]:
    """Write a synthetic collection: ``out_dir/images/<id>.png`` and ``out_dir/masks/<id>.png``.

    Images are ``(size, size)`` 8-bit grey PNGs; masks are ``(size, size)`` 8-bit PNGs of class
    labels (see :data:`CLASS_NAMES`). An image and its mask share a file name, the image id
    (``img-00000``, ``img-00001``, ...). The files are a pure function of ``seed``, ``size`` and
    ``n_images`` (image ``i`` does not depend on ``n_images``).

    Returns:
        The image ids, in order.
    """
    if int(n_images) != n_images or n_images < 1:
        raise ConfigError(f"n_images must be a positive integer, got {n_images!r}")
    size = _check_size(size)
    out = Path(out_dir)
    return _write_collection(out, make_sample, n_images=n_images, size=size, seed=seed, what="")


def _write_collection(out: Path, make: Any, *, n_images: int, size: int, seed: int, what: str) -> list[str]:
    """Write ``images/img-NNNNN.png`` and ``masks/img-NNNNN.png`` from ``make(rng, size=size)``,
    one independent random stream per image; returns the ids."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    ids = []
    for i, stream in enumerate(np.random.SeedSequence(seed).spawn(int(n_images))):
        image, labels = make(np.random.default_rng(stream), size=size)
        image_id = f"img-{i:05d}"
        write_png(out / "images" / f"{image_id}.png", image)
        write_png(out / "masks" / f"{image_id}.png", labels)
        ids.append(image_id)
    log.info("wrote %d synthetic %dx%d %simages and masks under %s", len(ids), size, size, what, out)
    return ids


# --------------------------------------------------------------------------------------------
# instance samples: nuclei-like blobs

# Object counts per 128 x 128 pixels (scaled with the image area) and semi-axes in pixels.
_NUCLEI_PER_128 = (5, 20)
NUCLEUS_AXES = (5.0, 11.0)
# An object left with fewer visible pixels than this (hidden by later ones or cut by the
# border) is dropped before the image is drawn, so no label is a sliver.
MIN_INSTANCE_PIXELS = 12
TOUCH_FRACTION = 0.3  # share of the objects placed against an earlier one


def _free_centre(rng: np.random.Generator, size: int) -> tuple[float, float]:
    """A centre anywhere in the image or a little past its border: ``(cy, cx)`` pixels."""
    cy, cx = rng.uniform(-0.03, 1.03, size=2) * (size - 1)
    return float(cy), float(cx)


def _ellipse_radius(obj: dict, angle: float) -> float:
    """Distance (pixels) from an ellipse's centre to its rim in direction ``angle`` (radians)."""
    phi = angle - obj["theta"]
    return float(obj["a"] * obj["b"] / np.hypot(obj["b"] * np.cos(phi), obj["a"] * np.sin(phi)))


Scale = float | tuple[float, float]


def _check_scale(scale: Scale) -> tuple[float, float]:
    """``(lo, hi)`` of a scale given as one number or as a range; refused outside [0.25, 8]."""
    try:
        lo, hi = (float(scale), float(scale)) if np.isscalar(scale) else (float(scale[0]), float(scale[1]))
        if not np.isscalar(scale) and len(scale) != 2:
            raise ValueError
    except (TypeError, ValueError, IndexError):
        raise ConfigError(f"scale (of the nuclei's size) must be a number or a range (lo, hi), got {scale!r}") from None
    if not (0.25 <= lo <= hi <= 8.0):
        raise ConfigError(f"scale (of the nuclei's size) must be a number or a range (lo, hi) with "
                          f"0.25 <= lo <= hi <= 8, got {scale}")
    return float(lo), float(hi)


def _plan_nuclei(rng: np.random.Generator, size: int, scale: tuple[float, float] = (1.0, 1.0)) -> list[dict]:
    """Nuclei to draw, in drawing order: centre, semi-axes ``a >= b`` (pixels), angle, brightness.
    With a range of scales each nucleus draws its own, log-uniformly (one number: no draw)."""
    low, high = _NUCLEI_PER_128
    lo, hi = scale
    typical = lo if lo == hi else float(np.sqrt(lo * hi))
    n = max(2, int(round(int(rng.integers(low, high + 1)) * (size / 128) ** 2 / typical)))
    objects: list[dict] = []
    for i in range(n):
        own = lo if lo == hi else float(np.exp(rng.uniform(np.log(lo), np.log(hi))))
        a = rng.uniform(*NUCLEUS_AXES) * own
        b = a * rng.uniform(0.6, 1.0)
        obj = {"a": a, "b": b, "theta": rng.uniform(0, np.pi), "level": rng.uniform(145.0, 220.0)}
        if i == 0:
            # Centre within a third of its short semi-axis of the border line: cut by the border.
            along = rng.uniform(0.15, 0.85) * (size - 1)
            edge = float(rng.choice([0.0, size - 1.0])) + rng.uniform(-0.3, 0.3) * b
            obj["cy"], obj["cx"] = (along, edge) if rng.random() < 0.5 else (edge, along)
        elif i == 1 or rng.random() < TOUCH_FRACTION:
            # Against an earlier object, overlapping it by a little: the two share a border.
            other = objects[int(rng.integers(0, i))]
            ang = rng.uniform(0, 2 * np.pi)
            reach = _ellipse_radius(other, ang) + _ellipse_radius(obj, ang)
            dist = reach * rng.uniform(0.85, 0.97)
            cy, cx = other["cy"] + dist * np.sin(ang), other["cx"] + dist * np.cos(ang)
            inside = 0.0 <= cy <= size - 1.0 and 0.0 <= cx <= size - 1.0
            obj["cy"], obj["cx"] = (cy, cx) if inside else _free_centre(rng, size)
        else:
            obj["cy"], obj["cx"] = _free_centre(rng, size)
        objects.append(obj)
    return objects


def _paint_nuclei(objects: list[dict], size: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """``(size, size)`` int64 owner map (index into ``objects``, -1 = background; later objects
    win) and each object's ``(size, size)`` float64 dome profile (1 at its centre, 0 at its rim)."""
    owner = np.full((size, size), -1, dtype=np.int64)
    domes = []
    for j, obj in enumerate(objects):
        u, v = local_coords((size, size), obj["cy"], obj["cx"], obj["theta"])
        d2 = (u / obj["a"]) ** 2 + (v / obj["b"]) ** 2
        owner[d2 <= 1.0] = j
        domes.append(np.sqrt(np.clip(1.0 - d2, 0.0, 1.0)))
    return owner, domes


def make_instance_sample(rng: np.random.Generator, *, size: int = 128, scale: Scale = 1.0
                         ) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image of nuclei-like blobs and its exact instance labels.

    Each nucleus is a filled ellipse (semi-axes 5-11 px) with a smooth dome of intensity
    (brightest at its centre, about 60 % of that at its rim) and a little grain, on the textured
    background of :func:`make_sample`; Gaussian noise covers the whole image. A 128 x 128 image
    holds 5-20 nuclei (scaled with the image area, at least 2); the first one is cut by the image
    border and about half of the others are placed against an earlier one, overlapping it a
    little, so that the two share a border (the later one wins the shared pixels). Objects left
    with fewer than 12 visible pixels are dropped before drawing, so every label is drawn.

    Args:
        rng: the random source (the sample is a pure function of its state).
        size: side length in pixels (>= 32).
        scale: size of the nuclei: semi-axes times ``scale`` and nuclei per image divided by
            ``scale``, so larger nuclei also cover more of the image (about ``scale`` times as
            much), as crowded real nuclei do; for matching the size of real nuclei. 1 draws
            exactly what earlier versions drew. A range ``(lo, hi)`` gives each nucleus its own
            scale, drawn log-uniformly from it, and divides the count by ``sqrt(lo * hi)``:
            nuclei of mixed sizes in one image.

    Returns:
        ``(image, labels)``: ``(size, size)`` uint8 grey levels and ``(size, size)`` uint16
        instance ids, 0 = background and ``1..K`` in drawing order (consecutive).
    """
    size = _check_size(size)
    scale = _check_scale(scale)
    background = _background(rng, size)
    objects = _plan_nuclei(rng, size, scale)
    while True:
        owner, domes = _paint_nuclei(objects, size)
        visible = np.bincount(owner[owner >= 0], minlength=len(objects))
        keep = visible >= MIN_INSTANCE_PIXELS
        if keep.all():
            break
        objects = [obj for obj, k in zip(objects, keep) if k]
    img = background
    for j, obj in enumerate(objects):
        inside = owner == j
        grain = rng.normal(0.0, 6.0, size=int(inside.sum()))
        img[inside] = obj["level"] * (0.6 + 0.4 * domes[j][inside]) + grain
    img += rng.normal(0.0, rng.uniform(4.0, 8.0), size=img.shape)
    labels = (owner + 1).astype(np.uint16)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels


def generate_instance_collection(
    out_dir: str | os.PathLike[str], *, n_images: int = 200, size: int = 128, seed: int = 0, scale: Scale = 1.0
) -> list[str]:
    """Write a synthetic instance collection: ``out_dir/images/<id>.png`` and ``out_dir/masks/<id>.png``.

    Images are ``(size, size)`` 8-bit grey PNGs; masks are ``(size, size)`` 16-bit grey PNGs of
    instance ids (0 = background, ``1..K``; every object is class 1, see
    :data:`INSTANCE_CLASS_NAMES`). Ids and determinism as in :func:`generate_collection`: image
    ``i`` is a pure function of ``seed``, ``size``, ``scale`` (see :func:`make_instance_sample`) and ``i``.

    Returns:
        The image ids (``img-00000``, ...), in order.
    """
    if int(n_images) != n_images or n_images < 1:
        raise ConfigError(f"n_images must be a positive integer, got {n_images!r}")
    size = _check_size(size)
    out = Path(out_dir)
    make = functools.partial(make_instance_sample, scale=_check_scale(scale))
    return _write_collection(out, make, n_images=n_images, size=size, seed=seed, what="instance ")


__all__ = [
    "CLASS_NAMES",
    "INSTANCE_CLASS_NAMES",
    "generate_collection",
    "generate_instance_collection",
    "make_instance_sample",
    "make_sample",
]
