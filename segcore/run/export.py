"""Export a run's predicted masks of volumes as files that medical viewers open.

``export_nifti(run_dir)`` writes one NIfTI label volume per volume the run segmented
(``OUT/<volume id>.nii.gz``, uint8 classes, or uint16 with more than 255 classes), with the
voxel array in the source's layout (``labels[:, :, k]`` is slice ``k``) and the source's affine,
so it overlays its image exactly in 3D Slicer, ITK-SNAP or napari. When the source NIfTI file is
still where it was ingested from, its header is kept (sform/qform codes, units, description),
with the data type and scaling of labels; otherwise the header is built from the affine
recorded in the manifest, with the spacing unit recorded there. A TIFF z-stack has no affine:
its labels get the diagonal affine of its spacing (``diag(spacing_y, spacing_x, spacing_z)``)
in its unit (micrometres stay micrometres; nanometres are written as micrometres and
centimetres as millimetres, the units NIfTI has; a stack without one is written without a unit,
which viewers read as millimetres).

Files already in ``--out`` are replaced only with ``overwrite`` (those of the default folder, the
run's own exports, always), and a file the store was ingested from never.

Volumes a run put together from 2-D images (``--volume-pattern``; the pattern the run was made
with, or another one given) are exported too: their slices in the run's order, spacing 1 and no
unit. A volume whose slices do not stack (different shapes) is skipped with a warning.

Needs nibabel (the ``volumes`` extra).
"""

from __future__ import annotations

import gzip
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segcore import fsio
from segcore.collection.imageio import file_suffix
from segcore.collection.volumes import require_nibabel
from segcore.collection.versions import current_manifest
from segcore.errors import ConfigError, NotFound
from segcore.run.results import RunReader
from segcore.run.rundir import read_plan
from segcore.run.volumes import Volume, check_volume_pattern, find_volumes, unreadable_slices

log = logging.getLogger(__name__)

#: Export formats of :func:`export_volumes` (``segflow export --format``).
EXPORT_FORMATS = ("nifti",)


@dataclass(frozen=True)
class ExportedVolume:
    """One file written: the volume's id, its path, its voxel shape ``(i, j, k)``, where its affine
    came from (``"source header"``, ``"manifest"`` or ``"spacing"``) and the header's length unit
    (``"mm"``, ``"micron"``, ``"meter"`` or ``"unknown"``)."""

    volume_id: str
    path: str
    shape: tuple[int, int, int]
    affine_from: str
    units: str = "unknown"


#: The manifest's spacing units -> (NIfTI's unit, the factor that converts a length into it).
_NIFTI_UNIT_OF = {"millimeter": ("mm", 1.0), "micrometer": ("micron", 1.0), "meter": ("meter", 1.0),
                  "nanometer": ("micron", 1e-3), "centimeter": ("mm", 10.0)}


def nifti_units(unit: str | None) -> tuple[str, float]:
    """``(NIfTI xyz unit, factor)`` of a manifest ``spacing_unit``: lengths times ``factor`` are in
    that unit; ``("unknown", 1.0)`` for none or one NIfTI cannot name."""
    return _NIFTI_UNIT_OF.get(unit or "", ("unknown", 1.0))


def _header_and_affine(nib: Any, row: dict[str, Any], volume: Volume, dtype: np.dtype
                       ) -> tuple[Any, np.ndarray, str, str | None]:
    """The header to keep (None: a new one), the affine, where it came from, and the xyz unit to set
    on a new header (None: the kept header's)."""
    source = row["source_path"]
    if file_suffix(source) in (".nii", ".nii.gz") and os.path.isfile(source):
        try:
            src = nib.load(source)
            header = src.header.copy()
            header.set_data_dtype(dtype)
            header.set_slope_inter(1.0, 0.0)
            return header, np.asarray(src.affine, dtype=np.float64), "source header", None
        except (OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
            log.warning("%s: source header unreadable (%s); using the affine of the manifest", source, exc)
    unit, factor = nifti_units(volume.unit)
    if row.get("affine"):  # recorded from a NIfTI header: in that header's unit, which NIfTI names
        return None, np.asarray(json.loads(row["affine"]), dtype=np.float64), "manifest", unit
    sz, sy, sx = (v * factor for v in volume.spacing)
    return None, np.diag([sy, sx, sz, 1.0]), "spacing", unit


def _check_targets(run: RunReader, paths: list[Path], *, replace: bool) -> None:
    """Refuse, before anything is written, files to write that are files the run's store was ingested
    from (an image or a mask: ``--out`` pointed at the masks' folder), and, unless ``replace``,
    files that exist."""
    ingested = {os.path.realpath(p): what for r in run.manifest.to_pylist()
                for what, p in (("image", r["source_path"]), ("mask", r.get("mask_path"))) if p and "://" not in p}
    for path in paths:
        what = ingested.get(os.path.realpath(path))
        if what:
            raise ConfigError(f"{path} is an ingested {what} file of the run's store: exporting would replace it; "
                              "give another --out")
    existing = [p for p in paths if p.exists()]
    if existing and not replace:
        names = ", ".join(p.name for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
        raise ConfigError(f"{len(existing)} of the {len(paths)} file(s) to export exist in {existing[0].parent} "
                          f"({names}); pass --overwrite to replace them, or give another --out")


def export_nifti(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
                 volume_pattern: str | None = None, overwrite: bool = False) -> list[ExportedVolume]:
    """Write one NIfTI label volume per volume of the run at ``run_dir`` into ``out`` (default
    ``RUN_DIR/export/nifti``, local paths only): its ingested volumes, and the 2-D images grouped by
    ``volume_pattern`` (default: the ``--volume-pattern`` the run was made with). Returns what was
    written. A volume whose file could not be read at ingest is skipped with a warning.

    Raises :class:`NotFound` when the run has no volume, and :class:`ConfigError`, before writing
    anything, when a file to write is one the store was ingested from, or exists in an ``out``
    other than the default folder and ``overwrite`` is not set (the default folder's files are
    the run's own exports: replaced)."""
    nib = require_nibabel("exporting NIfTI")
    run = RunReader(run_dir)
    planned = set(read_plan(run.path).groups)
    current = [r for r in current_manifest(run.manifest).to_pylist() if r["group"] in planned]
    pattern = volume_pattern if volume_pattern is not None else (run.info.get("spec") or {}).get("volume_pattern")
    if volume_pattern:  # asked for here: a pattern that groups nothing is refused
        check_volume_pattern(current, volume_pattern)  # names an id when there are 2-D images
        if all(r.get("volume_id") for r in current):
            raise ConfigError(f"--volume-pattern {volume_pattern!r} groups none of the run's 2-D images (it has 0); "
                              "leave it out to export the run's ingested volumes")
    by_id = {r["image_id"]: r for r in current}
    volumes = find_volumes(current, pattern=pattern or None)
    if not volumes:
        raise NotFound(f"run {run.run_id} at {run.path} segmented no volume (NIfTI or TIFF z-stack"
                       + (f", or 2-D images grouped by --volume-pattern {pattern!r}" if pattern else
                          "; 2-D slices are grouped into volumes by --volume-pattern") + "); there is nothing to "
                       "export as NIfTI")
    own = Path(fsio.join(os.fspath(run_dir), "export", "nifti"))
    target = Path(out) if out is not None else own
    _check_targets(run, [target / f"{v.volume_id}.nii.gz" for v in volumes], replace=overwrite or target == own)
    names = run.info["model"].get("class_names") or []
    dtype = np.dtype(np.uint8 if len(names) <= 256 else np.uint16)
    written = []
    for volume in volumes:
        unread = unreadable_slices(run, volume)
        if unread:
            log.warning("%s: not exported, %s", volume.volume_id, unread)
            continue
        try:
            labels = run.masks_of(volume.slices).astype(dtype, copy=False)  # (k, i, j)
        except ValueError as exc:  # 2-D images of different shapes
            log.warning("%s: not exported, its slices do not stack into a volume (%s)", volume.volume_id, exc)
            continue
        data = np.ascontiguousarray(np.moveaxis(labels, 0, -1))  # (i, j, k) as the source's voxels
        header, affine, origin, unit = _header_and_affine(nib, by_id[volume.slices[0]], volume, dtype)
        image = nib.Nifti1Image(data, affine, header=header)
        image.set_data_dtype(dtype)
        if unit is not None:
            image.header.set_xyzt_units(xyz=unit)
        path = target / f"{volume.volume_id}.nii.gz"
        payload = gzip.compress(image.to_bytes(), compresslevel=6)
        with fsio.atomic_path(path) as tmp:  # a reader never sees half a file
            tmp.write_bytes(payload)
        units = image.header.get_xyzt_units()[0]
        written.append(ExportedVolume(volume_id=volume.volume_id, path=str(path), shape=data.shape, affine_from=origin,
                                      units=units))
        log.info("exported %s -> %s (%s, affine from the %s, %s)", volume.volume_id, path, data.shape, origin, units)
    return written


def export_volumes(run_dir: str | os.PathLike[str], *, fmt: str, out: str | os.PathLike[str] | None = None,
                   volume_pattern: str | None = None, overwrite: bool = False) -> list[ExportedVolume]:
    """Export the run's volumes in format ``fmt`` (one of :data:`EXPORT_FORMATS`)."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; formats: {', '.join(EXPORT_FORMATS)}")
    return export_nifti(run_dir, out, volume_pattern=volume_pattern, overwrite=overwrite)


__all__ = ["EXPORT_FORMATS", "ExportedVolume", "export_nifti", "export_volumes", "nifti_units"]
