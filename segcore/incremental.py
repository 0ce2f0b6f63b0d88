"""Incremental ingest from a landing zone: which files are new, and which old versions they supersede.

A scheduled run lists the landing zone, hashes every file (sha256 of its bytes) and compares the
hashes with the store's manifest:

- a file whose content the store has already seen (under any name, readable or not) is skipped:
  nothing is decoded, segmented or evaluated twice;
- a file with new content is ingested as a new *batch* (new groups appended to the store, rows
  appended to the manifest with ``batch`` = previous maximum + 1);
- when the new content has the id of an image the store already holds (the file changed in
  place), the old manifest row gets ``superseded_by`` = the new sha256. The old masks and Dice
  rows stay where they are (tables are append-only); run summaries, ``RunReader`` and
  ``segflow report`` use the current version only, and lake readers can do the same by taking,
  per ``image_id``, the rows of the highest ``ingest_batch``.

Files that disappear from the landing zone are kept in the store.
"""

from __future__ import annotations

from typing import Any, Sequence

import pyarrow as pa


def next_batch(manifest: pa.Table) -> int:
    """Batch number of the next incremental ingest (0 for an empty manifest; rows without one count as 0)."""
    batches = [b or 0 for b in manifest.column("batch").to_pylist()]
    return max(batches) + 1 if batches else 0


def select_new(probed: Sequence[dict[str, Any]], manifest: pa.Table) -> list[dict[str, Any]]:
    """Rows of ``probed`` (landing-zone rows with ``sha256``) whose content the store has not seen.

    A file that could not be hashed (unreadable) is kept, so it is reported; among files with the
    same new content only the first (by image id) is kept.
    """
    seen = {s for s in manifest.column("sha256").to_pylist() if s is not None}
    out = []
    for row in sorted(probed, key=lambda r: (r["image_id"], r["source_path"])):
        sha = row.get("sha256")
        if sha is not None and sha in seen:
            continue
        if sha is not None:
            seen.add(sha)
        out.append(row)
    return out


def supersede(manifest: pa.Table, new_rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The old manifest rows, with ``superseded_by`` set where a new readable row has the same image id."""
    newer = {r["image_id"]: r["sha256"] for r in new_rows if r.get("status") == "ok" and r.get("group") is not None}
    rows = manifest.to_pylist()
    for r in rows:
        if r["superseded_by"] is None and r["status"] == "ok" and r["image_id"] in newer:
            r["superseded_by"] = newer[r["image_id"]]
    return rows


def superseded_slots(manifest: pa.Table) -> set[tuple[str, str]]:
    """``{(group, image_id)}`` of image versions replaced by newer content."""
    return {(r["group"], r["image_id"]) for r in manifest.to_pylist()
            if r["superseded_by"] is not None and r["group"] is not None}


def current_rows(table: pa.Table, manifest: pa.Table, unit_groups: dict[str, str]) -> pa.Table:
    """Rows of a run table (``image_id`` + ``unit`` columns) that belong to current image versions.

    ``unit_groups`` maps unit names (and the part names of tiled images, ``g001-000000``) to groups.
    """
    old = superseded_slots(manifest)
    if not old or table.num_rows == 0:
        return table
    keep = [(unit_groups.get(u, u.split("-")[0]), i) not in old
            for u, i in zip(table.column("unit").to_pylist(), table.column("image_id").to_pylist())]
    return table.filter(pa.array(keep, pa.bool_()))
