"""Synthetic large images (thousands of pixels a side) for tiling tests and benchmarks.

:func:`make_large_sample` draws the objects of :mod:`segcore.synthetic` (discs and squares, or
nuclei) over a background made without full-size filters, so that gigapixel images stay cheap.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import gaussian_filter, zoom

from segcore.errors import ConfigError
from segcore.synthetic import (MIN_INSTANCE_PIXELS, MIN_SIZE, NUCLEUS_AXES, TOUCH_FRACTION, draw_disc, draw_square,
                               local_coords)


def _large_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Float32 background of any size, like :func:`segcore.synthetic.make_sample`'s (blobs about 1/10 of 256 px, gradient,
    grain) but made without full-size filters so that gigapixel images stay cheap."""
    coarse = rng.normal(size=(height // 32 + 2, width // 32 + 2)).astype(np.float32)
    blobs = zoom(gaussian_filter(coarse, 0.8), 32, order=1, prefilter=False)[:height, :width]
    blobs /= max(float(blobs.std()), 1e-6)
    out = 55.0 + rng.uniform(8, 14) * blobs
    yy = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None]
    xx = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :]
    angle = rng.uniform(0, 2 * np.pi)
    out += np.float32(rng.uniform(-25, 25)) * (xx * np.float32(np.cos(angle)) + yy * np.float32(np.sin(angle)))
    out += rng.standard_normal(size=(height, width), dtype=np.float32) * np.float32(rng.uniform(3, 6))
    return out


def make_large_sample(rng: np.random.Generator, *, height: int, width: int, kind: str = "semantic",
                      per_128: float = 6.0) -> tuple[np.ndarray, np.ndarray]:
    """A large synthetic image (e.g. 4096 x 4096 or more) with objects like the small samples'.

    ``kind="semantic"``: discs and squares as in :func:`make_sample`, labels ``(H, W) uint8``
    classes; ``kind="instance"``: nuclei as in :func:`make_instance_sample`, labels ``(H, W)
    uint32`` instance ids ``1..K`` (objects cut by the image border included, later objects hide
    earlier ones, a third placed against an earlier one). ``per_128`` objects per 128 x 128 px on
    average. Each object is drawn only inside its own box, so the cost grows with the image area,
    not with area times objects. Returns ``(image uint8, labels)``.
    """
    if kind not in ("semantic", "instance"):
        raise ConfigError(f"kind must be 'semantic' or 'instance', got {kind!r}")
    if height < MIN_SIZE or width < MIN_SIZE:
        raise ConfigError(f"height and width must be >= {MIN_SIZE} pixels, got {height} x {width}")
    img = _large_background(rng, height, width)
    labels = np.zeros((height, width), dtype=np.uint8 if kind == "semantic" else np.uint32)
    n = int(round(per_128 * height * width / 128**2))
    placed: list[tuple[float, float, float]] = []
    k = 0
    for i in range(n):
        if kind == "semantic":
            a = rng.uniform(0.05, 0.10) * 128
            b = a * rng.uniform(0.75, 1.0)
        else:
            a = rng.uniform(*NUCLEUS_AXES)
            b = a * rng.uniform(0.6, 1.0)
        if placed and rng.random() < TOUCH_FRACTION:
            oy, ox, ob = placed[int(rng.integers(0, len(placed)))]
            ang = rng.uniform(0, 2 * np.pi)
            dist = (ob + b) * rng.uniform(0.9, 1.05)
            cy, cx = oy + dist * np.sin(ang), ox + dist * np.cos(ang)
        else:
            cy, cx = rng.uniform(-0.01, 1.01) * (height - 1), rng.uniform(-0.01, 1.01) * (width - 1)
        r = int(np.ceil(1.5 * a)) + 1
        y0, y1 = max(0, int(cy) - r), min(height, int(cy) + r + 2)
        x0, x1 = max(0, int(cx) - r), min(width, int(cx) + r + 2)
        if y0 >= y1 or x0 >= x1:
            continue
        placed.append((cy, cx, b))
        obj = {"a": a, "b": b, "theta": rng.uniform(0, np.pi), "cy": cy - y0, "cx": cx - x0}
        view, lab = img[y0:y1, x0:x1], labels[y0:y1, x0:x1]
        if kind == "semantic":
            draw = draw_disc if rng.random() < 0.5 else draw_square
            sub = view.astype(np.float64)
            draw(sub, lab, rng, obj)
            view[...] = sub
            continue
        u, v = local_coords(view.shape, obj["cy"], obj["cx"], obj["theta"])
        d2 = (u / a) ** 2 + (v / b) ** 2
        inside = d2 <= 1.0
        if inside.sum() < MIN_INSTANCE_PIXELS:
            continue
        k += 1
        level = rng.uniform(145.0, 220.0)
        view[inside] = level * (0.6 + 0.4 * np.sqrt(np.clip(1.0 - d2[inside], 0.0, 1.0))) + rng.normal(
            0.0, 6.0, size=int(inside.sum()))
        lab[inside] = k
    img += rng.standard_normal(size=img.shape, dtype=np.float32) * np.float32(rng.uniform(4.0, 8.0))
    if kind == "instance":
        # Objects hidden (or cut below the minimum) by later ones are dropped; ids stay 1..K.
        counts = np.bincount(labels.ravel(), minlength=k + 1)
        keep = counts >= MIN_INSTANCE_PIXELS
        keep[0] = True
        remap = np.where(keep, np.cumsum(keep) - 1, 0).astype(np.uint32)
        labels = remap[labels]
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), labels


__all__ = ["make_large_sample"]
