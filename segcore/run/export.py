"""Export a run's predicted masks of volumes as files that medical viewers open.

``export_nifti(run_dir)`` writes one NIfTI label volume per volume the run segmented
(``OUT/<volume id>.nii.gz``, uint8 classes, or uint16 with more than 255 classes), with the
voxel array in the source's layout (``labels[:, :, k]`` is slice ``k``) and the source's affine,
so it overlays its image exactly in 3D Slicer, ITK-SNAP or napari. When the source NIfTI file is
still where it was ingested from, its header is kept (sform/qform codes, units, description),
with the data type and scaling of labels; otherwise the header is built from the affine
recorded in the manifest. A TIFF z-stack has no affine: its labels get the diagonal affine of
its spacing (``diag(spacing_y, spacing_x, spacing_z)``, millimetres assumed by viewers).

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
from segcore.run.volumes import Volume, find_volumes

log = logging.getLogger(__name__)

#: Export formats of :func:`export_volumes` (``segflow export --format``).
EXPORT_FORMATS = ("nifti",)


@dataclass(frozen=True)
class ExportedVolume:
    """One file written: the volume's id, its path, its voxel shape ``(i, j, k)`` and where its
    affine came from (``"source header"``, ``"manifest"`` or ``"spacing"``)."""

    volume_id: str
    path: str
    shape: tuple[int, int, int]
    affine_from: str




def _header_and_affine(nib: Any, row: dict[str, Any], volume: Volume, dtype: np.dtype) -> tuple[Any, np.ndarray, str]:
    source = row["source_path"]
    if file_suffix(source) in (".nii", ".nii.gz") and os.path.isfile(source):
        try:
            src = nib.load(source)
            header = src.header.copy()
            header.set_data_dtype(dtype)
            header.set_slope_inter(1.0, 0.0)
            return header, np.asarray(src.affine, dtype=np.float64), "source header"
        except (OSError, ValueError, nib.filebasedimages.ImageFileError) as exc:
            log.warning("%s: source header unreadable (%s); using the affine of the manifest", source, exc)
    if row.get("affine"):
        return None, np.asarray(json.loads(row["affine"]), dtype=np.float64), "manifest"
    sz, sy, sx = volume.spacing
    return None, np.diag([sy, sx, sz, 1.0]), "spacing"


def export_nifti(run_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> list[ExportedVolume]:
    """Write one NIfTI label volume per ingested volume of the run at ``run_dir`` into ``out``
    (default ``RUN_DIR/export/nifti``, local paths only); returns what was written. Raises
    :class:`NotFound` when the run segmented no volume."""
    nib = require_nibabel("exporting NIfTI")
    run = RunReader(run_dir)
    planned = set(read_plan(run.path).groups)
    current = [r for r in current_manifest(run.manifest).to_pylist() if r["group"] in planned]
    rows = {r["volume_id"]: r for r in current if r["volume_id"] and r["slice"] == 0}  # a volume's first slice
    volumes = find_volumes([r for r in current if r["volume_id"]])
    if not volumes:
        raise NotFound(f"run {run.run_id} at {run.path} segmented no volume (NIfTI or TIFF z-stack); there is "
                       "nothing to export as NIfTI")
    target = Path(out) if out is not None else Path(fsio.join(os.fspath(run_dir), "export", "nifti"))
    names = run.info["model"].get("class_names") or []
    dtype = np.dtype(np.uint8 if len(names) <= 256 else np.uint16)
    written = []
    for volume in volumes:
        labels = run.masks_of(volume.slices).astype(dtype, copy=False)  # (k, i, j)
        data = np.ascontiguousarray(np.moveaxis(labels, 0, -1))  # (i, j, k) as the source's voxels
        header, affine, origin = _header_and_affine(nib, rows[volume.volume_id], volume, dtype)
        image = nib.Nifti1Image(data, affine, header=header)
        image.set_data_dtype(dtype)
        path = target / f"{volume.volume_id}.nii.gz"
        payload = gzip.compress(image.to_bytes(), compresslevel=6)
        with fsio.atomic_path(path) as tmp:  # a reader never sees half a file
            tmp.write_bytes(payload)
        written.append(ExportedVolume(volume_id=volume.volume_id, path=str(path), shape=data.shape, affine_from=origin))
        log.info("exported %s -> %s (%s, affine from the %s)", volume.volume_id, path, data.shape, origin)
    return written


def export_volumes(run_dir: str | os.PathLike[str], *, fmt: str, out: str | os.PathLike[str] | None = None
                   ) -> list[ExportedVolume]:
    """Export the run's volumes in format ``fmt`` (one of :data:`EXPORT_FORMATS`)."""
    if fmt not in EXPORT_FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}; formats: {', '.join(EXPORT_FORMATS)}")
    return export_nifti(run_dir, out)


__all__ = ["EXPORT_FORMATS", "ExportedVolume", "export_nifti", "export_volumes"]
