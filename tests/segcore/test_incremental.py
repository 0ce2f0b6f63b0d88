"""Which landing-zone files are new, which versions they supersede, and recovery of an interrupted append."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from segcore.errors import StoreError
from segcore import fsio
from segcore.incremental import (append_groups, drop_unlisted_groups, next_batch, select_new, supersede,
                                 superseded_slots, unchanged_sources)
from segcore.store import MANIFEST_SCHEMA, GroupInfo, create_store, open_store


def _manifest(rows: list[tuple[str, str, int, str | None]]) -> pa.Table:
    """Rows ``(image_id, sha256, batch, superseded_by)``, all readable, in group g000."""
    return pa.Table.from_pylist(
        [{"image_id": i, "sha256": s, "batch": b, "superseded_by": sup, "status": "ok", "group": "g000", "index": k,
          "source_path": f"/landing/{i}.png"} for k, (i, s, b, sup) in enumerate(rows)], schema=MANIFEST_SCHEMA)


def _probed(*rows: tuple[str, str | None]) -> list[dict]:
    return [{"image_id": i, "sha256": s, "source_path": f"/landing/{i}.png", "status": "ok"} for i, s in rows]


def test_new_content_is_selected_and_seen_content_is_not():
    manifest = _manifest([("a", "h1", 0, None), ("b", "h2", 0, None)])
    got = select_new(_probed(("a", "h1"), ("b", "h9"), ("c", "h3"), ("d", "h2"), ("e", "h3"), ("f", None)), manifest)
    # b changed; c is new; d is a renamed copy of b's old content; e repeats c's new content; f is unreadable
    assert [r["image_id"] for r in got] == ["b", "c", "f"]


def test_a_file_changed_back_to_an_older_content_is_new():
    manifest = _manifest([("a", "h1", 0, "h2"), ("a", "h2", 1, None)])
    assert [r["sha256"] for r in select_new(_probed(("a", "h1")), manifest)] == ["h1"]
    assert select_new(_probed(("a", "h2")), manifest) == []


def test_supersede_marks_the_old_readable_version_only():
    manifest = _manifest([("a", "h1", 0, None), ("b", "h2", 0, None)])
    new = [{"image_id": "a", "sha256": "h5", "status": "ok", "group": "g001"},
           {"image_id": "b", "sha256": "h6", "status": "error", "group": None}]
    rows = supersede(manifest, new)
    assert [r["superseded_by"] for r in rows] == ["h5", None]
    assert superseded_slots(pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)) == {("g000", "a")}
    assert manifest.column("superseded_by").null_count == 2  # the caller's table is not changed


def test_next_batch_counts_rows_without_a_batch_as_batch_zero():
    assert next_batch(_manifest([])) == 0
    assert next_batch(_manifest([("a", "h1", None, None)])) == 1
    assert next_batch(_manifest([("a", "h1", 0, None), ("b", "h2", 3, None)])) == 4


def _group(name: str, count: int = 2) -> GroupInfo:
    return GroupInfo(name=name, height=8, width=8, channels=1, dtype="uint8", count=count, chunk_images=2)


def test_an_interrupted_append_is_dropped_and_can_be_redone(tmp_path):
    path = str(tmp_path / "s.zarr")
    create_store(path, [_group("g000")], with_gt=False, mask_kind="class", spec={})
    manifest = _manifest([("a", "h1", 0, None), ("b", "h2", 0, None)])
    append_groups(path, [_group("g001")])  # ... and the run died before its manifest was written
    assert [g.name for g in open_store(path).groups] == ["g000", "g001"]
    with pytest.raises(StoreError, match="already has"):
        append_groups(path, [_group("g001")])
    info = drop_unlisted_groups(path, manifest)
    assert [g.name for g in info.groups] == ["g000"]
    info = append_groups(path, [_group("g001", count=3)])
    assert info.group("g001").count == 3
    import zarr

    assert zarr.open_group(path, mode="r")["images/g001"].shape == (3, 8, 8, 1)
    assert np.all(zarr.open_group(path, mode="r")["images/g000"][:] == 0)


def test_unchanged_sources_are_those_with_the_signature_recorded_for_their_path(tmp_path):
    f = tmp_path / "a.png"
    f.write_bytes(b"x" * 10)
    sig = fsio.signature(f)
    assert sig is not None and sig.startswith("10:")
    manifest = pa.Table.from_pylist(
        [{"image_id": "a", "source_path": str(f), "sha256": "h0", "batch": 0, "source_signature": "10:1"},
         {"image_id": "a", "source_path": str(f), "sha256": "h1", "batch": 1, "source_signature": sig},
         {"image_id": "b", "source_path": "/gone.png", "sha256": "h2", "batch": 0, "source_signature": None}],
        schema=MANIFEST_SCHEMA)
    rows = [{"image_id": "a", "source_path": str(f), "status": "pending", "source_signature": sig},
            {"image_id": "b", "source_path": "/gone.png", "status": "pending", "source_signature": None},
            {"image_id": "c", "source_path": "/new.png", "status": "pending", "source_signature": "5:5"}]
    assert [r["image_id"] for r in unchanged_sources(rows, manifest)] == ["a"]
    os.utime(f, ns=(7, 7))
    rows[0]["source_signature"] = fsio.signature(f)
    assert unchanged_sources(rows, manifest) == []
    assert fsio.signature(tmp_path / "missing.png") is None
