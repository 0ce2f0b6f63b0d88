"""The current-version rule: Python (from ``superseded_by``) and SQL (from batches, for the lake)
select exactly the same rows of a collection with superseded images."""

from __future__ import annotations

import os
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from segcore import fsio
from segcore.collection.imageio import write_png
from segcore.collection.store import read_manifest
from segcore.collection.versions import current_manifest, current_rows, current_version_sql
from segcore.config import IngestSpec
from segcore.lake.publish import publish, read_lake
from segcore.lake.report import current_dice
from segcore.run.tables import dice_table, write_part
from tests.segcore.collection.serial import ingest_serially

RNG = np.random.default_rng(11)
RUN_ID = "20261124T000000-abcdef"


def _write(path: Path, arr: np.ndarray, *, stamp: int, truncate: bool = False) -> None:
    write_png(path, arr)
    if truncate:  # header fine, pixels not: probed as readable, fails to decode
        path.write_bytes(path.read_bytes()[:50])
    os.utime(path, (stamp, stamp))


@pytest.fixture
def versions(tmp_path) -> str:
    """A store of a, b, c (batch 0), then batch 1: b changed in place, c's mask corrected, d new,
    and a rewritten with bytes that cannot be decoded (an error row with a slot: a@0 stays current)."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    for name in "abc":
        _write(images / f"{name}.png", RNG.integers(0, 256, (8, 8), dtype=np.uint8), stamp=1_000)
        _write(masks / f"{name}.png", RNG.integers(0, 2, (8, 8), dtype=np.uint8), stamp=1_000)
    spec = IngestSpec(images=str(images), masks=str(masks), store=str(tmp_path / "s.zarr"), chunk_pixels=64,
                      max_chunk_images=1, incremental=True)
    ingest_serially(spec)
    _write(images / "a.png", RNG.integers(0, 256, (8, 8), dtype=np.uint8), stamp=2_000, truncate=True)
    _write(images / "b.png", RNG.integers(0, 256, (8, 8), dtype=np.uint8), stamp=2_000)
    _write(masks / "c.png", np.ones((8, 8), np.uint8), stamp=2_000)
    _write(images / "d.png", RNG.integers(0, 256, (8, 8), dtype=np.uint8), stamp=2_000)
    ingest_serially(spec)
    return spec.store


def _key(rows: list[dict]) -> list[tuple]:
    return sorted((r["image_id"], r["batch"], r["status"]) for r in rows)


def test_sql_and_python_select_the_same_manifest_rows(versions):
    manifest = read_manifest(versions)
    python = _key(current_manifest(manifest).to_pylist())
    assert python == [("a", 0, "ok"), ("a", 1, "error"), ("b", 1, "ok"), ("c", 1, "ok"), ("d", 1, "ok")]
    con = duckdb.connect()
    con.register("manifest", manifest)
    sql = con.sql(f"select * from manifest as m where {current_version_sql(row='m')}").to_arrow_table()
    assert _key(sql.to_pylist()) == python
    # the lake's manifest parts are snapshots: superseded_by of old rows may never have been set
    stale = manifest.set_column(manifest.schema.get_field_index("superseded_by"), "superseded_by",
                                pa.nulls(manifest.num_rows, pa.string()))
    con.register("manifest", stale)
    sql = con.sql(f"select * from manifest as m where {current_version_sql(row='m')}").to_arrow_table()
    assert _key(sql.to_pylist()) == python


def _part(ids: list[str], unit: str) -> pa.Table:
    n = len(ids)
    return dice_table(image_ids=ids, class_names=("background", "cell"), tp=np.ones((n, 2)), fp=np.ones((n, 2)),
                      fn=np.ones((n, 2)), dice=np.full((n, 2), 0.5), empty_gt=np.zeros((n, 2), bool), model="unet",
                      checkpoint_sha256="c" * 64, unit=unit)


def test_the_lake_report_and_python_keep_the_same_dice_rows(versions, tmp_path):
    manifest = read_manifest(versions)
    slots = [r for r in manifest.to_pylist() if r["group"] is not None]
    unit_groups = {f"unit-{k:05d}": g for k, g in enumerate(sorted({r["group"] for r in slots}))}
    parts = {u: _part([r["image_id"] for r in slots if r["group"] == g], u) for u, g in unit_groups.items()}
    run_dir, lake = str(tmp_path / "run"), str(tmp_path / "lake")
    for unit, part in parts.items():
        write_part(part, fsio.join(run_dir, "dice", f"run_id={RUN_ID}"), f"{unit}.parquet")
    info = {"run_id": RUN_ID, "checkpoint_sha256": "c" * 64, "model": {"arch": "unet"}, "spec": {}}
    publish(lake, run_dir=run_dir, run_info=info, manifest=manifest, unit_groups=unit_groups)

    kept = current_rows(pa.concat_tables(parts.values()), manifest, unit_groups)
    python = sorted(zip(kept["unit"].to_pylist(), kept["image_id"].to_pylist(), kept["class_id"].to_pylist()))
    lake_rows = current_dice(read_lake(lake, "dice"), read_lake(lake, "manifest"))
    sql = sorted(zip(lake_rows["unit"].to_pylist(), lake_rows["image_id"].to_pylist(),
                     lake_rows["class_id"].to_pylist()))
    assert sql == python
    # 7 slots (a, b, c in batch 0; a, b, c, d in batch 1), 2 classes each; b@0 and c@0 are superseded
    assert len(slots) == 7 and len(python) == 2 * 5
    old = {(r["group"], r["image_id"]) for r in slots if r["superseded_by"] is not None}
    assert {i for _, i in old} == {"b", "c"} and not {(unit_groups[u], i) for u, i, _ in python} & old
    assert pc.sum(pc.equal(lake_rows["image_id"], "a")).as_py() == 4  # a@0 and the unreadable a@1 both stay


def test_a_volume_rewritten_with_fewer_slices_supersedes_all_its_old_slices(tmp_path):
    nib = pytest.importorskip("nibabel")
    images = tmp_path / "images"
    images.mkdir()

    def write(depth: int, stamp: int, name: str = "vol") -> None:
        path = images / f"{name}.nii.gz"
        nib.save(nib.Nifti1Image(RNG.integers(0, 200, (6, 5, depth)).astype(np.uint8), np.eye(4)), str(path))
        os.utime(path, (stamp, stamp))

    write(4, 1_000)
    spec = IngestSpec(images=str(images), store=str(tmp_path / "s.zarr"), incremental=True)
    ingest_serially(spec)
    write(2, 2_000)
    write(3, 2_000, name="new")  # a new volume appended: every slice of it is taken in
    ingest_serially(spec)
    manifest = read_manifest(spec.store)
    python = _key(current_manifest(manifest).to_pylist())
    assert python == [("new/z0000", 1, "ok"), ("new/z0001", 1, "ok"), ("new/z0002", 1, "ok"),
                      ("vol/z0000", 1, "ok"), ("vol/z0001", 1, "ok")]
    con = duckdb.connect()
    for table in (manifest, manifest.set_column(manifest.schema.get_field_index("superseded_by"), "superseded_by",
                                                pa.nulls(manifest.num_rows, pa.string()))):
        con.register("manifest", table)
        sql = con.sql(f"select * from manifest as m where {current_version_sql(row='m')}").to_arrow_table()
        assert _key(sql.to_pylist()) == python
