"""Reading volumes (3-D stacks) and their label masks, slab by slab.

A volume is stored as a stack of 2-D *slices* along its depth axis: ``(D, H, W, C)`` in the
file's native dtype, read ``[z0, z1)`` slices at a time (a *slab*) so that a large volume never
has to be in memory whole. Formats:

- **NIfTI** (``.nii``, ``.nii.gz``), through nibabel (the ``volumes`` extra). Voxel axes are kept
  as stored, without reorientation: slice ``k`` is ``data[:, :, k]``, so a slice's rows are the
  first voxel axis ``i`` and its columns the second ``j``. The affine (``img.affine``, 4×4, voxel
  ``(i, j, k)`` to world millimetres) is kept, so an exported label volume overlays its source
  exactly. Scaled data (``scl_slope``/``scl_inter`` other than 1/0) and float data are read as float32.
  A 4-D file is accepted when its fourth axis has length 1 (or is up to 4 channels).
- **TIFF / OME-TIFF z-stacks** (``.tif``, ``.tiff``): a series with one depth axis (tifffile's
  ``Z``, or ``I``/``Q`` pages) besides ``Y``, ``X`` and at most 4 channels (``C``/``S``). Physical
  sizes come from the OME metadata (``PhysicalSizeZ/Y/X``) or ImageJ's (``spacing``, the
  resolution tags), else 1 with no unit. A TIFF that is a 2-D image is not a volume
  (:func:`probe_volume` returns None) and goes through :mod:`segcore.collection.imageio`.
- **Zarr arrays and OME-Zarr images** (a ``*.zarr`` directory), read in place: see
  :mod:`segcore.collection.zarr_source`.
- **DICOM series** (a directory of ``*.dcm`` files), through pydicom (the ``dicom`` extra): see
  :mod:`segcore.collection.dicom`.

Spacing is given in the order of the stored slices' axes: ``(z, y, x)`` = (NIfTI ``k``, ``i``,
``j``). Errors are :class:`~segcore.errors.ImageReadError` / :class:`~segcore.errors.NotFound`
naming the file.
"""

from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import tifffile

from segcore.collection.dicom import is_dicom_series, probe_dicom, read_dicom_slab
from segcore.collection.fingerprint import value_range
from segcore.collection.imageio import as_label_array, decoder_errors, file_suffix
from segcore.collection.zarr_source import is_zarr_source, probe_zarr, read_zarr_slab
from segcore.errors import ConfigError, ImageReadError, NotFound, SegflowError, StoreError

log = logging.getLogger(__name__)

NIFTI_SUFFIXES = frozenset({".nii", ".nii.gz"})
TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
_DEPTH_AXES = "ZIQ"
_MAX_CHANNELS = 4
# OME length units -> the short names written in the manifest.
_OME_UNITS = {"µm": "micrometer", "um": "micrometer", "nm": "nanometer", "mm": "millimeter", "cm": "centimeter",
              "m": "meter"}
_NIFTI_UNITS = {"mm": "millimeter", "micron": "micrometer", "meter": "meter"}


@dataclass(frozen=True)
class VolumeInfo:
    """What a volume file holds, from its header: ``depth`` slices of ``height x width x channels``
    in ``dtype``; ``spacing`` ``(z, y, x)`` in ``unit`` per voxel (``unit`` "" when unknown);
    ``affine`` the 4×4 voxel-to-world (RAS, millimetre) matrix of NIfTI and DICOM (None for TIFF and Zarr)."""

    depth: int
    height: int
    width: int
    channels: int
    dtype: str
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    unit: str = ""
    affine: tuple[tuple[float, ...], ...] | None = None
    format: str = "tiff"

    def manifest_fields(self) -> dict[str, Any]:
        """The volume columns of a manifest row (see :data:`segcore.collection.store.MANIFEST_SCHEMA`)."""
        return {"depth": self.depth, "spacing_z": self.spacing[0], "spacing_y": self.spacing[1],
                "spacing_x": self.spacing[2], "spacing_unit": self.unit or None,
                "affine": None if self.affine is None else json.dumps([list(r) for r in self.affine])}


def slice_id(volume_id: str, index: int, depth: int) -> str:
    """The image id of slice ``index`` of a volume of ``depth`` slices: ``"ct/case1/z0007"`` (at
    least 4 digits, zero-padded so that ids sort in slice order)."""
    return f"{volume_id}/z{index:0{max(4, len(str(max(depth - 1, 0))))}d}"


def is_volume_candidate(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` may hold a volume (NIfTI, Zarr and DICOM series always do; a TIFF may)."""
    return file_suffix(path) in NIFTI_SUFFIXES | TIFF_SUFFIXES or is_zarr_source(path) or is_dicom_series(path)


def probe_volume(path: str | os.PathLike[str]) -> VolumeInfo | None:
    """The :class:`VolumeInfo` of a volume file, reading its header only; None for a TIFF that is a
    2-D image. Raises :class:`NotFound` / :class:`ImageReadError` (a bad file, a time series, more
    than one depth axis), and :class:`ConfigError` for NIfTI without nibabel installed."""
    if is_zarr_source(path):
        return VolumeInfo(**probe_zarr(path))
    if is_dicom_series(path):
        return VolumeInfo(**probe_dicom(path))
    p = _checked(path)
    if file_suffix(p) in NIFTI_SUFFIXES:
        return _nifti_info(p)
    with decoder_errors(p), tifffile.TiffFile(p) as tif:
        series = tif.series[0]
        layout = _tiff_volume_layout(tuple(series.shape), series.axes, p)
        if layout is None:
            return None
        depth, height, width, channels, _ = layout
        dtype = np.dtype(series.dtype)
        spacing, unit = _tiff_spacing(tif)
    if dtype.kind not in "uif":
        raise ImageReadError(f"cannot read {p}: unsupported sample type {dtype}; save it as integer or float")
    return VolumeInfo(depth=depth, height=height, width=width, channels=channels, dtype=dtype.newbyteorder("=").name,
                      spacing=spacing, unit=unit)


def read_volume_slab(path: str | os.PathLike[str], z0: int, z1: int) -> np.ndarray:
    """Slices ``[z0, z1)`` of a volume as a ``(z1 - z0, H, W, C)`` array in its native dtype
    (float32 for scaled NIfTI data). Raises :class:`ImageReadError` for a bad file or range."""
    if is_zarr_source(path):
        return read_zarr_slab(path, z0, z1)
    if is_dicom_series(path):
        return read_dicom_slab(path, z0, z1)
    p = _checked(path)
    if file_suffix(p) in NIFTI_SUFFIXES:
        img = _nifti_load(p)
        info = _nifti_info(p, img)
        _check_range(p, z0, z1, info.depth)
        with decoder_errors(p):
            data = np.asarray(img.dataobj[:, :, z0:z1, ...])
        data = data.reshape(info.height, info.width, z1 - z0, info.channels)
        return np.ascontiguousarray(np.moveaxis(data, 2, 0), dtype=info.dtype)
    with decoder_errors(p), tifffile.TiffFile(p) as tif:
        series = tif.series[0]
        layout = _tiff_volume_layout(tuple(series.shape), series.axes, p)
        if layout is None:
            raise ImageReadError(f"cannot read {p} as a volume: it is a 2-D image")
        depth, height, width, channels, order = layout
        _check_range(p, z0, z1, depth)
        import zarr  # tifffile's zarr store reads only the pages of the slab

        with series.aszarr() as store:
            whole = zarr.open_array(store, mode="r")
            index = tuple(slice(z0, z1) if a == order[0] else slice(None) for a in series.axes)
            squeezed = np.asarray(whole[index])
        data = _to_zyxc(squeezed, series.axes, order, (z1 - z0, height, width, channels))
    dtype = np.dtype(data.dtype)
    return np.ascontiguousarray(data, dtype=np.uint8 if dtype.kind == "b" else dtype.newbyteorder("="))


def read_mask_slab(path: str | os.PathLike[str], z0: int, z1: int) -> np.ndarray:
    """Slices ``[z0, z1)`` of a label volume as ``(z1 - z0, H, W)`` unsigned labels (uint8, uint16
    or uint32; see :func:`segcore.collection.imageio.read_mask` for the accepted values)."""
    data = read_volume_slab(path, z0, z1)
    if data.shape[-1] != 1:
        raise ImageReadError(f"cannot read mask {path}: it has {data.shape[-1]} channels; label volumes must have one")
    return as_label_array(data[..., 0], Path(path))


def decode_slab(rows: Sequence[dict[str, Any]], images: np.ndarray, gts: np.ndarray | None, *,
                class_masks: bool = False) -> list[dict[str, Any]]:
    """Read the slab of one volume that ``rows`` (consecutive slices, in order) describe into
    ``images`` ``(k, H, W, C)`` and ``gts`` ``(k, H, W)``; returns the rows with final status. A
    volume that fails to decode makes every row of the slab an error row (the slots stay zero).
    With ``class_masks`` (class-map ground truth) each row also gets its slice's largest label
    (``mask_max``, for the store's fingerprint)."""
    z0, z1 = rows[0]["slice"], rows[-1]["slice"] + 1
    if [r["slice"] for r in rows] != list(range(z0, z1)):
        raise StoreError(f"the rows of {rows[0]['volume_id']!r} are not consecutive slices")
    out = [dict(r) for r in rows]
    try:
        slab = read_volume_slab(rows[0]["source_path"], z0, z1)
        if slab.shape != images.shape or str(slab.dtype) != str(images.dtype):
            raise StoreError(f"decoded slab {slab.shape} {slab.dtype} differs from its header {images.shape} "
                             f"{images.dtype}")
        images[...] = slab
    except (SegflowError, OSError, ValueError) as exc:
        for row in out:
            row.update(status="error", error=f"{type(exc).__name__}: {exc}",
                       mask_status="skipped" if row["mask_path"] is not None else "missing")
        return out
    for i, row in enumerate(out):
        row.update(value_range(images[i]))  # for the store's fingerprint (not a manifest column)
    if gts is not None and out[0]["mask_status"] == "ok":
        try:
            gts[...] = read_mask_slab(out[0]["mask_path"], z0, z1)
            if class_masks:
                for i, row in enumerate(out):
                    row["mask_max"] = int(gts[i].max(initial=0))
        except (SegflowError, OSError, ValueError) as exc:
            for row in out:
                row.update(mask_status="error", mask_error=f"{type(exc).__name__}: {exc}")
    return out


# --------------------------------------------------------------------------------------------
# helpers


def _checked(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise NotFound(f"volume file {p} does not exist; check the path")
    if not p.is_file():
        raise ImageReadError(f"{p} is not a file; give the path of a volume file")
    if not is_volume_candidate(p):
        raise ImageReadError(f"cannot read {p} as a volume: unsupported suffix; use .nii, .nii.gz, .tif or .tiff")
    if p.stat().st_size == 0:
        raise ImageReadError(f"cannot decode {p}: the file is empty (0 bytes); copy or export it again")
    return p


def _check_range(p: Path, z0: int, z1: int, depth: int) -> None:
    if not 0 <= z0 < z1 <= depth:
        raise ImageReadError(f"cannot read slices [{z0}, {z1}) of {p}: it has {depth} slices")


def require_nibabel(what: str) -> Any:
    """The nibabel module; :class:`ConfigError` naming ``what`` needs it (e.g. ``"reading NIfTI (x.nii)"``)
    and the extra that installs it, when it is not installed."""
    try:
        import nibabel
    except ImportError as exc:
        raise ConfigError(f"{what} needs nibabel: install segflow with the 'volumes' extra "
                          "(pip install 'segflow[volumes]')") from exc
    return nibabel


def _nifti_load(p: Path) -> Any:
    nibabel = require_nibabel(f"reading NIfTI ({p})")
    with decoder_errors(p):
        try:
            return nibabel.load(str(p))
        except nibabel.filebasedimages.ImageFileError as exc:
            raise ImageReadError(f"cannot decode {p}: {exc}; the file is corrupt or not NIfTI") from exc


def _nifti_info(p: Path, img: Any = None) -> VolumeInfo:
    img = _nifti_load(p) if img is None else img
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 2:
        shape = shape + (1,)
    channels = 1
    if len(shape) == 4 and 1 <= shape[3] <= _MAX_CHANNELS:
        channels = shape[3]
    elif len(shape) != 3:
        raise ImageReadError(f"cannot read {p}: a volume must be 3-D (with at most {_MAX_CHANNELS} channels on a "
                             f"4th axis), got shape {shape}; split a time series into one file per time point")
    header = img.header
    dtype = np.dtype(header.get_data_dtype())
    slope, inter = (float(getattr(img.dataobj, "slope", 1.0)), float(getattr(img.dataobj, "inter", 0.0)))
    scaled = slope != 1 or inter != 0  # the loaded header's own scaling is cleared; the proxy holds it
    if dtype.kind not in "uif":
        raise ImageReadError(f"cannot read {p}: unsupported voxel type {dtype}; save it as integer or float")
    if scaled or dtype.kind == "f":  # scaled voxels, and float64, are stored as float32
        dtype = np.dtype(np.float32)
    zooms = tuple(float(z) for z in header.get_zooms()[:3]) + (1.0,) * max(0, 3 - len(header.get_zooms()))
    unit = _NIFTI_UNITS.get(header.get_xyzt_units()[0], "")
    affine = tuple(tuple(float(v) for v in row) for row in np.asarray(img.affine, dtype=np.float64))
    return VolumeInfo(depth=shape[2], height=shape[0], width=shape[1], channels=channels,
                      dtype=dtype.newbyteorder("=").name, spacing=(zooms[2], zooms[0], zooms[1]), unit=unit,
                      affine=affine, format="nifti")


def _tiff_volume_layout(shape: tuple[int, ...], axes: str, p: Path) -> tuple[int, int, int, int, str] | None:
    """``(depth, height, width, channels, order)`` of a TIFF series that is a z-stack, where
    ``order`` names the depth axis then the channel axis (``""`` without one); None for a 2-D image."""
    kept = [(n, a) for n, a in zip(shape, axes, strict=True) if n != 1 or a in "YX"]
    letters = "".join(a for _, a in kept)
    sizes = dict((a, n) for n, a in kept)
    depth_axes = [a for a in letters if a in _DEPTH_AXES]
    channel_axes = [a for a in letters if a in "CS"]
    other = [a for a in letters if a not in "YX" + _DEPTH_AXES + "CS"]
    if not depth_axes:
        return None
    if "Y" not in letters or "X" not in letters:
        raise ImageReadError(f"cannot read {p}: its series (axes {axes!r}, shape {shape}) has no Y and X axes")
    if other or len(depth_axes) > 1 or len(channel_axes) > 1:
        raise ImageReadError(f"cannot read {p}: a volume needs one depth axis (Z) besides Y, X and at most one channel "
                             f"axis, got axes {axes!r} of shape {shape}; split time series or multi-position files "
                             "into one file per volume")
    channels = sizes[channel_axes[0]] if channel_axes else 1
    if channels > _MAX_CHANNELS:
        if len(depth_axes) == 1 and sizes[depth_axes[0]] <= _MAX_CHANNELS:
            return None  # a (C, Y, X) stack read as channels by imageio
        raise ImageReadError(f"cannot read {p}: {channels} channels (axes {axes!r}); at most {_MAX_CHANNELS}")
    return sizes[depth_axes[0]], sizes["Y"], sizes["X"], channels, depth_axes[0] + "".join(channel_axes)


def _to_zyxc(data: np.ndarray, axes: str, order: str, shape: tuple[int, int, int, int]) -> np.ndarray:
    """A TIFF series array (``axes``) as ``(Z, Y, X, C)`` of ``shape``."""
    keep = [a for n, a in zip(data.shape, axes, strict=True) if n != 1 or a in "YX" + order]
    squeezed = data.reshape([n for n, a in zip(data.shape, axes, strict=True) if n != 1 or a in "YX" + order])
    target = [order[0], "Y", "X"] + ([order[1]] if len(order) > 1 else [])
    moved = np.transpose(squeezed, [keep.index(a) for a in target])
    return moved.reshape(shape)


def _tiff_spacing(tif: tifffile.TiffFile) -> tuple[tuple[float, float, float], str]:
    """``((z, y, x), unit)`` from OME or ImageJ metadata; ``((1, 1, 1), "")`` when absent."""
    if tif.is_ome and tif.ome_metadata:
        try:
            root = ET.fromstring(tif.ome_metadata)
            pixels = next(el for el in root.iter() if el.tag.endswith("Pixels"))
            sizes = [pixels.get(f"PhysicalSize{a}") for a in "ZYX"]
            if any(s is not None for s in sizes):
                unit = pixels.get("PhysicalSizeXUnit", "µm")
                return tuple(float(s) if s else 1.0 for s in sizes), _OME_UNITS.get(unit, unit)  # type: ignore[return-value]
        except (ET.ParseError, StopIteration, ValueError) as exc:
            log.warning("%s: unreadable OME physical sizes (%s); spacing 1", tif.filehandle.path, exc)
    meta = tif.imagej_metadata or {}
    if "spacing" in meta:
        page = tif.pages.first
        xy = []
        for tag in ("YResolution", "XResolution"):
            value = page.tags.get(tag)
            num, den = value.value if value is not None else (1, 1)
            xy.append(float(den) / float(num) if num else 1.0)
        unit = str(meta.get("unit", "")).replace("\\u00B5", "µ")
        return (float(meta["spacing"]), xy[0], xy[1]), _OME_UNITS.get(unit, unit)
    return (1.0, 1.0, 1.0), ""


__all__ = ["NIFTI_SUFFIXES", "TIFF_SUFFIXES", "VolumeInfo", "require_nibabel", "is_volume_candidate", "slice_id", "probe_volume",
           "decode_slab", "read_mask_slab", "read_volume_slab"]
