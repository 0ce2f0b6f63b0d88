"""Source files of a collection: list and pair images with masks, then probe headers and hash contents.

The rows made here are partial manifest rows (see :data:`segcore.collection.store.MANIFEST_SCHEMA`);
:func:`segcore.collection.store.plan_groups` then places the readable ones in groups.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from segcore import fsio
from segcore.errors import NotFound, SegflowError, StoreError
from segcore.fsio import file_sha256
from segcore.collection.imageio import probe_image
from segcore.collection.listing import entry_problem, image_id_for, list_images, list_sources
from segcore.collection.landing import is_remote, list_remote_images
from segcore.collection.store import manifest_row
from segcore.collection.volumes import VolumeInfo, is_volume_candidate, probe_volume, slice_id


@dataclass(frozen=True)
class PairedSources:
    """The rows of :func:`list_and_pair` and the source paths it skipped (other suffixes)."""

    rows: list[dict[str, Any]]
    skipped: tuple[str, ...]


def check_sources(images: str, masks: str | None = None) -> None:
    """Raise :class:`NotFound` when a local image directory (a path, not a glob pattern) or mask
    directory does not exist: the messages :func:`list_and_pair` gives, without listing anything, so
    a command can tell a mistyped path before it starts its work. URLs are left to the listing."""
    if not is_remote(images) and not any(ch in os.fspath(images) for ch in "*?[") and not Path(images).exists():
        raise NotFound(f"{images} does not exist; give a directory of images or a glob pattern")
    if masks is not None and not is_remote(masks) and not Path(masks).is_dir():
        raise NotFound(f"mask directory {masks!r} does not exist")


def pair_sources(images: str, masks: str | None = None) -> list[dict[str, Any]]:
    """The rows of :func:`list_and_pair` (the skipped files left out)."""
    return list_and_pair(images, masks).rows


def list_and_pair(images: str, masks: str | None = None) -> PairedSources:
    """List image files and pair each with the mask of the same id; returns partial manifest rows
    (with the :func:`segcore.fsio.signature` of each image and mask file) and the skipped files.

    ``images`` is a directory or a glob; ``masks`` a directory whose files are named like the
    images (any supported suffix). Either may be an fsspec URL of a directory (see
    :mod:`segcore.collection.landing`). Local paths are recorded absolute (:func:`segcore.fsio.absolute`), so the
    manifest and the lake say where a file is whatever the working directory was. An entry named
    like an image that is not a readable file (a directory, a dangling symbolic link; see
    :func:`segcore.collection.listing.list_sources`) is an error row with the reason; files of
    the image directory with other suffixes are skipped, and returned. Raises :class:`NotFound`
    when nothing matches.
    """
    skipped: tuple[str, ...] = ()
    problems: dict[str, str] = {}
    if is_remote(images):
        listed = list_remote_images(images)
    else:
        root = Path(images) if Path(images).is_dir() else None
        listing = list_sources(images)
        skipped = tuple(fsio.absolute(p) for p in listing.skipped)
        problems = {fsio.absolute(p): reason for p, reason in listing.problems}
        listed = [(fsio.absolute(p), image_id_for(p, root), fsio.signature(p)) for p in listing.files]
        listed = sorted(listed + [(path, image_id_for(path, root), None) for path in problems])
    mask_index: dict[str, tuple[str, str | None]] = {}
    if masks is not None and is_remote(masks):
        for url, mask_id, sig in list_remote_images(masks):
            mask_index.setdefault(mask_id, (url, sig))
    elif masks is not None:
        if not Path(masks).is_dir():
            raise NotFound(f"mask directory {masks!r} does not exist")
        for mp in list_images(masks):
            mask_index.setdefault(image_id_for(mp, Path(masks)), (fsio.absolute(mp), fsio.signature(mp)))
    rows, seen = [], set()
    for p, image_id, signature in listed:
        mask, mask_signature = mask_index.get(image_id, (None, None))
        if image_id in seen:
            rows.append(manifest_row(image_id=image_id, source_path=str(p), status="error",
                                     error=f"duplicate image id {image_id!r}: another file has the same name; "
                                           "rename one", mask_status="missing", source_signature=signature))
            continue
        seen.add(image_id)
        if p in problems:
            rows.append(manifest_row(image_id=image_id, source_path=str(p), status="error",
                                     error=f"{p}: {problems[p]}", mask_status="missing"))
            continue
        rows.append(manifest_row(image_id=image_id, source_path=str(p), status="pending",
                                 source_signature=signature, mask_path=str(mask) if mask else None,
                                 mask_signature=mask_signature, mask_status="pending" if mask else "missing"))
    return PairedSources(rows=rows, skipped=skipped)


def probe_sources(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Read headers (not pixels) and hash contents (image and mask); returns new rows with
    shape/dtype and status. A volume file becomes one row per slice (:func:`slice_rows`)."""
    out = []
    for src in rows:
        row = dict(src)
        if row["status"] == "error":
            try:  # hashed all the same, so that an incremental ingest does not report it again
                if entry_problem(row["source_path"]) is None:  # never open a directory or a FIFO
                    row["sha256"] = file_sha256(row["source_path"])
            except OSError:
                pass
            out.append(row)
            continue
        try:
            row["sha256"] = file_sha256(row["source_path"])
            volume = probe_volume(row["source_path"]) if is_volume_candidate(row["source_path"]) else None
            info = probe_image(row["source_path"]) if volume is None else volume
            row.update(height=info.height, width=info.width, channels=info.channels, dtype=info.dtype, status="ok")
        except PermissionError as exc:
            row.update(status="error", error=f"PermissionError: cannot read {row['source_path']} ({exc.strerror}); "
                                             "give the user running segflow read access, or remove the file",
                       mask_status="missing" if row["mask_path"] is None else "skipped")
            out.append(row)
            continue
        except (SegflowError, OSError, ValueError) as exc:
            row.update(status="error", error=f"{type(exc).__name__}: {exc}", mask_status="missing" if row["mask_path"] is None else "skipped")
            out.append(row)
            continue
        if row["mask_path"] is not None:
            try:
                row["mask_sha256"] = file_sha256(row["mask_path"])
                _check_mask(row["mask_path"], info)
                row["mask_status"] = "ok"
            except (SegflowError, OSError, ValueError) as exc:
                row.update(mask_status="error", mask_error=f"{type(exc).__name__}: {exc}")
                if row.get("mask_sha256") is None:  # not even read: no signature, so the next run reads it again
                    row["mask_signature"] = None
        out.extend([row] if volume is None else slice_rows(row, volume))
    return out


def _check_mask(path: str, info: Any) -> None:
    """Raise StoreError when the mask at ``path`` does not fit the image or volume ``info``."""
    if isinstance(info, VolumeInfo):
        minfo = probe_volume(path) if is_volume_candidate(path) else None
        if minfo is None:
            raise StoreError(f"the mask of a volume must be a label volume (NIfTI, a TIFF z-stack or Zarr); {path} "
                             "is a 2-D image")
        if (minfo.depth, minfo.height, minfo.width) != (info.depth, info.height, info.width):
            raise StoreError(f"mask shape {minfo.depth}x{minfo.height}x{minfo.width} differs from volume shape "
                             f"{info.depth}x{info.height}x{info.width}")
        _check_orientation(info.affine, minfo.affine)
        return
    minfo = probe_image(path)
    if (minfo.height, minfo.width) != (info.height, info.width):
        raise StoreError(f"mask shape {minfo.height}x{minfo.width} differs from image shape {info.height}x{info.width}")


def _check_orientation(image: Any, mask: Any) -> None:
    """Raise StoreError when a mask volume's affine orders or flips its voxel axes otherwise than its
    image's (a mask saved by a viewer in another orientation: of the same shape, it would be scored
    voxel by voxel against the wrong anatomy). A mask without an affine, or with the identity (one
    written without orientation), is taken on the image's grid, as are affines that differ in
    spacing or origin only."""
    if image is None or mask is None:
        return
    import numpy as np

    a, b = np.asarray(image, dtype=np.float64), np.asarray(mask, dtype=np.float64)
    if np.allclose(b, np.eye(4)):
        return
    try:
        from nibabel.orientations import aff2axcodes, io_orientation
    except ImportError:  # affines come from NIfTI and DICOM files, read with nibabel
        return
    if not np.array_equal(io_orientation(a), io_orientation(b)):
        raise StoreError(f"the mask's voxel axes are oriented {''.join(aff2axcodes(b))}, the volume's "
                         f"{''.join(aff2axcodes(a))} (their affines): voxel by voxel it would not overlay the image. "
                         "Reorient or resample the mask onto the image's voxel grid (save it with the image's "
                         "affine) and ingest again")


def slice_rows(row: dict[str, Any], volume: VolumeInfo) -> list[dict[str, Any]]:
    """The manifest rows of a probed volume file's slices: one per slice, with image id
    :func:`~segcore.collection.volumes.slice_id` and the volume columns."""
    fields = volume.manifest_fields()
    return [dict(row, image_id=slice_id(row["image_id"], z, volume.depth), volume_id=row["image_id"], slice=z, **fields)
            for z in range(volume.depth)]
