"""Incremental ingest from a landing zone: which files are new, and which old versions they supersede.

A scheduled run lists the landing zone and hashes every file (sha256 of its bytes, and of its
mask's) whose size and modification stamp, or its mask's, differ from those recorded when its path
was last ingested (a file with the same signatures is taken as unchanged, the quick check of
rsync; a file hashed again and found unchanged gets its new signatures recorded), and compares
the hashes with the store's manifest:

- a file whose content is the current version of its image id, or (for a new id) the content of
  any image of the store (a renamed copy), is skipped: nothing is decoded, segmented or
  evaluated twice;
- a file with new content is ingested as a new *batch* (new groups appended to the store, rows
  appended to the manifest with ``batch`` = previous maximum + 1);
- a file of a known image id with a new or changed mask (same image bytes, other mask bytes) is
  a new version too: its ground truth changed, so it is ingested and evaluated again;
- when the new content has the id of an image the store already holds (the file or its mask
  changed in place), the old manifest row gets ``superseded_by`` = the new version's image
  sha256 (the same sha256 when only the mask changed). The old masks and Dice rows stay where
  they are (tables are append-only); run summaries, ``RunReader`` and ``segflow report`` use the
  current version only, by the one rule of :mod:`segcore.collection.versions` (in SQL too, for
  lake readers).

Files that disappear from the landing zone are kept in the store; a mask that disappears leaves
the version ingested with it current. Masks are signed and hashed like images (manifest columns
``mask_signature`` and ``mask_sha256``).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Sequence

import pyarrow as pa

from segcore import fsio
from segcore.errors import StoreError
from segcore.collection.store import GroupInfo, StoreInfo, create_group_arrays, open_store, store_root


def next_batch(manifest: pa.Table) -> int:
    """Batch number of the next incremental ingest (0 for an empty manifest; rows without one count as 0)."""
    batches = [b or 0 for b in manifest.column("batch").to_pylist()]
    return max(batches) + 1 if batches else 0


#: The manifest columns that decide whether a file is known, changed or unchanged.
_IDENTITY = ["image_id", "source_path", "batch", "sha256", "source_signature", "mask_sha256", "mask_signature",
             "mask_status"]


def _latest(rows: Sequence[dict[str, Any]], key: str) -> dict[str, dict[str, Any]]:
    """Per value of ``key``, the manifest row (the object of ``rows``) of the highest batch; rows
    without a batch count as 0, and source paths compare absolute."""
    last: dict[str, dict[str, Any]] = {}
    for r in rows:
        k = fsio.absolute(r[key]) if key == "source_path" else r[key]  # manifests made before paths were absolute
        if k not in last or (r["batch"] or 0) >= (last[k]["batch"] or 0):
            last[k] = r
    return last


def unchanged_sources(rows: Sequence[dict[str, Any]], manifest: pa.Table) -> list[dict[str, Any]]:
    """Rows of ``rows`` (from :func:`segcore.collection.sources.pair_sources`) whose image file, and mask file
    if they have one, have the signatures (size and modification stamp) recorded when the same
    path was last ingested: already in the store, so they need neither staging nor hashing."""
    if not rows:
        return []
    last = _latest(manifest.select(_IDENTITY).to_pylist(), "source_path")
    out = []
    for r in rows:
        known = last.get(fsio.absolute(r["source_path"]))
        if (known is None or r["status"] != "pending" or r.get("source_signature") is None
                or known["source_signature"] != r["source_signature"]):
            continue
        if r.get("mask_path") is not None and known["mask_signature"] != r.get("mask_signature"):
            continue  # a new or changed mask (a mask that disappeared is not a change)
        out.append(r)
    return out


def _unhashed_mask(known: dict[str, Any], masks_unhashed: bool) -> bool:
    """Whether ``known`` had a mask recorded by a manifest that did not hash masks yet."""
    return masks_unhashed and known["mask_sha256"] is None and known["mask_status"] in ("ok", "error")


def _mask_changed(row: dict[str, Any], known: dict[str, Any], masks_unhashed: bool) -> bool:
    """Whether ``row`` brings a mask that differs from the one of its id's current version ``known``."""
    if row.get("mask_sha256") is None:
        return False  # no mask now (or it could not be read): the version with its mask stands
    if _unhashed_mask(known, masks_unhashed):
        return False  # nothing to compare with; refresh_signatures records its hash now
    return row["mask_sha256"] != known["mask_sha256"]


def select_new(probed: Sequence[dict[str, Any]], manifest: pa.Table, *,
               masks_unhashed: bool = False) -> list[dict[str, Any]]:
    """Rows of ``probed`` (landing-zone rows with ``sha256``) that the store does not hold yet.

    A file is new when its image id is known and its content differs from that id's current
    (latest) version, including a file changed back to an older content, or when it comes with a
    new or changed mask; or when its id is unknown and no image of the store has its content (a
    renamed copy is not new, whatever its mask). A file that could not be hashed (unreadable) is
    kept, so it is reported; among files with the same new image and mask content only the first
    (by image id) is kept (the slices of a volume, which share their file's hash, count apart). ``masks_unhashed``: the manifest was written before masks were hashed
    (:func:`segcore.collection.store.manifest_hashes_masks`), so its masks are taken as unchanged.
    """
    if not probed:
        return []
    seen = {s for s in manifest.column("sha256").to_pylist() if s is not None}
    current = _latest(manifest.select(_IDENTITY).to_pylist(), "image_id")
    out, taken = [], set()
    for row in sorted(probed, key=lambda r: (r["image_id"], r["source_path"])):
        sha = row.get("sha256")
        if sha is not None:
            known = current.get(row["image_id"])
            if known is not None:
                if known["sha256"] == sha and not _mask_changed(row, known, masks_unhashed):
                    continue
            elif sha in seen:
                continue
            content = (sha, row.get("mask_sha256"), row.get("slice"))  # the slices of a volume share its hash
            if content in taken:
                continue
            taken.add(content)
        out.append(row)
    return out


def refresh_signatures(manifest: pa.Table, probed: Sequence[dict[str, Any]], *,
                       masks_unhashed: bool = False) -> tuple[pa.Table, int]:
    """The manifest with the recorded signatures of files that were hashed again and found
    unchanged (touched, or copied again without their times) set to their new ones, so that the
    next run's quick check skips them; and how many rows changed.

    Only the current version of an image id is updated, and only when the file is the one it was
    ingested from with the same content (its mask's signature when the mask is the same too). With
    ``masks_unhashed`` (a manifest written before masks were hashed), a mask recorded without a
    hash gets the hash and signature of the file now paired with it.
    """
    if not probed:  # a quiet run: nothing was read again
        return manifest, 0
    rows = manifest.to_pylist()
    current = _latest(rows, "image_id")  # the row objects of ``rows``: updated in place
    changed = 0
    for p in probed:
        r = current.get(p["image_id"])
        if r is None or p.get("sha256") is None:
            continue
        same_file = fsio.absolute(r["source_path"]) == fsio.absolute(p.get("source_url", p["source_path"]))
        if not same_file or r["sha256"] != p["sha256"] or _mask_changed(p, r, masks_unhashed):
            continue
        update = {"source_signature": p.get("source_signature")}
        if p.get("mask_sha256") is not None and p["mask_sha256"] == r["mask_sha256"]:
            update["mask_signature"] = p.get("mask_signature")
        elif p.get("mask_sha256") is not None and _unhashed_mask(r, masks_unhashed):
            update.update(mask_sha256=p["mask_sha256"], mask_signature=p.get("mask_signature"))
        update = {c: v for c, v in update.items() if v is not None}
        if any(r[c] != v for c, v in update.items()):
            r.update(update)
            changed += 1
    return (pa.Table.from_pylist(rows, schema=manifest.schema) if changed else manifest), changed


def supersede(manifest: pa.Table, new_rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The old manifest rows, with ``superseded_by`` set where a new readable row has the same image id,
    or (a slice of a volume) belongs to the same volume: a new version of a volume replaces every
    slice of the old one, also those beyond its new depth."""
    readable = [r for r in new_rows if r.get("status") == "ok" and r.get("group") is not None]
    newer = {r["image_id"]: r["sha256"] for r in readable}
    volumes = {r["volume_id"]: r["sha256"] for r in readable if r.get("volume_id")}
    rows = manifest.to_pylist()
    for r in rows:
        if r["superseded_by"] is None and r["status"] == "ok":
            by = newer.get(r["image_id"]) or (volumes.get(r["volume_id"]) if r.get("volume_id") else None)
            if by is not None:
                r["superseded_by"] = by
    return rows


def drop_unlisted_groups(path: str, manifest: pa.Table) -> StoreInfo:
    """Remove groups that no manifest row references: the leftovers of an incremental ingest that
    was interrupted after appending groups and before writing the manifest. Returns the store."""
    info = open_store(path)
    used = {g for g in manifest.column("group").to_pylist() if g is not None}
    orphans = [g for g in info.groups if g.name not in used]
    if not orphans:
        return info
    root = store_root(path, mode="r+")
    attrs = dict(root.attrs["segflow"])
    attrs["groups"] = [asdict(g) for g in info.groups if g.name in used]
    root.attrs["segflow"] = attrs
    for g in orphans:
        for kind in ("images", "gt"):
            if f"{kind}/{g.name}" in root:
                del root[f"{kind}/{g.name}"]
    return open_store(path)


def append_groups(path: str, groups: Sequence[GroupInfo]) -> StoreInfo:
    """Add the (empty) arrays of new ``groups`` to an existing store; existing arrays are untouched.

    The groups are listed in the store's attributes at once, but their images count only once the
    manifest references them: :func:`drop_unlisted_groups` removes the groups of an append that
    was interrupted before its manifest was written.
    """
    info = open_store(path)
    clash = sorted({g.name for g in info.groups} & {g.name for g in groups})
    if clash:
        raise StoreError(f"store {path!r} already has group(s) {clash}; new groups must have new names")
    root = store_root(path, mode="r+")
    for g in groups:  # arrays left by an interrupted append that were never listed
        for kind in ("images", "gt"):
            if f"{kind}/{g.name}" in root:
                del root[f"{kind}/{g.name}"]
    create_group_arrays(root, groups, with_gt=info.has_gt)
    attrs = dict(root.attrs["segflow"])
    attrs["groups"] = [asdict(g) for g in info.groups + tuple(groups)]
    root.attrs["segflow"] = attrs
    return open_store(path)
