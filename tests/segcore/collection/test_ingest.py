"""The ingest steps of segcore.collection.ingest run serially: create, reuse, append a batch with
changed and new files, a quiet run, an empty landing zone; the result records hand-counted."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from segcore.collection.imageio import write_png
from segcore.collection.ingest import IngestResult, probe_batches, start_ingest, unreadable_note
from segcore.collection.store import read_manifest, write_manifest
from segcore.config import IngestSpec
from tests.segcore.collection.serial import ingest_serially

RNG = np.random.default_rng(3)


def _write(path: Path, arr: np.ndarray, *, stamp: int) -> None:
    write_png(path, arr)
    os.utime(path, (stamp, stamp))  # a modification stamp of its own: the quick check sees the change


def _landing(tmp_path: Path) -> tuple[Path, Path]:
    images, masks = tmp_path / "landing" / "images", tmp_path / "landing" / "masks"
    for name in ("a", "b", "c"):
        _write(images / f"{name}.png", RNG.integers(0, 256, (4, 6), dtype=np.uint8), stamp=1_000)
        _write(masks / f"{name}.png", RNG.integers(0, 2, (4, 6), dtype=np.uint8), stamp=1_000)
    return images, masks


def test_masks_whose_names_match_no_image_are_warned_about(tmp_path):
    images, masks = _landing(tmp_path)
    spec = IngestSpec(images=str(images), masks=str(masks), store=str(tmp_path / "s.zarr"))
    assert start_ingest(spec).warnings == ()
    for name in ("a", "b", "c"):
        (masks / f"{name}.png").rename(masks / f"label-{name}.png")
    (warning,) = start_ingest(spec).warnings
    assert warning.startswith(f"no image has a mask in {masks}") and "e.g. a.png or .tif for a.png" in warning
    (masks / "label-b.png").rename(masks / "b.png")  # one pairs: masks missing for some is counted, not warned
    assert start_ingest(spec).warnings == ()


def test_result_dicts_keep_the_shape_of_each_outcome():
    full = IngestResult(store="s", files=3, new_files=3, images=3, errors=0, groups=1, chunks=2, note="x")
    assert full.to_dict() == {"store": "s", "files": 3, "new_files": 3, "images": 3, "errors": 0, "groups": 1,
                              "chunks": 2}
    reused = IngestResult(store="s", files=3, new_files=0, images=3, errors=0, groups=1, chunks=None, reused=True)
    assert reused.to_dict()["reused"] is True and "superseded" not in reused.to_dict()
    quiet = IngestResult(store="s", files=3, new_files=0, images=0, errors=0, groups=1, chunks=0, superseded=0,
                         hashed=0)
    assert list(quiet.to_dict())[-2:] == ["superseded", "hashed"]


def test_probe_batches_are_labelled_by_file_range(tmp_path):
    spec = IngestSpec(images=str(tmp_path), store=str(tmp_path / "s.zarr"), probe_batch=2)
    rows = [{"source_path": f"/x/{i}.png"} for i in range(5)]
    assert [(label, len(b)) for label, b in probe_batches(spec, rows)] == [
        ("files 0-1", 2), ("files 2-3", 2), ("files 4-4", 1)]


def test_create_reuse_append_and_a_quiet_run(tmp_path):
    images, masks = _landing(tmp_path)
    store = str(tmp_path / "s.zarr")
    spec = IngestSpec(images=str(images), masks=str(masks), store=store, chunk_pixels=48, max_chunk_images=2)
    # 3 images of 4x6: 48 // 24 = 2 per chunk -> one group of 2 chunks
    assert ingest_serially(spec).to_dict() == {"store": store, "files": 3, "new_files": 3, "images": 3, "errors": 0,
                                               "groups": 1, "chunks": 2}
    assert ingest_serially(spec).to_dict() == {"store": store, "files": 3, "new_files": 0, "images": 3, "errors": 0,
                                               "groups": 1, "chunks": None, "reused": True}
    inc = spec.model_copy(update={"incremental": True})
    _write(images / "b.png", RNG.integers(0, 256, (4, 6), dtype=np.uint8), stamp=2_000)  # changed in place
    _write(masks / "c.png", np.ones((4, 6), np.uint8), stamp=2_000)  # a corrected mask
    _write(images / "d.png", RNG.integers(0, 256, (5, 5), dtype=np.uint8), stamp=2_000)  # new, another shape
    _write(masks / "d.png", np.ones((5, 5), np.uint8), stamp=2_000)
    # b and c (4x6) form g001, d (5x5) g002: 48 // 25 = 1 per chunk
    assert ingest_serially(inc).to_dict() == {"store": store, "files": 4, "new_files": 3, "images": 3, "errors": 0,
                                              "groups": 3, "chunks": 2, "superseded": 2, "hashed": 3, "batch": 1}
    manifest = read_manifest(store).to_pylist()
    assert [(r["image_id"], r["batch"], r["superseded_by"] is None) for r in manifest] == [
        ("a", 0, True), ("b", 0, False), ("c", 0, False), ("b", 1, True), ("c", 1, True), ("d", 1, True)]
    assert ingest_serially(inc).to_dict() == {"store": store, "files": 4, "new_files": 0, "images": 0, "errors": 0,
                                              "groups": 3, "chunks": 0, "superseded": 0, "hashed": 0}


def test_an_empty_landing_zone_is_nothing_to_do_and_a_missing_directory_fails(tmp_path):
    (tmp_path / "landing").mkdir()
    spec = IngestSpec(images=str(tmp_path / "landing"), store=str(tmp_path / "s.zarr"), incremental=True)
    assert start_ingest(spec).result.to_dict() == {"store": spec.store, "files": 0, "new_files": 0, "images": 0,
                                                   "errors": 0, "groups": 0, "chunks": 0, "superseded": 0}
    with pytest.raises(FileNotFoundError):
        start_ingest(spec.model_copy(update={"incremental": False}))


def test_other_suffixes_and_constant_images_are_counted_and_problem_entries_are_error_rows(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    write_png(images / "zero.png", np.zeros((4, 6), np.uint8))
    write_png(images / "flat.png", np.full((4, 6), 9, np.uint8))
    write_png(images / "varied.png", np.arange(24, dtype=np.uint8).reshape(4, 6))
    (images / "notes.txt").write_text("x")
    (images / "folder.png").mkdir()
    store = str(tmp_path / "s.zarr")
    result = ingest_serially(IngestSpec(images=str(images), store=store))
    assert (result.files, result.images, result.errors, result.skipped, result.constant_images) == (4, 3, 1, 1, 2)
    assert "2 constant image(s) kept (every pixel one value; 1 all zero): flat, zero" in result.note
    assert "1 file(s) with other suffixes skipped" in result.note
    [bad] = [r for r in read_manifest(store).to_pylist() if r["status"] == "error"]
    assert bad["image_id"] == "folder" and "a directory, not an image file" in bad["error"]
    note = unreadable_note(store)  # what the flow warns about, by name
    assert note.startswith("1 file(s) could not be read and are error rows of the manifest: folder.png (") and \
        "a directory, not an image file" in note
    assert unreadable_note(store, batch=1) is None  # a later batch: none of its files
    long = "it has 1 non-finite pixels (NaN 1, Inf 0) of 65,536; " + "replace them by the image's minimum " * 8
    write_manifest(store, [dict(r, error=long) if r["status"] == "error" else r
                           for r in read_manifest(store).to_pylist()])
    reason = unreadable_note(store).split("folder.png (", 1)[1]
    assert reason.endswith(" ...)") and len(reason) <= 242 and long.startswith(reason[:-5])  # whole words only
