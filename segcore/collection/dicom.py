"""DICOM series as collection sources: one folder per series, its slices sorted by position.

A source is a directory holding ``*.dcm`` files of one series (pydicom, the ``dicom`` extra). The
slices are sorted along the slice normal (the cross product of the two ``ImageOrientationPatient``
direction cosines) by the projection of their ``ImagePositionPatient``, or by ``InstanceNumber``
when positions are missing. The volume's slices are ``(Rows, Columns)``: a slice's rows are the
DICOM rows. Pixel values are rescaled (``RescaleSlope``/``RescaleIntercept``: CT in Hounsfield
units, as float32) when the scaling is not the identity; otherwise they keep their stored integer
type.

Spacing ``(z, y, x)`` in millimetres: the median distance between consecutive slice positions
(``SliceThickness`` when there is one slice), and ``PixelSpacing`` (row spacing, column spacing).
The affine maps the voxel ``(row, column, slice)`` to NIfTI's RAS world (DICOM's LPS with x and y
negated), so labels exported as NIfTI overlay the series in a viewer.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from segcore.errors import ConfigError, ImageReadError
from segcore.fsio import signature

log = logging.getLogger(__name__)

#: pydicom raises these (and its own InvalidDicomError, a subclass of Exception) for broken files.
_READ_ERRORS = (OSError, ValueError, KeyError, AttributeError, TypeError, IndexError, RuntimeError, EOFError)


def _pydicom() -> Any:
    try:
        import pydicom
    except ImportError as exc:
        raise ConfigError("reading DICOM series needs pydicom: install segflow with the 'dicom' extra "
                          "(pip install 'segflow[dicom]')") from exc
    return pydicom


def dicom_files(path: str | Path) -> list[Path]:
    """The ``*.dcm`` files directly inside ``path`` (sorted by name); empty for anything else."""
    p = Path(path)
    if not p.is_dir() or p.suffix.lower() == ".zarr":
        return []
    return sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() == ".dcm" and not f.name.startswith("."))


def is_dicom_series(path: str | Path) -> bool:
    """Whether ``path`` is a directory holding ``*.dcm`` files (one series)."""
    return bool(dicom_files(path))


def _headers(p: Path) -> list[tuple[Path, Any]]:
    pydicom = _pydicom()
    out = []
    for f in dicom_files(p):
        try:
            out.append((f, pydicom.dcmread(f, stop_before_pixels=True)))
        except (pydicom.errors.InvalidDicomError, *_READ_ERRORS) as exc:
            raise ImageReadError(f"cannot read the DICOM series {p}: {f.name}: {exc}") from exc
    if not out:
        raise ImageReadError(f"{p} holds no .dcm files")
    series = {str(getattr(ds, "SeriesInstanceUID", "")) for _, ds in out}
    if len(series) > 1:
        raise ImageReadError(f"cannot read {p}: it holds {len(series)} DICOM series; put each series in a folder "
                             "of its own")
    return out


def _sorted_series(p: Path) -> tuple[list[Path], list[Any], np.ndarray | None]:
    """Files and headers in slice order, and the slices' LPS positions (None without positions);
    read once per process while the folder's files keep their sizes and stamps (every slab of a
    series needs them)."""
    return _sorted_series_of(str(p), signature(p))


@lru_cache(maxsize=8)
def _sorted_series_of(path: str, _stamp: str | None) -> tuple[list[Path], list[Any], np.ndarray | None]:
    p = Path(path)
    items = _headers(p)
    first = items[0][1]
    orientation = getattr(first, "ImageOrientationPatient", None)
    positions = [getattr(ds, "ImagePositionPatient", None) for _, ds in items]
    if orientation is not None and all(pos is not None for pos in positions):
        row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
        normal = np.cross(row, col)
        lps = np.asarray([[float(v) for v in pos] for pos in positions])
        order = np.argsort(lps @ normal, kind="stable")
        return [items[i][0] for i in order], [items[i][1] for i in order], lps[order]
    order = np.argsort([int(getattr(ds, "InstanceNumber", 0) or 0) for _, ds in items], kind="stable")
    log.warning("%s: no image positions; slices sorted by InstanceNumber", p)
    return [items[i][0] for i in order], [items[i][1] for i in order], None


def _scaling(ds: Any) -> tuple[float, float]:
    return float(getattr(ds, "RescaleSlope", 1) or 1), float(getattr(ds, "RescaleIntercept", 0) or 0)


def probe_dicom(path: str | Path) -> dict[str, Any]:
    """The fields of a :class:`~segcore.collection.volumes.VolumeInfo` for a DICOM series (headers only)."""
    p = Path(path)
    return _info(p, *_sorted_series(p))


def _info(p: Path, files: list[Path], headers: list[Any], lps: np.ndarray | None) -> dict[str, Any]:
    first = headers[0]
    try:
        rows, cols = int(first.Rows), int(first.Columns)
        samples = int(getattr(first, "SamplesPerPixel", 1))
        signed, bits = int(first.PixelRepresentation), int(first.BitsAllocated)
    except (AttributeError, TypeError, ValueError) as exc:
        raise ImageReadError(f"cannot read the DICOM series {p}: {files[0].name} lacks {exc}") from exc
    if any((int(ds.Rows), int(ds.Columns)) != (rows, cols) for ds in headers):
        raise ImageReadError(f"cannot read the DICOM series {p}: its slices differ in size")
    if samples > 4:
        raise ImageReadError(f"cannot read the DICOM series {p}: {samples} samples per pixel; at most 4")
    scaled = any(_scaling(ds) != (1.0, 0.0) for ds in headers)
    dtype = "float32" if scaled else np.dtype(f"{'i' if signed else 'u'}{max(1, bits // 8)}").name
    dy, dx = (float(v) for v in getattr(first, "PixelSpacing", (1.0, 1.0)))
    if lps is not None and len(lps) > 1:
        steps = np.linalg.norm(np.diff(lps, axis=0), axis=1)
        dz = float(np.median(steps))
        if dz <= 0:
            raise ImageReadError(f"cannot read the DICOM series {p}: two slices share one position")
        step = (lps[-1] - lps[0]) / (len(lps) - 1)
    else:
        dz = float(getattr(first, "SliceThickness", 1.0) or 1.0)
        step = None
    affine = None
    orientation = getattr(first, "ImageOrientationPatient", None)
    if lps is not None and orientation is not None:
        row, col = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
        k = step if step is not None else np.cross(row, col) * dz
        lps_affine = np.eye(4)
        lps_affine[:3, 0], lps_affine[:3, 1], lps_affine[:3, 2], lps_affine[:3, 3] = col * dy, row * dx, k, lps[0]
        ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps_affine
        affine = tuple(tuple(float(v) for v in r) for r in ras)
    return {"depth": len(files), "height": rows, "width": cols, "channels": samples, "dtype": dtype,
            "spacing": (dz, dy, dx), "unit": "millimeter", "affine": affine, "format": "dicom"}


def read_dicom_slab(path: str | Path, z0: int, z1: int) -> np.ndarray:
    """Slices ``[z0, z1)`` of a DICOM series (in position order) as ``(z1 - z0, H, W, C)``."""
    p = Path(path)
    files, headers, lps = _sorted_series(p)
    if not 0 <= z0 < z1 <= len(files):
        raise ImageReadError(f"cannot read slices [{z0}, {z1}) of {p}: it has {len(files)} slices")
    info = _info(p, files, headers, lps)
    pydicom = _pydicom()
    out = np.zeros((z1 - z0, info["height"], info["width"], info["channels"]), dtype=info["dtype"])
    for i, f in enumerate(files[z0:z1]):
        try:
            ds = pydicom.dcmread(f)
            pixels = np.asarray(ds.pixel_array)
        except (pydicom.errors.InvalidDicomError, *_READ_ERRORS) as exc:
            raise ImageReadError(f"cannot decode {f}: {exc}; a compressed transfer syntax may need pydicom's "
                                 "optional decoders (pylibjpeg, gdcm)") from exc
        slope, intercept = _scaling(ds)
        values = pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept) if out.dtype.kind == "f" else pixels
        out[i] = values.reshape(out.shape[1:])
    return out


__all__ = ["dicom_files", "is_dicom_series", "probe_dicom", "read_dicom_slab"]
