"""The Zarr collection store: images decoded once into chunked arrays, plus a Parquet manifest.

Layout of ``STORE.zarr`` (Zarr v3)::

    zarr.json                 group attributes {"segflow": {format, mask_kind, groups, spec}}
    images/g000               (N, H, W, C) native dtype, chunks (k, H, W, C)
    gt/g000                   (N, H, W) uint32 ground-truth labels, chunks (k, H, W)  [if masks]
    manifest.parquet          one row per source file (see MANIFEST_SCHEMA); written last
    _ingest/                  while an ingest runs: its plan and one marker per chunk written
                              (see segcore.collection.resume; removed with the manifest written)

Source files are listed and probed by :mod:`segcore.collection.sources`. An incremental ingest
(:mod:`segcore.collection.incremental`) appends new groups to a store and rows to its
manifest; it never rewrites the chunks of existing groups.

Images of the same (height, width, channels, dtype) form a *group*; one chunk of ``k`` images
is one work unit of the later inference, so chunk boundaries are unit boundaries. Ground truth
uses the identical chunking. *Large* images (more than ``chunk_pixels`` pixels and a side longer
than ``tile_chunk``) form *tiled* groups instead: chunks ``(1, tile, tile, C)``, one image split
into square blocks of ``tile`` pixels, and each block is one work unit (see
:mod:`segcore.tiling`). Images that cannot be read are manifest rows with
``status="error"`` and no slot; a mask that is missing or does not fit its image leaves the image
ingested without ground truth (``mask_status`` says why).
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from segcore import fsio
from segcore.errors import NotFound, SegflowError, StoreError
from segcore.collection.fingerprint import ATTR as FINGERPRINT, value_range
from segcore.collection.imageio import read_image, read_mask
from segcore.collection.volumes import decode_slab
# manifest_hashes_masks and read_manifest are also this module's names (their home is manifest.py).
from segcore.collection.manifest import (MANIFEST_NAME, MANIFEST_SCHEMA, forget_manifest,  # noqa: F401
                                         manifest_hashes_masks, read_manifest)
from segcore.collection.resume import mark_done

log = logging.getLogger(__name__)

STORE_FORMAT = 1
GT_DTYPE = "uint32"



@dataclass(frozen=True)
class GroupInfo:
    """One array group: ``count`` images of one shape/dtype, ``chunk_images`` per chunk."""

    name: str
    height: int
    width: int
    channels: int
    dtype: str
    count: int
    chunk_images: int
    #: Side of the square spatial chunks of a tiled group (0: chunks hold whole images).
    tile: int = 0
    #: The volume whose slices the group holds, in slice order (None: a group of 2-D images), and
    #: its voxel size ``(z, y, x)`` in ``unit`` (None / "" when unknown).
    volume: str | None = None
    spacing: tuple[float, float, float] | None = None
    unit: str | None = None

    @property
    def n_chunks(self) -> int:
        """Chunks along the image axis (a tiled group: one per image)."""
        return math.ceil(self.count / self.chunk_images)

    @property
    def chunk_shape(self) -> tuple[int, int, int]:
        """``(images, height, width)`` of one chunk of the group's arrays."""
        if self.tile:
            return 1, min(self.tile, self.height), min(self.tile, self.width)
        return self.chunk_images, self.height, self.width

    def chunk_range(self, chunk_index: int) -> tuple[int, int]:
        """``[start, stop)`` image indices of chunk ``chunk_index``."""
        start = chunk_index * self.chunk_images
        return start, min(start + self.chunk_images, self.count)


@dataclass(frozen=True)
class StoreInfo:
    """What an opened store holds."""

    path: str
    groups: tuple[GroupInfo, ...]
    mask_kind: str
    has_gt: bool
    spec: dict[str, Any]
    #: Changes whenever the store is created anew (None: created before ids existed).
    store_id: str | None = None
    #: The dataset fingerprint its ingest recorded (:mod:`segcore.collection.fingerprint`; None:
    #: ingested before fingerprints, or an ingest that has not finished).
    fingerprint: dict[str, Any] | None = None

    def group(self, name: str) -> GroupInfo:
        for g in self.groups:
            if g.name == name:
                return g
        raise NotFound(f"store {self.path!r} has no group {name!r}; groups: {[g.name for g in self.groups]}")


def manifest_row(**fields: Any) -> dict[str, Any]:
    """A manifest row: ``fields`` over nulls for every column of :data:`MANIFEST_SCHEMA`."""
    row = {name: None for name in MANIFEST_SCHEMA.names}
    row.update(fields)
    return row


def plan_groups(rows: Sequence[dict[str, Any]], *, chunk_pixels: int, max_chunk_images: int,
                tile_chunk: int = 0, first_group: int = 0) -> tuple[list[GroupInfo], list[dict[str, Any]]]:
    """Group readable images by (height, width, channels, dtype) and assign ``group``/``index``.

    The slices of a volume (rows with a ``volume_id``) form a group of their own, in slice order,
    so that a chunk of the group is a slab of the volume; 2-D images come first (``""`` sorts
    first), then volumes by id.

    Chunks hold ``clamp(chunk_pixels // (H*W), 1, max_chunk_images)`` images. With
    ``tile_chunk > 0``, images of more than ``chunk_pixels`` pixels with a side longer than
    ``tile_chunk`` are chunked spatially instead, in ``tile_chunk`` squares (a tiled group).
    Groups are named ``g000``, ``g001``, ... from ``first_group`` on (an incremental ingest
    appends groups after the store's existing ones). Returns the groups and new rows (inputs are
    not modified), ordered by group then index, errors last.
    """
    keyed: dict[tuple, list[dict[str, Any]]] = {}
    errors = []
    for r in rows:
        if r["status"] == "ok":
            volume = r.get("volume_id") or ""
            keyed.setdefault((volume, r["height"], r["width"], r["channels"], r["dtype"]), []).append(r)
        else:
            errors.append(dict(r, group=None, index=-1))
    groups, out = [], []
    for gi, key in enumerate(sorted(keyed)):
        volume, h, w, c, dt = key
        members = sorted(keyed[key], key=lambda r: (r.get("slice") or 0, r["image_id"]))
        k = int(max(1, min(max_chunk_images, chunk_pixels // (h * w))))
        tile = tile_chunk if tile_chunk > 0 and h * w > chunk_pixels and max(h, w) > tile_chunk else 0
        first = members[0]
        spacing = tuple(float(first[f"spacing_{a}"]) for a in "zyx") if volume and first.get("spacing_z") else None
        g = GroupInfo(name=f"g{first_group + gi:03d}", height=h, width=w, channels=c, dtype=dt, count=len(members),
                      chunk_images=1 if tile else k, tile=tile, volume=volume or None, spacing=spacing,
                      unit=(first.get("spacing_unit") or None) if volume else None)
        groups.append(g)
        out.extend(dict(r, group=g.name, index=i) for i, r in enumerate(members))
    return groups, out + errors


def store_root(location: str, *, mode: str = "r") -> zarr.Group:
    """The root Zarr group of the store at ``location``: a path, or an fsspec URL such as
    ``s3://bucket/collection.zarr`` (read with Zarr v3 over fsspec; credentials and endpoint as
    :mod:`segcore.fsio` says). Every reader and writer of the store's arrays opens it here.
    ``mode``: ``"r"``, ``"r+"`` or ``"w"`` (create, replacing)."""
    return zarr.open_group(fsio.local_path(location) or os.fspath(location), mode=mode)


def store_exists(path: str) -> bool:
    """True when ``path`` (a path or URL) exists and is not an empty directory."""
    fs, where = fsio.url_to_fs(path)
    if not fs.exists(where):
        return False
    return not fs.isdir(where) or bool(fs.ls(where, detail=False))


def has_manifest(path: str) -> bool:
    """True when the store's ingest finished (its manifest was written last)."""
    return fsio.exists(fsio.join(path, MANIFEST_NAME))


def existing_store_matches(path: str, *, spec: dict[str, Any], rows: Sequence[dict[str, Any]]) -> bool:
    """True when ``path`` is a finished store ingested with the same ``spec`` from exactly the files
    of ``rows`` (the listing's partial manifest rows): the same images, each paired with the same
    mask (or none), and neither changed since (size and modification stamp, where the store
    recorded them).

    Raises :class:`StoreError` when ``path`` exists but holds something else (another ingest, an
    unfinished one, other files or changed ones, or not a store), naming what differs, so that
    nothing is overwritten or reused by accident.
    """
    if not store_exists(path):
        return False
    info = open_store(path)
    ignore = {"overwrite", "incremental", "wait_for_lease"}  # how to ingest, not what the store holds
    same_spec = all(spec.get(k) == v for k, v in info.spec.items() if k not in ignore)  # keys newer than the store: defaults
    finished = has_manifest(path)
    what = "a finished ingest with other options" if finished else "an unfinished ingest"
    if same_spec and finished:
        differs = _changed_files(read_manifest(path), rows)
        if not differs:
            return True
        what = f"an ingest of other files ({differs})"
    raise StoreError(f"store {path!r} already exists and holds {what}; choose a new path, pass --incremental to "
                     "ingest what changed as new versions (a changed mask is evaluated again), or pass --overwrite "
                     "to replace it")


def _changed_files(manifest: Any, rows: Sequence[dict[str, Any]]) -> str:
    """What differs between a store's manifest and the files listed now (empty: nothing); one short
    phrase with a count and an example of each kind. Files are compared by their identity
    (:func:`segcore.collection.resume.identity`: path, mask path, and both signatures); a signature the
    manifest lacks (made before signatures were recorded) is not compared."""
    from segcore.collection.resume import identity
    from segcore.collection.versions import current_manifest

    def by_source(tuples: Sequence[tuple[Any, ...]]) -> dict[str, tuple[Any, ...]]:
        # absolute: manifests made before paths were absolute; one entry per file (a volume has a row per slice)
        return {fsio.absolute(t[0]): (fsio.absolute(t[2]) if t[2] else None, t[1], t[3]) for t in tuples}

    recorded, listed = by_source(identity(current_manifest(manifest).to_pylist())), by_source(identity(rows))
    kinds: dict[str, list[str]] = {"image(s) added": sorted(set(listed) - set(recorded)),
                                   "image(s) gone": sorted(set(recorded) - set(listed)),
                                   "mask(s) paired differently": [], "file(s) changed": []}
    for source in sorted(set(listed) & set(recorded)):
        (mask_now, *sigs_now), (mask_then, *sigs_then) = listed[source], recorded[source]
        if mask_now != mask_then:
            kinds["mask(s) paired differently"].append(source)
        elif any(then is not None and now != then for now, then in zip(sigs_now, sigs_then)):
            kinds["file(s) changed"].append(source)
    return "; ".join(f"{len(v)} {k}, e.g. {v[0].rsplit('/', 1)[-1]}" for k, v in kinds.items() if v)


def create_store(path: str, groups: Sequence[GroupInfo], *, with_gt: bool, mask_kind: str,
                 spec: dict[str, Any], overwrite: bool = False) -> None:
    """Create the store's arrays (empty) and attributes at a path or URL. Refuses to replace a store
    unless ``overwrite``."""
    if store_exists(path):
        if not overwrite:
            raise StoreError(f"store {path!r} already exists; choose a new path or pass --overwrite to replace it")
        open_store(path)  # only ever delete a segflow store, never another directory
        fs, where = fsio.url_to_fs(path)
        fs.rm(where, recursive=True)
    root = store_root(path, mode="w")
    root.attrs["segflow"] = {
        "format": STORE_FORMAT,
        "store_id": uuid.uuid4().hex,  # a new id each time the store is (re)created
        "mask_kind": mask_kind,
        "has_gt": bool(with_gt),
        "groups": [asdict(g) for g in groups],
        "spec": spec,
    }
    create_group_arrays(root, groups, with_gt=with_gt)


def create_group_arrays(root: zarr.Group, groups: Sequence[GroupInfo], *, with_gt: bool) -> None:
    for g in groups:
        root.create_array(f"images/{g.name}", shape=(g.count, g.height, g.width, g.channels),
                          chunks=g.chunk_shape + (g.channels,), dtype=g.dtype, fill_value=0,
                          dimension_names=("image", "y", "x", "c"))
        if with_gt:
            root.create_array(f"gt/{g.name}", shape=(g.count, g.height, g.width), chunks=g.chunk_shape,
                              dtype=GT_DTYPE, fill_value=0, dimension_names=("image", "y", "x"))


def open_store(path: str) -> StoreInfo:
    """Open a store made by :func:`create_store` at a path or fsspec URL; raises NotFound/StoreError
    with what to do."""
    if not fsio.exists(path):
        raise NotFound(f"store {path!r} does not exist; create it with 'segflow ingest' (a store at a URL: check "
                       "the URL and the credentials in the environment)")
    try:
        root = store_root(path)
        attrs = dict(root.attrs)["segflow"]
    except (KeyError, ValueError, OSError, zarr.errors.BaseZarrError) as exc:
        raise StoreError(f"{path!r} is not a segflow store (made by 'segflow ingest'): {exc}") from exc
    if not isinstance(attrs, dict) or not {"groups", "mask_kind", "has_gt"} <= attrs.keys():
        # another segflow array (a run's masks.zarr, say) carries segflow attributes too
        raise StoreError(f"{path!r} is not a segflow store (made by 'segflow ingest'): its segflow attributes lack "
                         "the store's groups; give the store's own location (a run's masks.zarr is not a store)")
    if attrs.get("format", 0) > STORE_FORMAT:
        raise StoreError(f"store {path!r} has format {attrs['format']}; this segflow reads up to {STORE_FORMAT}")
    try:
        groups = tuple(GroupInfo(**g) for g in attrs["groups"])
    except TypeError as exc:
        raise StoreError(f"{path!r} is not a segflow store of a format this segflow reads: its groups do not "
                         f"fit ({exc})") from exc
    return StoreInfo(path=str(path), groups=groups, mask_kind=attrs["mask_kind"], has_gt=attrs["has_gt"],
                     spec=attrs.get("spec", {}), store_id=attrs.get("store_id"), fingerprint=attrs.get(FINGERPRINT))


def write_store_chunk(store_path: str, rows: Sequence[dict[str, Any]], *, threads: int | None = None) -> list[dict[str, Any]]:
    """Decode the images (and masks) of one chunk and write it; returns the rows with final status.

    ``rows`` are the manifest rows of exactly one chunk of one group, in index order. A file that
    fails to decode becomes an error row and its slot stays zero; the rest is written. Files are
    decoded by ``threads`` threads (default: all cores; the decoders release the GIL). During an
    ingest (a plan recorded in the store) the chunk is then marked written with the returned rows
    (:func:`segcore.collection.resume.mark_done`), so that a re-run of an interrupted ingest keeps it.
    """
    if not rows:
        return []
    info = open_store(store_path)
    g = info.group(rows[0]["group"])
    start = rows[0]["index"]
    stop = rows[-1]["index"] + 1
    if start % g.chunk_images or stop != min(start + g.chunk_images, g.count) or len(rows) != stop - start:
        raise StoreError(f"rows {start}..{stop} of {g.name} are not exactly one chunk of {g.chunk_images} images")
    images = np.zeros((stop - start, g.height, g.width, g.channels), dtype=g.dtype)
    gts = np.zeros((stop - start, g.height, g.width), dtype=GT_DTYPE) if info.has_gt else None

    def decode(i: int, src: dict[str, Any]) -> dict[str, Any]:
        row = dict(src)
        try:
            img = read_image(row["source_path"])
            if img.shape != images.shape[1:] or str(img.dtype) != g.dtype:
                raise StoreError(f"decoded shape {img.shape} {img.dtype} differs from its header {images.shape[1:]} {g.dtype}")
            images[i] = img
            row.update(value_range(img))  # for the store's fingerprint (not a manifest column)
        except (SegflowError, OSError, ValueError) as exc:
            row.update(status="error", error=f"{type(exc).__name__}: {exc}",
                       mask_status="skipped" if row["mask_path"] is not None else "missing")
        if gts is not None and row["mask_status"] == "ok" and row["status"] == "ok":
            try:
                m = read_mask(row["mask_path"])
                if m.shape != gts.shape[1:]:
                    raise StoreError(f"mask shape {m.shape} differs from image shape {gts.shape[1:]}")
                gts[i] = m
                if info.mask_kind == "class":  # for the store's fingerprint (not a manifest column)
                    row["mask_max"] = int(gts[i].max(initial=0))
            except (SegflowError, OSError, ValueError) as exc:
                row.update(mask_status="error", mask_error=f"{type(exc).__name__}: {exc}")
        return row

    if g.volume is not None:
        out = decode_slab(rows, images, gts, class_masks=info.mask_kind == "class")
    else:
        with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
            out = list(pool.map(decode, range(len(rows)), rows))
    root = store_root(store_path, mode="r+")
    root[f"images/{g.name}"][start:stop] = images
    if gts is not None:
        root[f"gt/{g.name}"][start:stop] = gts
    mark_done(store_path, out)  # after the data: a chunk with a marker is whole
    return out


def write_manifest(store_path: str, rows: Iterable[dict[str, Any]]) -> str:
    """Write the manifest Parquet whole (locally: write, then rename); returns its location."""
    table = pa.Table.from_pylist([manifest_row(**{k: r.get(k) for k in MANIFEST_SCHEMA.names}) for r in rows],
                                 schema=MANIFEST_SCHEMA)
    dest = fsio.join(store_path, MANIFEST_NAME)
    fsio.write_bytes(dest, fsio.to_buffer(lambda fh: pq.write_table(table, fh)))
    forget_manifest(dest)
    return dest


def chunk_rows(rows: Sequence[dict[str, Any]], groups: Sequence[GroupInfo]) -> list[list[dict[str, Any]]]:
    """Split planned rows into per-chunk lists (the ingest work units), in group/index order."""
    by_group: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("group") is not None:
            by_group.setdefault(r["group"], []).append(r)
    chunks = []
    for g in groups:
        members = sorted(by_group.get(g.name, []), key=lambda r: r["index"])
        for c in range(g.n_chunks):
            s, e = g.chunk_range(c)
            chunks.append(members[s:e])
    return chunks


def spec_json(spec: Any) -> dict[str, Any]:
    """A JSON-able dict of a pydantic spec (or a dict), for attributes and metadata."""
    if hasattr(spec, "model_dump"):
        return json.loads(spec.model_dump_json())
    return json.loads(json.dumps(spec))
