"""A synthetic, exactly labelled volume collection: the 3-D twin of :mod:`segcore.synthetic`.

Each sample is a ``(D, H, W)`` uint8 grey volume and its ``(D, H, W)`` uint8 class map
(0 = background, then :data:`VOLUME_CLASS_NAMES` order). Voxels are isotropic. The two
foreground classes are told apart by shape and texture in 3-D, not by brightness (both have a
mean near 150 grey levels):

- ``ellipsoid``: a filled, near-spherical ellipsoid, turned at random, with a smooth dome profile
  (brightest at its centre);
- ``box``: a near-cubic box (as many voxels as an ellipsoid of the same semi-axes), turned at
  random in 3-D, filled with stripes (a plane wave of random
  direction) and grain.

The background is textured: low-frequency 3-D blobs, a linear gradient and fine grain, and the
whole volume carries Gaussian noise. Every volume shows each foreground class on at least 1 % of
its voxels; its first object crosses the volume's border and its second one (of the other class)
overlaps the first. Objects are drawn one after another and a later one hides an earlier one, in
the volume and in the class map alike, so the class map is exactly what was drawn.

:func:`generate_volume_collection` writes such volumes as files a user could ingest: NIfTI
(``.nii.gz``, when nibabel is installed: the ``volumes`` extra) or multi-page TIFF.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Literal

import numpy as np
from scipy.ndimage import gaussian_filter

from segcore.errors import ConfigError

log = logging.getLogger(__name__)

#: Class names; index = label value in the class maps.
VOLUME_CLASS_NAMES: tuple[str, ...] = ("background", "ellipsoid", "box")
#: Default volume shape ``(D, H, W)`` in voxels.
DEFAULT_VOLUME_SHAPE: tuple[int, int, int] = (32, 64, 64)
#: Smallest side (voxels) of a synthetic volume.
MIN_SIDE = 16
#: File suffix of each format :func:`generate_volume_collection` writes.
VOLUME_SUFFIXES = {"nifti": ".nii.gz", "tiff": ".tif"}

_ELLIPSOID, _BOX = 1, 2
# Objects per 32 x 64 x 64 voxels (scaled with the volume) and semi-axes as a share of the cube
# root of the volume (about 5 to 9 voxels at 32 x 64 x 64).
_OBJECTS_PER_REFERENCE = (8, 14)
_REFERENCE_VOXELS = 32 * 64 * 64
_SEMI_AXIS_SHARE = (0.10, 0.18)
#: A box's half-sides are this share of its semi-axes: (pi / 6) ** (1 / 3), so that a box and an
#: ellipsoid of the same semi-axes hold the same number of voxels.
BOX_SHARE = float(np.cbrt(np.pi / 6))
# Every foreground class covers at least this fraction of a volume (re-drawn otherwise, up to
# _MAX_ATTEMPTS times), so that no class is reduced to a sliver hidden under others.
_MIN_VISIBLE_FRACTION = 0.01
_MAX_ATTEMPTS = 20


def check_volume_shape(shape: tuple[int, ...]) -> tuple[int, int, int]:
    """``shape`` as three ints ``(D, H, W)``, each at least :data:`MIN_SIDE`; else :class:`ConfigError`."""
    dims = tuple(shape)
    if len(dims) != 3 or any(int(s) != s or s < MIN_SIDE for s in dims):
        raise ConfigError(f"a synthetic volume shape is (D, H, W) with every side an integer >= {MIN_SIDE} voxels, "
                          f"got {shape!r}; use e.g. shape=(32, 64, 64)")
    return int(dims[0]), int(dims[1]), int(dims[2])


def _background(rng: np.random.Generator, shape: tuple[int, int, int]) -> np.ndarray:
    """``shape`` float64 background: 3-D blobs + gradient + grain, around 55 grey levels."""
    blobs = gaussian_filter(rng.normal(size=shape), sigma=float(np.cbrt(np.prod(shape))) / 10, mode="wrap")
    blobs /= max(float(blobs.std()), 1e-9)
    grain = gaussian_filter(rng.normal(size=shape), sigma=1.2)
    grain /= max(float(grain.std()), 1e-9)
    direction = rng.normal(size=3)
    direction /= np.linalg.norm(direction)
    grid = np.stack(np.meshgrid(*(np.linspace(-0.5, 0.5, s) for s in shape), indexing="ij"))
    gradient = rng.uniform(-25, 25) * np.tensordot(direction, grid, axes=1)
    return 55.0 + rng.uniform(8, 14) * blobs + gradient + rng.uniform(3, 6) * grain


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A ``(3, 3)`` rotation matrix drawn uniformly (QR of a Gaussian matrix, signs fixed, det +1)."""
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def local_coords_3d(shape: tuple[int, int, int], centre: np.ndarray, rotation: np.ndarray,
                    origin: tuple[int, int, int] = (0, 0, 0)) -> np.ndarray:
    """``(3, *shape)`` float64 coordinates of the voxel centres of a block of ``shape`` voxels whose
    first voxel is ``origin`` ``(z, y, x)``, relative to ``centre`` ``(z, y, x)`` and in the
    object's frame: component ``i`` is the projection on column ``i`` of ``rotation``."""
    axes = (np.arange(o, o + s, dtype=np.float64) - c for o, s, c in zip(origin, shape, centre))
    offset = np.stack(np.meshgrid(*axes, indexing="ij"))
    return np.tensordot(rotation.T, offset, axes=1)


def _block(shape: tuple[int, ...], obj: dict) -> tuple[slice, ...] | None:
    """The voxels that can hold ``obj`` (a cube around its centre reaching its farthest corner),
    clipped to the volume; ``None`` when it lies outside."""
    reach = float(np.linalg.norm(obj["axes"])) + 1.0
    lo = [max(0, int(np.floor(c - reach))) for c in obj["centre"]]
    hi = [min(s, int(np.ceil(c + reach)) + 1) for c, s in zip(obj["centre"], shape)]
    if any(a >= b for a, b in zip(lo, hi)):
        return None
    return tuple(slice(a, b) for a, b in zip(lo, hi))


def _draw(vol: np.ndarray, labels: np.ndarray, rng: np.random.Generator, obj: dict) -> None:
    """Paint ``obj`` (an ellipsoid or a box, with its texture) over ``vol`` and ``labels``."""
    block = _block(vol.shape, obj)
    if block is None:
        return
    origin = tuple(b.start for b in block)
    u = local_coords_3d(tuple(b.stop - b.start for b in block), obj["centre"], obj["rotation"], origin)
    axes = np.asarray(obj["axes"])[:, None, None, None]
    sub, sub_labels = vol[block], labels[block]
    if obj["cls"] == _ELLIPSOID:
        d2 = ((u / axes) ** 2).sum(axis=0)
        inside = d2 <= 1.0
        dome = np.sqrt(np.clip(1.0 - d2[inside], 0.0, 1.0))
        sub[inside] = rng.uniform(0.92, 1.08) * (110.0 + 70.0 * dome)
    else:
        inside = np.all(np.abs(u) <= BOX_SHARE * axes, axis=0)
        normal = rng.normal(size=3)
        normal /= np.linalg.norm(normal)
        period = rng.uniform(4.0, 7.0)
        wave = np.sin(2 * np.pi * np.tensordot(normal, u[:, inside], axes=1) / period + rng.uniform(0, 2 * np.pi))
        sub[inside] = 158.0 + rng.uniform(40, 50) * wave + rng.normal(0.0, 12.0, size=wave.shape)
    sub_labels[inside] = obj["cls"]


def _plan_objects(rng: np.random.Generator, shape: tuple[int, int, int]) -> list[dict]:
    """Objects to draw, in drawing order: class, centre ``(z, y, x)``, semi-axes (voxels), rotation.
    Distances use the radius of the sphere inscribed in both shapes (``BOX_SHARE * min(axes)``)."""
    voxels = float(np.prod(shape))
    low, high = _OBJECTS_PER_REFERENCE
    n = int(round(int(rng.integers(low, high + 1)) * voxels / _REFERENCE_VOXELS)) + 2
    scale = float(np.cbrt(voxels))
    sides = np.asarray(shape, dtype=np.float64) - 1.0
    classes = [_ELLIPSOID, _BOX] if rng.random() < 0.5 else [_BOX, _ELLIPSOID]
    classes += [int(c) for c in rng.integers(_ELLIPSOID, _BOX + 1, size=n - 2)]
    objects: list[dict] = []
    for i, cls in enumerate(classes):
        a = rng.uniform(*_SEMI_AXIS_SHARE) * scale
        axes = (a, a * rng.uniform(0.75, 1.0), a * rng.uniform(0.75, 1.0))
        obj = {"cls": cls, "axes": axes, "rotation": random_rotation(rng)}
        if i == 0:
            # On a face of the volume: its inscribed sphere crosses the border.
            centre = rng.uniform(0.2, 0.8, size=3) * sides
            face = int(rng.integers(3))
            centre[face] = float(rng.choice([0.0, sides[face]])) + rng.uniform(-0.3, 0.3) * BOX_SHARE * min(axes)
        elif i == 1 or rng.random() < 0.3:
            # Closer than the sum of the inscribed radii: the two objects overlap.
            other = objects[0] if i == 1 else objects[int(rng.integers(0, i))]
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            dist = BOX_SHARE * (min(other["axes"]) + min(axes)) * rng.uniform(0.7, 0.95)
            centre = other["centre"] + dist * direction
        else:
            centre = rng.uniform(-0.05, 1.05, size=3) * sides
        obj["centre"] = centre
        objects.append(obj)
    return objects


def make_volume_sample(rng: np.random.Generator, *,
                       shape: tuple[int, int, int] = DEFAULT_VOLUME_SHAPE) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic volume and its exact class map.

    Args:
        rng: the random source (the sample is a pure function of its state).
        shape: ``(D, H, W)`` in voxels, every side >= :data:`MIN_SIDE`.

    Returns:
        ``(volume, labels)``: ``(D, H, W)`` uint8 grey levels and ``(D, H, W)`` uint8 labels in
        ``[0, len(VOLUME_CLASS_NAMES))``.
    """
    shape = check_volume_shape(shape)
    background = _background(rng, shape)
    min_voxels = _MIN_VISIBLE_FRACTION * float(np.prod(shape))
    for _ in range(_MAX_ATTEMPTS):
        vol = background.copy()
        labels = np.zeros(shape, dtype=np.uint8)
        for obj in _plan_objects(rng, shape):
            _draw(vol, labels, rng, obj)
        visible = np.bincount(labels.ravel(), minlength=len(VOLUME_CLASS_NAMES))[1:]
        if visible.min() >= min_voxels:
            break
    vol += rng.normal(0.0, rng.uniform(5.0, 9.0), size=vol.shape)
    return np.clip(np.rint(vol), 0, 255).astype(np.uint8), labels


def _resolve_format(file_format: str) -> str:
    if file_format == "auto":
        return "nifti" if importlib.util.find_spec("nibabel") is not None else "tiff"
    if file_format not in VOLUME_SUFFIXES:
        raise ConfigError(f"volume file format must be auto, nifti or tiff, got {file_format!r}")
    if file_format == "nifti" and importlib.util.find_spec("nibabel") is None:
        raise ConfigError("writing NIfTI needs nibabel: pip install 'segflow[volumes]', or choose tiff")
    return file_format


def _write_volume(path: Path, data: np.ndarray, file_format: str) -> None:
    """Write ``(D, H, W)`` ``data`` to ``path``: NIfTI in its (x, y, z) axis order, 1 mm isotropic
    voxels (identity affine); or a multi-page TIFF, one page per z slice."""
    if file_format == "nifti":
        import nibabel as nib

        image = nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), affine=np.eye(4))
        image.header.set_xyzt_units(xyz="mm")
        nib.save(image, str(path))
    else:
        import tifffile

        tifffile.imwrite(path, data, photometric="minisblack", metadata={"axes": "ZYX"})


def generate_volume_collection(
    out_dir: str | os.PathLike[str], *, n_volumes: int = 20,
    shape: tuple[int, int, int] = DEFAULT_VOLUME_SHAPE, seed: int = 0,
    file_format: Literal["auto", "nifti", "tiff"] = "auto",
) -> list[str]:
    """Write a synthetic volume collection: ``out_dir/images/<id><suffix>`` and
    ``out_dir/masks/<id><suffix>``, the layout of :func:`segcore.synthetic.generate_collection`.

    Images are ``(D, H, W)`` uint8 grey volumes; masks are ``(D, H, W)`` uint8 class labels (see
    :data:`VOLUME_CLASS_NAMES`). A volume and its mask share a file name, the volume id
    (``vol-00000``, ``vol-00001``, ...). ``file_format``: ``nifti`` (``.nii.gz``; its data array
    is in NIfTI's ``(x, y, z)`` order, i.e. ``(W, H, D)``, with an identity affine: 1 mm
    isotropic voxels), ``tiff`` (``.tif``, one page per z slice, axes ``ZYX``) or ``auto``
    (NIfTI when nibabel is installed, else TIFF). The arrays written are a pure function of
    ``seed``, ``shape`` and the volume's index (volume ``i`` does not depend on ``n_volumes``).

    Returns:
        The volume ids, in order.
    """
    if int(n_volumes) != n_volumes or n_volumes < 1:
        raise ConfigError(f"n_volumes must be a positive integer, got {n_volumes!r}")
    shape = check_volume_shape(shape)
    file_format = _resolve_format(file_format)
    suffix = VOLUME_SUFFIXES[file_format]
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    ids = []
    for i, stream in enumerate(np.random.SeedSequence(seed).spawn(int(n_volumes))):
        volume, labels = make_volume_sample(np.random.default_rng(stream), shape=shape)
        volume_id = f"vol-{i:05d}"
        _write_volume(out / "images" / f"{volume_id}{suffix}", volume, file_format)
        _write_volume(out / "masks" / f"{volume_id}{suffix}", labels, file_format)
        ids.append(volume_id)
    log.info("wrote %d synthetic %s volumes and masks (%s) under %s", len(ids), "x".join(map(str, shape)),
             file_format, out)
    return ids


__all__ = [
    "DEFAULT_VOLUME_SHAPE",
    "MIN_SIDE",
    "VOLUME_CLASS_NAMES",
    "VOLUME_SUFFIXES",
    "check_volume_shape",
    "generate_volume_collection",
    "local_coords_3d",
    "make_volume_sample",
    "random_rotation",
]
