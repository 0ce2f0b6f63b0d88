"""Which landing-zone files are new, which versions they supersede, and recovery of an interrupted append."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pytest

from segcore.errors import StoreError
from segcore import fsio
from segcore.collection.incremental import (append_groups, drop_unlisted_groups, next_batch, refresh_signatures, select_new,
                                 supersede, unchanged_sources)
from segcore.collection.versions import superseded_slots
from segcore.collection.store import MANIFEST_SCHEMA, GroupInfo, create_store, open_store


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


def _masked(rows: list[tuple[str, str, str | None, str]]) -> pa.Table:
    """Rows ``(image_id, sha256, mask_sha256, mask_status)`` of batch 0, all readable."""
    return pa.Table.from_pylist(
        [{"image_id": i, "sha256": s, "mask_sha256": m, "mask_status": ms, "batch": 0, "status": "ok",
          "group": "g000", "index": k, "source_path": f"/landing/{i}.png"} for k, (i, s, m, ms) in enumerate(rows)],
        schema=MANIFEST_SCHEMA)


def test_a_new_or_changed_mask_makes_a_new_version_and_a_vanished_one_does_not():
    manifest = _masked([("a", "h1", "m1", "ok"), ("b", "h2", None, "missing"), ("d", "h4", "m4", "error")])
    probed = [dict(r, mask_sha256=m) for r, m in zip(
        _probed(("a", "h1"), ("b", "h2"), ("d", "h4"), ("e", "h1")), ("m9", "m2", "m5", "m9"))]
    # a: corrected mask; b: a mask where there was none; d: a mask that could not be used, replaced;
    # e: a renamed copy of a's image (with another mask: still a copy)
    assert [r["image_id"] for r in select_new(probed, manifest)] == ["a", "b", "d"]
    unchanged = [dict(r, mask_sha256=m) for r, m in zip(_probed(("a", "h1"), ("d", "h4")), ("m1", None))]
    assert select_new(unchanged, manifest) == []  # same mask; d's mask is gone: its version stands
    # only the mask changed: the old version is superseded by the same image sha256
    rows = supersede(manifest, [{"image_id": "a", "sha256": "h1", "status": "ok", "group": "g001"}])
    assert [r["superseded_by"] for r in rows] == ["h1", None, None]


def test_masks_of_a_manifest_written_before_masks_were_hashed_are_adopted_not_new():
    manifest = _masked([("a", "h1", None, "ok"), ("b", "h2", None, "error"), ("c", "h3", None, "missing")])
    probed = [dict(r, mask_sha256=m, mask_signature="5:5", source_signature="1:1")
              for r, m in zip(_probed(("a", "h1"), ("b", "h2"), ("c", "h3")), ("m1", "m2", "m3"))]
    # a and b had masks (usable or not) whose bytes were never hashed: nothing to compare with;
    # c had none, so its mask is new. Without the flag, a null hash is simply a different mask.
    assert [r["image_id"] for r in select_new(probed, manifest, masks_unhashed=True)] == ["c"]
    assert [r["image_id"] for r in select_new(probed, manifest)] == ["a", "b", "c"]
    table, changed = refresh_signatures(manifest, probed, masks_unhashed=True)
    assert changed == 2  # c is a new version, not a refreshed one
    assert table.column("mask_sha256").to_pylist() == ["m1", "m2", None]  # the hashes are recorded now
    assert table.column("mask_signature").to_pylist() == ["5:5", "5:5", None]
    assert select_new(probed, table) == [probed[2]]  # ... and compared from then on


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


def test_a_changed_mask_signature_is_not_unchanged(tmp_path):
    image, mask = tmp_path / "a.png", tmp_path / "a-mask.png"
    image.write_bytes(b"i" * 10)
    mask.write_bytes(b"m" * 5)
    manifest = pa.Table.from_pylist(
        [{"image_id": "a", "source_path": str(image), "sha256": "h1", "batch": 0, "source_signature":
          fsio.signature(image), "mask_path": str(mask), "mask_signature": fsio.signature(mask)}], schema=MANIFEST_SCHEMA)
    row = {"image_id": "a", "source_path": str(image), "status": "pending", "source_signature": fsio.signature(image),
           "mask_path": str(mask), "mask_signature": fsio.signature(mask)}
    assert unchanged_sources([row], manifest) == [row]
    os.utime(mask, ns=(7, 7))
    assert unchanged_sources([dict(row, mask_signature=fsio.signature(mask))], manifest) == []
    assert unchanged_sources([dict(row, mask_path=None, mask_signature=None)], manifest) != []  # mask gone


def test_refresh_signatures_records_new_stamps_of_unchanged_current_files_only():
    manifest = pa.Table.from_pylist(
        [{"image_id": "a", "source_path": "/l/a.png", "sha256": "h0", "batch": 0, "source_signature": "1:1",
          "superseded_by": "h1"},
         {"image_id": "a", "source_path": "/l/a.png", "sha256": "h1", "batch": 1, "source_signature": "1:2",
          "mask_sha256": "m1", "mask_signature": "5:1", "mask_status": "ok"},
         {"image_id": "b", "source_path": "/l/b.png", "sha256": "h2", "batch": 0, "source_signature": "2:1"}],
        schema=MANIFEST_SCHEMA)
    probed = [{"image_id": "a", "source_path": "/l/a.png", "sha256": "h1", "source_signature": "1:9",
               "mask_sha256": "m1", "mask_signature": "5:9"},                       # touched, both files
              {"image_id": "b", "source_path": "/stage/b.png", "source_url": "/l/b.png", "sha256": "h2",
               "source_signature": "2:5"},                                          # staged, same content
              {"image_id": "b", "source_path": "/l/other-b.png", "sha256": "h2",
               "source_signature": "9:9"},                                          # another file: not refreshed
              {"image_id": "c", "source_path": "/l/c.png", "sha256": "h8", "source_signature": "4:4"}]
    table, changed = refresh_signatures(manifest, probed)
    assert changed == 2
    assert table.column("source_signature").to_pylist() == ["1:1", "1:9", "2:5"]
    assert table.column("mask_signature").to_pylist() == [None, "5:9", None]
    probed[0]["mask_sha256"] = "m2"  # a changed mask is a new version, not a refreshed stamp
    table, changed = refresh_signatures(manifest, probed)
    assert changed == 1 and table.column("source_signature").to_pylist() == ["1:1", "1:2", "2:5"]
