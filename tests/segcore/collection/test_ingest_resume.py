"""An ingest interrupted in each phase (before any chunk, midway, after the last chunk, after the
manifest), then run again: it resumes without --overwrite, decodes only the chunks not written,
and the store equals one ingested without interruption. Files of the chunks already written are
overwritten with other bytes of the same size and stamp before the re-run: had the re-run read
them, its store would differ."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import zarr

from segcore.collection.imageio import write_png
from segcore.collection.ingest import finish_ingest, open_append, plan_append, plan_creation, probe_batches, start_ingest
from segcore.collection.resume import RECORD_DIR, done_chunks, read_plan
from segcore.collection.sources import probe_sources
from segcore.collection.store import read_manifest, write_store_chunk
from segcore.config import IngestSpec
from segcore.errors import StoreError
from tests.segcore.collection.serial import ingest_serially

RNG = np.random.default_rng(7)


def _write(path: Path, arr: np.ndarray, *, stamp: int = 1_000) -> None:
    write_png(path, arr)
    os.utime(path, (stamp, stamp))


def _landing(root: Path, names: list[str]) -> tuple[Path, Path]:
    images, masks = root / "images", root / "masks"
    for name in names:
        _write(images / f"{name}.png", RNG.integers(0, 256, (4, 6), dtype=np.uint8))
        _write(masks / f"{name}.png", RNG.integers(0, 3, (4, 6), dtype=np.uint8))
    return images, masks


def _spec(images: Path, masks: Path, store: Path, **kw) -> IngestSpec:
    # 4x6 images, 48 // 24 = 2 per chunk
    return IngestSpec(images=str(images), masks=str(masks), store=str(store), chunk_pixels=48, max_chunk_images=2,
                      **kw)


def _probe(spec: IngestSpec, rows) -> list[dict]:
    return [r for _, batch in probe_batches(spec, rows) for r in probe_sources(batch)]


def _interrupted(spec: IngestSpec, *, chunks_written: int):
    """The steps of an ingest up to ``chunks_written`` chunks written; the manifest is not."""
    start = start_ingest(spec)
    plan = plan_creation(spec, start, _probe(spec, start.rows))
    written = [r for c in plan.chunks[:chunks_written] for r in write_store_chunk(spec.store, list(c), threads=1)]
    return plan, written


def _scramble_files_of_written_chunks(store: str) -> int:
    """Overwrite the image and mask files of every chunk marked written with zeros, keeping size and
    modification stamp (the quick check sees no change); returns how many image files."""
    n = 0
    for rows in done_chunks(store).values():
        for r in rows:
            for path in filter(None, (r["source_path"], r["mask_path"])):
                st = os.stat(path)
                Path(path).write_bytes(bytes(st.st_size))
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
            n += 1
    return n


def assert_same_store(a: str, b: str) -> None:
    """Arrays, manifest, groups and fingerprint equal; no record of an ingest left behind."""
    ra, rb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    sa, sb = dict(ra.attrs)["segflow"], dict(rb.attrs)["segflow"]
    assert sa["groups"] == sb["groups"] and sa.get("fingerprint") == sb.get("fingerprint")
    for g in sa["groups"]:
        for kind in ("images", "gt"):
            if f"{kind}/{g['name']}" in ra:
                np.testing.assert_array_equal(ra[f"{kind}/{g['name']}"][:], rb[f"{kind}/{g['name']}"][:])
    assert read_manifest(a).to_pylist() == read_manifest(b).to_pylist()
    assert not (Path(a) / RECORD_DIR).exists() and not (Path(b) / RECORD_DIR).exists()


@pytest.fixture
def five(tmp_path) -> tuple[IngestSpec, str]:
    """Five 4x6 images with masks (3 chunks: 2 + 2 + 1) and the store of an uninterrupted ingest of them."""
    images, masks = _landing(tmp_path / "src", ["a", "b", "c", "d", "e"])
    clean = _spec(images, masks, tmp_path / "clean.zarr")
    ingest_serially(clean)
    return _spec(images, masks, tmp_path / "s.zarr"), clean.store


def test_killed_before_any_chunk_the_rerun_writes_every_chunk(five):
    spec, clean = five
    _interrupted(spec, chunks_written=0)
    assert read_plan(spec.store) is not None and done_chunks(spec.store) == {}
    start = start_ingest(spec)
    assert "resuming: 0 of 3 chunks already written" in start.notes[-1]
    result = ingest_serially(spec).to_dict()
    assert (result["chunks"], result["resumed"], result["decoded"], result["hashed"]) == (3, 0, 5, 0)
    assert_same_store(spec.store, clean)


def test_killed_midway_the_rerun_decodes_only_the_chunks_not_written(five):
    spec, clean = five
    _interrupted(spec, chunks_written=2)
    assert _scramble_files_of_written_chunks(spec.store) == 4  # a..d: their bytes are now zeros
    result = ingest_serially(spec).to_dict()
    assert (result["chunks"], result["resumed"], result["decoded"], result["images"]) == (1, 2, 1, 5)
    assert_same_store(spec.store, clean)


def test_killed_after_the_last_chunk_the_rerun_only_writes_the_manifest(five):
    spec, clean = five
    _interrupted(spec, chunks_written=3)
    _scramble_files_of_written_chunks(spec.store)
    result = ingest_serially(spec).to_dict()
    assert (result["chunks"], result["resumed"], result["decoded"]) == (0, 3, 0)
    assert_same_store(spec.store, clean)


def test_killed_after_the_manifest_the_rerun_reuses_the_store(five):
    spec, clean = five
    plan, written = _interrupted(spec, chunks_written=3)
    finish_ingest(spec, plan, written, seconds=0.0)
    (Path(spec.store) / RECORD_DIR).mkdir()  # as if killed before the record was removed
    assert ingest_serially(spec).reused
    assert_same_store(spec.store, clean)


def test_an_interrupted_ingest_of_other_files_or_options_is_refused_by_name(five):
    spec, clean = five
    _interrupted(spec, chunks_written=1)
    with pytest.raises(StoreError, match=r"interrupted ingest of other sources or options \(other options: "
                                         r"max_chunk_images\); run it again with the same files and options"):
        start_ingest(spec.model_copy(update={"max_chunk_images": 1}))
    _write(Path(spec.images) / "c.png", RNG.integers(0, 256, (4, 6), dtype=np.uint8), stamp=2_000)
    with pytest.raises(StoreError, match=r"interrupted ingest of other sources or options \(1 changed \(.*c.png\)"):
        start_ingest(spec)
    assert ingest_serially(spec.model_copy(update={"overwrite": True})).resumed is None  # starts again
    with pytest.raises(StoreError, match="already exists and holds a finished ingest with other options"):
        start_ingest(spec.model_copy(update={"store": clean, "max_chunk_images": 1}))


def test_a_finished_store_is_reused_only_for_the_same_files_and_pairing(five):
    """Masks renamed, added or rewritten since the ingest: the store is not reused as if they had
    not changed; the refusal names what differs and how to go on."""
    spec, clean = five
    again = spec.model_copy(update={"store": clean})
    assert start_ingest(again).result.reused
    masks = Path(spec.masks)
    (masks / "b.png").rename(masks / "b-old.png")  # b has no mask now
    with pytest.raises(StoreError, match=r"other files \(1 mask\(s\) paired differently, e.g. b.png\); choose a "
                                         r"new path, pass --incremental .* or pass --overwrite"):
        start_ingest(again)
    (masks / "b-old.png").rename(masks / "b.png")
    assert start_ingest(again).result.reused
    _write(masks / "c.png", RNG.integers(0, 3, (4, 6), dtype=np.uint8), stamp=3_000)  # a corrected mask
    _write(Path(spec.images) / "f.png", RNG.integers(0, 256, (4, 6), dtype=np.uint8))
    with pytest.raises(StoreError, match=r"1 image\(s\) added, e.g. f.png; 1 file\(s\) changed, e.g. c.png"):
        start_ingest(again)


def test_a_store_interrupted_before_its_plan_is_started_again(five):
    spec, clean = five
    _interrupted(spec, chunks_written=1)
    (Path(spec.store) / RECORD_DIR / "plan.json").unlink()  # killed before the plan was recorded (or an old segflow)
    start = start_ingest(spec)
    assert start.overwrite and "nothing to resume; starting it again" in start.warnings[0]
    assert ingest_serially(spec).resumed is None
    assert_same_store(spec.store, clean)


def test_an_interrupted_incremental_batch_resumes(tmp_path):
    images, masks = _landing(tmp_path / "src", ["a", "b", "c"])
    spec = _spec(images, masks, tmp_path / "s.zarr", incremental=True)
    clean = _spec(images, masks, tmp_path / "clean.zarr", incremental=True)
    ingest_serially(spec), ingest_serially(clean)
    _landing(tmp_path / "src", ["d", "e", "f"])  # a new batch: 3 files, 2 chunks
    ingest_serially(clean)
    start = start_ingest(spec)
    plan = plan_append(spec, start, open_append(spec, start), _probe(spec, open_append(spec, start).to_probe))
    write_store_chunk(spec.store, list(plan.chunks[0]), threads=1)
    _scramble_files_of_written_chunks(spec.store)
    result = ingest_serially(spec).to_dict()
    assert (result["batch"], result["chunks"], result["resumed"], result["decoded"], result["hashed"]) == (1, 1, 1, 1, 0)
    assert_same_store(spec.store, clean.store)
