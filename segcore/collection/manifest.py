"""The store manifest: its schema, and reading it once per process.

``manifest.parquet`` holds one row per source file (:data:`MANIFEST_SCHEMA`); it is written last
by ingest (:func:`segcore.collection.store.write_manifest`). Every work unit looks up its rows in
it, so a process keeps the manifest it read while the file is unchanged (:func:`read_manifest`).
"""

from __future__ import annotations

import os
import threading
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from segcore import fsio
from segcore.errors import StoreError

MANIFEST_NAME = "manifest.parquet"

MANIFEST_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("source_path", pa.string()),
        ("sha256", pa.string()),
        ("height", pa.int64()),
        ("width", pa.int64()),
        ("channels", pa.int64()),
        ("dtype", pa.string()),
        ("group", pa.string()),
        ("index", pa.int64()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("mask_path", pa.string()),
        ("mask_status", pa.string()),
        ("mask_error", pa.string()),
        # Incremental ingest (see segcore.collection.incremental): 0 for the first ingest, then 1, 2, ...
        ("batch", pa.int64()),
        # sha256 of the newer content of the same image id, once a changed file was ingested again.
        ("superseded_by", pa.string()),
        # Size and modification stamp of the source file when it was hashed (see fsio.signature).
        ("source_signature", pa.string()),
        # The same two for the mask file (null without one): a corrected mask is a new version.
        ("mask_sha256", pa.string()),
        ("mask_signature", pa.string()),
        # Volumes (see segcore.collection.volumes): one row per slice, null for 2-D images. The
        # volume's id (its file's image id), the slice's index along the depth axis, the depth,
        # the voxel spacing (z, y, x) in spacing_unit, and the NIfTI affine as JSON (4x4).
        ("volume_id", pa.string()),
        ("slice", pa.int64()),
        ("depth", pa.int64()),
        ("spacing_z", pa.float64()),
        ("spacing_y", pa.float64()),
        ("spacing_x", pa.float64()),
        ("spacing_unit", pa.string()),
        ("affine", pa.string()),
    ]
)


def manifest_hashes_masks(store_path: str) -> bool:
    """Whether the store's manifest records mask hashes (``mask_sha256``); manifests written before
    that column existed recorded masks without them."""
    fs, path = fsio.url_to_fs(fsio.join(store_path, MANIFEST_NAME))
    try:
        with fs.open(path, "rb") as f:  # the footer only, not the rows
            names = pq.read_schema(f).names
    except FileNotFoundError:
        raise _no_manifest(store_path) from None
    return "mask_sha256" in names


def _no_manifest(store_path: str) -> StoreError:
    return StoreError(f"store {store_path!r} has no manifest; its ingest did not finish - run 'segflow ingest' "
                      "again")


def _manifest_file(store_path: str) -> pq.ParquetFile:
    try:
        data = fsio.read_bytes(fsio.join(store_path, MANIFEST_NAME))
    except FileNotFoundError:
        raise _no_manifest(store_path) from None
    return pq.ParquetFile(pa.BufferReader(data))


#: The manifests this process read last, by absolute location: ``(identity, table)``. Every work unit
#: looks up its rows in the manifest; with this a worker reads the file once per run, not once per
#: unit (a manifest of 100,000 images is about 17 MB), and again only when the file has changed.
_MANIFESTS: dict[str, tuple[Any, pa.Table]] = {}
_MANIFESTS_KEPT = 2
_MANIFESTS_LOCK = threading.Lock()


def _manifest_identity(location: str) -> Any:
    """What changes whenever the manifest file is replaced: inode, size and modification time of a
    local file (written by rename, so every write is a new inode); the size and ETag or stamp on
    other filesystems. None when it cannot be told (the file is then read every time)."""
    local = fsio.local_path(location)
    if local is None:
        return fsio.signature(location)
    try:
        st = os.stat(local)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def forget_manifest(location: str) -> None:
    """Drop this process's copy of the manifest at ``location`` (its writer calls this)."""
    with _MANIFESTS_LOCK:
        _MANIFESTS.pop(fsio.absolute(location), None)


def read_manifest(store_path: str) -> pa.Table:
    """The store's manifest table (see MANIFEST_SCHEMA), at a path or URL: one read of its file, or
    none when this process read the same file before (see ``_MANIFESTS``)."""
    location = fsio.absolute(fsio.join(store_path, MANIFEST_NAME))
    identity = _manifest_identity(location)
    with _MANIFESTS_LOCK:
        kept = _MANIFESTS.get(location)
    if identity is not None and kept is not None and kept[0] == identity:
        return kept[1]
    table = _manifest_file(store_path).read()
    for field in MANIFEST_SCHEMA:  # stores ingested before a column existed
        if field.name not in table.column_names:
            fill = pa.array([0] * table.num_rows if field.name == "batch" else [None] * table.num_rows, field.type)
            table = table.append_column(field, fill)
    table = table.select(MANIFEST_SCHEMA.names)
    if identity is not None:
        with _MANIFESTS_LOCK:
            _MANIFESTS.pop(location, None)
            _MANIFESTS[location] = (identity, table)
            while len(_MANIFESTS) > _MANIFESTS_KEPT:
                _MANIFESTS.pop(next(iter(_MANIFESTS)))
    return table


__all__ = ["MANIFEST_NAME", "MANIFEST_SCHEMA", "forget_manifest", "manifest_hashes_masks",
           "read_manifest"]
