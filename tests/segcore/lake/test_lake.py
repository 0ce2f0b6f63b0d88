"""The data lake: publication (append-only, once per part, interrupted safely), reading, racing readers."""

from __future__ import annotations

import datetime as dt
import json
import threading

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segcore import fsio
from segcore.lake.publish import lake_columns, lake_schema, publish, read_lake
from segcore.lake.report import lake_report, plot_over_time, render_text
from segcore.collection.store import MANIFEST_SCHEMA
from segcore.run.tables import dice_table, write_part

RUN_ID = "20261124T000000-abcdef"
CLASSES = ("background", "cell")


def _run_info(arch: str = "unet") -> dict:
    return {"run_id": RUN_ID, "checkpoint_sha256": "c" * 64, "model": {"arch": arch}, "spec": {"out": "x"}}


def _manifest(n: int, *, batch_of=lambda i: 0) -> pa.Table:
    rows = [{"image_id": f"img-{i:03d}", "source_path": f"/landing/img-{i:03d}.png", "sha256": f"{i:064x}",
             "group": "g000", "index": i, "status": "ok", "mask_status": "ok", "batch": batch_of(i)}
            for i in range(n)]
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def _write_unit(run_dir: str, unit: int, images: list[int], dice: float = 0.5) -> None:
    n = len(images)
    table = dice_table(image_ids=[f"img-{i:03d}" for i in images], class_names=CLASSES,
                       tp=np.full((n, 2), 3), fp=np.ones((n, 2)), fn=np.ones((n, 2)), dice=np.full((n, 2), dice),
                       empty_gt=np.zeros((n, 2), bool), model="unet", checkpoint_sha256="c" * 64,
                       unit=f"unit-{unit:05d}")
    write_part(table, fsio.join(run_dir, "dice", f"run_id={RUN_ID}"), f"unit-{unit:05d}.parquet")


def _groups(n_units: int) -> dict[str, str]:
    return {f"unit-{u:05d}": "g000" for u in range(n_units)}


def test_schema_has_lineage_and_no_partition_columns():
    names = lake_schema("dice").names
    assert "model" not in names and "run_date" not in names
    for col in ("run_id", "ingest_batch", "source_path", "source_sha256", "published_at", "dice", "image_id"):
        assert col in names
    assert lake_columns("dice")[:2] == ("run_date", "model")
    with pytest.raises(KeyError, match="dice"):
        lake_schema("nope")


def test_publish_appends_each_part_once_with_lineage_and_metadata(tmp_path):
    run_dir, lake = str(tmp_path / "run"), str(tmp_path / "lake")
    manifest = _manifest(4)
    _write_unit(run_dir, 0, [0, 1])
    day1 = dt.datetime(2026, 11, 23, 10, tzinfo=dt.timezone.utc)
    assert publish(lake, run_dir=run_dir, run_info=_run_info(), manifest=manifest, unit_groups=_groups(2),
                   now=day1) == {"dice": 1, "manifest": 1}
    assert publish(lake, run_dir=run_dir, run_info=_run_info(), manifest=manifest, unit_groups=_groups(2)) == {}
    _write_unit(run_dir, 1, [2, 3])
    day2 = dt.datetime(2026, 11, 24, 10, tzinfo=dt.timezone.utc)
    assert publish(lake, run_dir=run_dir, run_info=_run_info(), manifest=manifest, unit_groups=_groups(2),
                   now=day2) == {"dice": 1}
    files = sorted(p.relative_to(tmp_path / "lake").as_posix() for p in (tmp_path / "lake").rglob("*.parquet"))
    assert files == [f"dice/run_date=2026-11-23/model=unet/{RUN_ID}-unit-00000.parquet",
                     f"dice/run_date=2026-11-24/model=unet/{RUN_ID}-unit-00001.parquet",
                     f"manifest/run_date=2026-11-23/model=unet/{RUN_ID}-batch-00000.parquet"]
    dice = read_lake(lake).to_pandas()
    assert len(dice) == 8 and sorted(dice.run_date.unique()) == ["2026-11-23", "2026-11-24"]
    assert (dice.model == "unet").all() and (dice.run_id == RUN_ID).all()
    row = dice[dice.image_id == "img-002"].iloc[0]
    assert row.source_path == "/landing/img-002.png" and row.source_sha256 == f"{2:064x}" and row.ingest_batch == 0
    meta = json.loads(pq.read_schema(tmp_path / "lake" / files[0]).metadata[b"segflow"])
    assert meta["table"] == "dice" and meta["checkpoint_sha256"] == "c" * 64 and meta["run_spec"] == {"out": "x"}


def test_an_interrupted_publication_rewrites_the_same_files(tmp_path):
    run_dir, lake = str(tmp_path / "run"), str(tmp_path / "lake")
    _write_unit(run_dir, 0, [0, 1])
    publish(lake, run_dir=run_dir, run_info=_run_info(), manifest=_manifest(2), unit_groups=_groups(1),
            now=dt.datetime(2026, 11, 23, tzinfo=dt.timezone.utc))
    ledger_path = tmp_path / "run" / "lake.json"
    ledger = json.loads(ledger_path.read_text())
    for entry in ledger[lake]["parts"].values():  # as if the run died after writing, before recording it
        entry["done"] = False
    ledger_path.write_text(json.dumps(ledger))
    before = sorted((tmp_path / "lake").rglob("*.parquet"))
    publish(lake, run_dir=run_dir, run_info=_run_info(), manifest=_manifest(2), unit_groups=_groups(1),
            now=dt.datetime(2026, 11, 25, tzinfo=dt.timezone.utc))
    assert sorted((tmp_path / "lake").rglob("*.parquet")) == before
    assert len(read_lake(lake)) == 4


def test_read_lake_of_nothing_is_empty_with_the_schema(tmp_path):
    table = read_lake(str(tmp_path / "none"))
    assert table.num_rows == 0 and tuple(table.column_names) == lake_columns("dice")


def test_report_over_time_and_plots(tmp_path):
    run_dir, lake = str(tmp_path / "run"), str(tmp_path / "lake")
    for day, (unit, dice) in enumerate([(0, 0.5), (1, 0.9)]):
        _write_unit(run_dir, unit, [2 * unit, 2 * unit + 1], dice=dice)
        publish(lake, run_dir=run_dir, run_info=_run_info(), manifest=_manifest(4), unit_groups=_groups(2),
                now=dt.datetime(2026, 11, 20 + day, tzinfo=dt.timezone.utc))
    report = lake_report(lake)
    cell = [r for r in report["over_time"].to_pylist() if r["class_name"] == "cell"]
    assert [(str(r["run_date"]), r["images"], r["mean_dice"]) for r in cell] == [
        ("2026-11-20", 2, pytest.approx(0.5)), ("2026-11-21", 2, pytest.approx(0.9))]
    current = {r["class_name"]: r for r in report["current"].to_pylist()}
    assert current["cell"]["images"] == 4 and current["cell"]["mean_dice"] == pytest.approx(0.7)
    text = render_text(report)
    assert "2026-11-21" in text and "0.9000" in text
    (png,) = plot_over_time(report, tmp_path / "plots")
    assert png.name == "dice-over-time-unet-cccccccccccc.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _race(lake: str, run_dir: str, read, n_parts: int = 30) -> list[int]:
    """Publish ``n_parts`` units one by one while ``read()`` counts rows in a loop; returns the counts seen."""
    _write_unit(run_dir, 0, [0])
    manifest = _manifest(n_parts)
    publish(lake, run_dir=run_dir, run_info=_run_info(), manifest=manifest, unit_groups=_groups(n_parts))
    done, seen, errors = threading.Event(), [], []

    def reader():
        while not done.is_set():
            try:
                seen.append(read())
            except Exception as exc:  # the property under test: no reader ever fails
                errors.append(repr(exc))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for u in range(1, n_parts):
            _write_unit(run_dir, u, [u])
            publish(lake, run_dir=run_dir, run_info=_run_info(), manifest=manifest, unit_groups=_groups(n_parts))
    finally:
        done.set()
        t.join()
    assert not errors, errors[:3]
    assert seen and all(c % 2 == 0 for c in seen) and seen == sorted(seen)
    assert read() == 2 * n_parts
    return seen


def test_a_reader_racing_a_writer_never_errors_duckdb(tmp_path):
    lake = str(tmp_path / "lake")
    query = f"select count(*) from read_parquet('{lake}/dice/**/*.parquet', hive_partitioning = true)"
    seen = _race(lake, str(tmp_path / "run"), lambda: duckdb.sql(query).fetchall()[0][0])
    assert len(set(seen)) > 1  # the reader really did run while files were being added


def test_a_reader_racing_a_writer_never_errors_pyarrow_on_s3(s3_server):
    bucket = s3_server.bucket()
    _race(f"{bucket}/lake", f"{bucket}/run", lambda: read_lake(f"{bucket}/lake").num_rows, n_parts=12)


def test_lake_files_without_channels_adapted_read_alongside_new_ones(tmp_path):
    run_dir, lake = str(tmp_path / "run"), str(tmp_path / "lake")
    _write_unit(run_dir, 0, [0, 1])
    publish(lake, run_dir=run_dir, run_info=_run_info(), manifest=_manifest(4), unit_groups=_groups(2),
            now=dt.datetime(2026, 11, 23, tzinfo=dt.timezone.utc))
    (path,) = (tmp_path / "lake" / "dice").rglob("*.parquet")  # rewritten as a lake of an older segflow
    pq.write_table(pq.read_table(path).drop_columns(["channels_adapted"]), path)
    _write_unit(run_dir, 1, [2, 3])
    publish(lake, run_dir=run_dir, run_info=_run_info(), manifest=_manifest(4), unit_groups=_groups(2),
            now=dt.datetime(2026, 11, 24, tzinfo=dt.timezone.utc))
    dice = read_lake(lake).sort_by([("image_id", "ascending")])
    assert dice.column("channels_adapted").to_pylist() == [None] * 4 + [""] * 4
    assert lake_report(lake)["current"].num_rows > 0
