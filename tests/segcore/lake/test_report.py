"""The lake report on hand-built lakes: models told apart by checkpoint, the version rule per model,
3-D metrics of volumes, instance metrics, rows without a checkpoint hash."""

from __future__ import annotations

import datetime as dt
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from segcore import fsio
from segcore.collection.store import MANIFEST_SCHEMA
from segcore.errors import LakeError, NotFound
from segcore.lake.publish import publish, read_lake
from segcore.lake.report import lake_report, plot_over_time, render_text
from segcore.run.tables import dice_table, instance_metrics_table, instance_table, write_part
from segcore.run.volumes import VOLUME_SCHEMA

SHA_A, SHA_B, SHA_M = "a" * 64, "b" * 64, "d" * 64
UNET_A, UNET_B, MASKRCNN = "unet@aaaaaaaaaaaa", "unet@bbbbbbbbbbbb", "maskrcnn@dddddddddddd"
SECTIONS = ["models", "over_time", "current", "volumes", "instances_over_time", "instances"]


def _day(d: int) -> dt.datetime:
    return dt.datetime(2026, 11, d, 10, tzinfo=dt.timezone.utc)


def _manifest(rows: list[tuple]) -> pa.Table:
    """Manifest rows ``(image_id, group, index, batch[, mask_status])`` of readable files (mask default "ok")."""
    return pa.Table.from_pylist([{"image_id": r[0], "source_path": f"/landing/{r[0]}.png", "sha256": f"{k:064x}",
                                  "group": r[1], "index": r[2], "status": "ok", "batch": r[3],
                                  "mask_status": r[4] if len(r) > 4 else "ok"}
                                 for k, r in enumerate(rows)], schema=MANIFEST_SCHEMA)


def _dice(cell: dict[str, float], *, sha: str, unit: str) -> pa.Table:
    """Dice rows of images ``{image_id: Dice of class "cell"}`` (background: 1.0)."""
    n = len(cell)
    dice = np.array([[1.0, d] for d in cell.values()])
    return dice_table(image_ids=list(cell), class_names=("background", "cell"), tp=np.ones((n, 2)),
                      fp=np.zeros((n, 2)), fn=np.zeros((n, 2)), dice=dice, empty_gt=np.zeros((n, 2), bool),
                      model="unet", checkpoint_sha256=sha, unit=unit)


def _publish(lake: str, run_dir: str, *, run_id: str, sha: str, arch: str = "unet", manifest: pa.Table,
             parts: dict[str, dict[str, pa.Table]], day: int, store: str = "/data/store.zarr",
             checkpoint: str | None = None, spec: dict | None = None, provenance: dict | None = None) -> None:
    """Write ``parts`` (``{table: {part name: rows}}``) into the run directory and publish them; every
    part named ``unit-0000k`` is a unit of group ``g00k``."""
    for table, named in parts.items():
        for name, rows in named.items():
            write_part(rows, fsio.join(run_dir, table, f"run_id={run_id}"), f"{name}.parquet")
    info = {"run_id": run_id, "checkpoint_sha256": sha, "model": {"arch": arch, "provenance": provenance or {}},
            "spec": spec or {}, "store": store,
            **({} if checkpoint is None else {"checkpoint": checkpoint})}
    publish(lake, run_dir=run_dir, run_info=info, manifest=manifest,
            unit_groups={f"unit-{k:05d}": f"g{k:03d}" for k in range(3)}, now=_day(day))


def _cell(report: dict[str, pa.Table], section: str, *cols: str) -> list[tuple]:
    return [tuple(r[c] for c in cols) for r in report[section].to_pylist() if r["class_name"] == "cell"]


def test_two_checkpoints_of_one_architecture_are_two_models(tmp_path):
    lake = str(tmp_path / "lake")
    manifest = _manifest([("img-0", "g000", 0, 0), ("img-1", "g000", 1, 0)])
    for n, (sha, cell, day, ckpt) in enumerate([(SHA_A, {"img-0": 0.25, "img-1": 0.75}, 20, "/m/a.safetensors"),
                                                (SHA_A, {"img-0": 0.25, "img-1": 0.75}, 20, "/m/copy.safetensors"),
                                                (SHA_B, {"img-0": 0.8, "img-1": 1.0}, 21,
                                                 "s3://key:secret@b/m/b.segflow/?token=x")]):
        _publish(lake, str(tmp_path / f"run{n}"), run_id=f"run-{n}", sha=sha, manifest=manifest, day=day,
                 parts={"dice": {"unit-00000": _dice(cell, sha=sha, unit="unit-00000")}}, checkpoint=ckpt)
    report = lake_report(lake)
    assert list(report) == SECTIONS
    assert [(r["model"], r["arch"], r["checkpoint_files"], r["checkpoint_sha256"], r["runs"], r["first_published"],
             r["tables"]) for r in report["models"].to_pylist()] == [
        (UNET_A, "unet", ["a.safetensors", "copy.safetensors"], SHA_A, 2, "2026-11-20", ["dice"]),
        (UNET_B, "unet", ["b.segflow"], SHA_B, 1, "2026-11-21", ["dice"])]
    assert _cell(report, "current", "model", "images", "mean_dice", "median_dice") == [
        (UNET_A, 2, pytest.approx(0.5), pytest.approx(0.5)), (UNET_B, 2, pytest.approx(0.9), pytest.approx(0.9))]
    assert _cell(report, "over_time", "model", "run_date", "mean_dice") == [
        (UNET_A, "2026-11-20", pytest.approx(0.5)), (UNET_B, "2026-11-21", pytest.approx(0.9))]
    text = render_text(report)
    assert UNET_A in text and UNET_B in text and SHA_A in text and "0.9000" in text
    assert "a.safetensors, copy.safetensors" in text and "secret" not in text and "token" not in text
    assert set(read_lake(lake, "dice").column("checkpoint").to_pylist()) == {
        "/m/a.safetensors", "/m/copy.safetensors", "s3://b/m/b.segflow/"}  # no credentials, query or fragment
    assert "(no rows: runs publish volume rows" in text and "(no rows: runs of instance models" in text
    assert sorted(p.name for p in plot_over_time(report, tmp_path / "plots")) == [
        "dice-over-time-unet-aaaaaaaaaaaa.png", "dice-over-time-unet-bbbbbbbbbbbb.png"]


def test_the_version_rule_holds_per_model(tmp_path):
    """Both images changed in batch 1 (img-1's new version has no mask, so no Dice row). Model A segmented
    both batches: its current rows are img-0's new version only. Model B segmented batch 0 only: its rows
    stay current (A's newer batch supersedes A's rows, not B's)."""
    lake = str(tmp_path / "lake")
    before = [("img-0", "g000", 0, 0), ("img-1", "g000", 1, 0)]
    changed = [("img-0", "g001", 0, 1), ("img-1", "g001", 1, 1, "missing")]
    _publish(lake, str(tmp_path / "a"), run_id="run-a", sha=SHA_A, manifest=_manifest(before + changed), day=20,
             parts={"dice": {"unit-00000": _dice({"img-0": 0.2, "img-1": 0.6}, sha=SHA_A, unit="unit-00000"),
                             "unit-00001": _dice({"img-0": 0.8}, sha=SHA_A, unit="unit-00001")}})
    _publish(lake, str(tmp_path / "b"), run_id="run-b", sha=SHA_B, manifest=_manifest(before), day=21,
             parts={"dice": {"unit-00000": _dice({"img-0": 0.4, "img-1": 0.6}, sha=SHA_B, unit="unit-00000")}})
    report = lake_report(lake)
    assert _cell(report, "current", "model", "images", "mean_dice") == [
        (UNET_A, 1, pytest.approx(0.8)), (UNET_B, 2, pytest.approx(0.5))]
    assert _cell(report, "over_time", "model", "images", "mean_dice") == [  # every row published that day
        (UNET_A, 2, pytest.approx(1.6 / 3)), (UNET_B, 2, pytest.approx(0.5))]


def test_images_of_two_stores_with_the_same_ids_are_counted_apart(tmp_path):
    """Two collections both name their images img-0 and img-1, segmented by one model. Each image
    counts; a changed file (batch 1 of store B) supersedes its own store's old version only."""
    lake = str(tmp_path / "lake")
    both = [("img-0", "g000", 0, 0), ("img-1", "g000", 1, 0)]
    _publish(lake, str(tmp_path / "a"), run_id="run-a", sha=SHA_A, manifest=_manifest(both), day=20, store="/a.zarr",
             parts={"dice": {"unit-00000": _dice({"img-0": 0.2, "img-1": 0.4}, sha=SHA_A, unit="unit-00000")}})
    _publish(lake, str(tmp_path / "b"), run_id="run-b", sha=SHA_A, day=20, store="/b.zarr",
             manifest=_manifest(both + [("img-0", "g001", 0, 1)]),
             parts={"dice": {"unit-00000": _dice({"img-0": 0.6, "img-1": 0.8}, sha=SHA_A, unit="unit-00000"),
                             "unit-00001": _dice({"img-0": 1.0}, sha=SHA_A, unit="unit-00001")}})
    report = lake_report(lake)
    assert _cell(report, "current", "model", "images", "mean_dice") == [(UNET_A, 4, pytest.approx(2.4 / 4))]
    assert _cell(report, "over_time", "model", "images", "mean_dice") == [(UNET_A, 4, pytest.approx(3.0 / 5))]
    assert sorted(pq.read_table(tmp_path / "lake" / "manifest").column("store").unique().to_pylist()) == [
        "/a.zarr", "/b.zarr"]


def test_rows_without_a_checkpoint_hash_count_under_their_architecture(tmp_path):
    lake = str(tmp_path / "lake")
    manifest = _manifest([("img-0", "g000", 0, 0), ("img-1", "g000", 1, 0)])
    _publish(lake, str(tmp_path / "old"), run_id="run-old", sha=SHA_A, manifest=manifest, day=20,
             parts={"dice": {"unit-00000": _dice({"img-0": 0.1, "img-1": 0.3}, sha=SHA_A, unit="unit-00000")}})
    (path,) = (tmp_path / "lake" / "dice").rglob("*.parquet")  # as written by a segflow that kept no hash
    pq.write_table(pq.read_table(path).drop_columns(["checkpoint_sha256", "checkpoint"]), path)
    _publish(lake, str(tmp_path / "new"), run_id="run-new", sha=SHA_A, manifest=manifest, day=21,
             parts={"dice": {"unit-00000": _dice({"img-0": 0.5, "img-1": 0.7}, sha=SHA_A, unit="unit-00000")}})
    report = lake_report(lake)
    assert [(r["model"], r["checkpoint_sha256"], r["checkpoint_files"]) for r in report["models"].to_pylist()] == [
        ("unet", None, None), (UNET_A, SHA_A, None)]  # no checkpoint location in either's rows
    assert _cell(report, "current", "model", "images", "mean_dice") == [
        ("unet", 2, pytest.approx(0.2)), (UNET_A, 2, pytest.approx(0.6))]


def _volume(volume_id: str, class_id: int | None, dice: float | None = None, hd95: float = math.nan,
            assd: float = math.nan, *, sha: str, unit: str | None = "millimeter", empty_gt: bool = False,
            surface: str = "ok", status: str = "ok") -> dict:
    return {"volume_id": volume_id, "class_id": class_id, "class_name": None if class_id is None else
            ("background", "cell", "nucleus")[class_id], "slices": 4, "dice": dice, "empty_gt": empty_gt,
            "hd95": hd95, "assd": assd, "surface_status": surface, "spacing_unit": unit, "status": status,
            "error": "no ground truth" if status != "ok" else None, "model": "unet", "checkpoint_sha256": sha}


def _volumes(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist([{k: r.get(k) for k in VOLUME_SCHEMA.names} for r in rows], schema=VOLUME_SCHEMA)


def test_volumes_report_the_latest_scoring_per_model_class_and_unit(tmp_path):
    lake, empty = str(tmp_path / "lake"), _manifest([])
    _publish(lake, str(tmp_path / "a"), run_id="run-a", sha=SHA_A, manifest=empty, day=20,
             parts={"volumes": {"volumes-1-00000": _volumes([_volume("v1", 1, 0.1, 9.0, 9.0, sha=SHA_A)])}})
    _publish(lake, str(tmp_path / "a"), run_id="run-a", sha=SHA_A, manifest=empty, day=21, parts={"volumes": {
        "volumes-2-00000": _volumes([
            _volume("v1", 0, 0.99, surface="skipped", sha=SHA_A),  # background: left out
            _volume("v1", 1, 0.6, 2.0, 1.0, sha=SHA_A),
            _volume("v1", 2, 0.0, empty_gt=True, surface="empty_gt", sha=SHA_A),  # absent from the truth
            _volume("v2", 1, 0.8, 4.0, 3.0, sha=SHA_A),
            _volume("v2", 2, 0.0, surface="empty_pred", sha=SHA_A),  # missed: Dice 0, no distances
            _volume("v3", None, status="error", sha=SHA_A)])}})
    _publish(lake, str(tmp_path / "b"), run_id="run-b", sha=SHA_B, manifest=empty, day=21, parts={"volumes": {
        "volumes-1-00000": _volumes([_volume("v1", 1, 0.3, 5.0, 4.0, sha=SHA_B, unit=None)])}})
    # Another store's v1, scored later by model B: a volume of its own; its spacing has no unit.
    _publish(lake, str(tmp_path / "c"), run_id="run-c", sha=SHA_B, manifest=empty, day=22, store="/other.zarr",
             parts={"volumes": {"volumes-1-00000": _volumes([
                 dict(_volume("v1", 1, 0.5, 7.0, 6.0, sha=SHA_B, unit=None), spacing_z=2.5, spacing_y=0.8,
                      spacing_x=0.8)])}})
    rows = [(r["model"], r["class_name"], r["unit"], r["volumes"], r["mean_dice"], r["mean_hd95"], r["mean_assd"])
            for r in lake_report(lake)["volumes"].to_pylist()]
    assert rows == [(UNET_A, "cell", "millimeter", 2, pytest.approx(0.7), pytest.approx(3.0), pytest.approx(2.0)),
                    (UNET_A, "nucleus", "millimeter", 1, pytest.approx(0.0), None, None),
                    (UNET_B, "cell", "spacing units (unit unknown)", 1, pytest.approx(0.5), pytest.approx(7.0),
                     pytest.approx(6.0)),
                    (UNET_B, "cell", "voxel", 1, pytest.approx(0.3), pytest.approx(5.0), pytest.approx(4.0))]


def _scores(tp: int, fp: int, fn: int, *, ap: float, pq: float) -> dict:
    """Per-image instance figures at IoU 0.5 as rows published before the empty-case rule changed wrote them
    (a ratio with nothing to count was 1.0; the report takes precision and recall from the counts)."""
    ratio = lambda a, b: a / b if b else 1.0  # noqa: E731
    return {"n_pred": tp + fp, "n_gt": tp + fn, "tp": tp, "fp": fp, "fn": fn, "precision": ratio(tp, tp + fp),
            "recall": ratio(tp, tp + fn), "f1": ratio(2 * tp, 2 * tp + fp + fn),
            "mean_matched_iou": 0.8 if tp else math.nan, "panoptic_quality": pq, "segmentation_quality": 0.8,
            "recognition_quality": ratio(2 * tp, 2 * tp + fp + fn), "ap": ap, "ap50": ap, "ap75": ap}


def _instance_lake(tmp_path) -> str:
    """A Mask R-CNN run: img-0 and img-1 on the 20th, then img-0 changed (batch 1) and img-2 (no ground-truth
    objects) on the 21st."""
    lake, run_dir = str(tmp_path / "lake"), str(tmp_path / "run")
    first = [("img-0", "g000", 0, 0), ("img-1", "g000", 1, 0)]
    common = {"model": "maskrcnn", "checkpoint_sha256": SHA_M}
    objects = instance_table([("img-0", [{"instance_id": 1, "class_id": 1, "score": 0.9, "bbox": [0, 0, 2, 2],
                                          "area": 4}])], class_names=("background", "cell"), unit="unit-00000",
                             **common)
    metrics = instance_metrics_table([("img-0", _scores(2, 0, 2, ap=0.5, pq=0.4)),
                                      ("img-1", _scores(1, 1, 0, ap=0.7, pq=0.6))], unit="unit-00000", **common)
    _publish(lake, run_dir, run_id="run-m", sha=SHA_M, arch="maskrcnn", manifest=_manifest(first), day=20,
             parts={"instances": {"unit-00000": objects}, "instance_metrics": {"unit-00000": metrics}})
    metrics = instance_metrics_table([("img-0", _scores(4, 0, 0, ap=0.9, pq=0.8)),
                                      ("img-2", _scores(0, 2, 0, ap=math.nan, pq=0.0))], unit="unit-00001", **common)
    _publish(lake, run_dir, run_id="run-m", sha=SHA_M, arch="maskrcnn", day=21,
             manifest=_manifest(first + [("img-0", "g001", 0, 1), ("img-2", "g001", 1, 1)]),
             parts={"instance_metrics": {"unit-00001": metrics}})
    return lake


def test_instance_metrics_per_model_over_time_and_current(tmp_path):
    report = lake_report(_instance_lake(tmp_path))
    assert [(r["model"], r["tables"]) for r in report["models"].to_pylist()] == [
        (MASKRCNN, ["instance_metrics", "instances"])]
    (current,) = report["instances"].to_pylist()  # img-0 (its batch-1 version), img-1, img-2
    assert current["model"] == MASKRCNN and current["images"] == 3
    assert (current["tp"], current["fp"], current["fn"]) == (5, 3, 0)
    # img-2 (no ground truth, 2 predictions): recall 0 by today's rule, though its row says 1.0
    expected = {"mean_f1": 5 / 9, "mean_precision": 0.5, "mean_recall": 2 / 3, "mean_ap": 0.8,
                "mean_panoptic_quality": 1.4 / 3, "mean_matched_iou": 0.8, "pooled_f1": 10 / 13}
    assert {k: current[k] for k in expected} == pytest.approx(expected)
    days = [(r["run_date"], r["images"], r["mean_f1"], r["mean_ap"], r["pooled_f1"])
            for r in report["instances_over_time"].to_pylist()]
    assert days == [("2026-11-20", 2, pytest.approx(2 / 3), pytest.approx(0.6), pytest.approx(6 / 9)),
                    ("2026-11-21", 2, pytest.approx(0.5), pytest.approx(0.9), pytest.approx(0.8))]
    assert report["current"].num_rows == 0 and report["volumes"].num_rows == 0
    text = render_text(report)
    assert "(no rows: runs publish Dice rows" in text and "0.5556" in text
    (png,) = plot_over_time(report, tmp_path / "plots")
    assert png.name == "instances-over-time-maskrcnn-dddddddddddd.png"


def test_what_is_not_a_lake_is_refused(tmp_path):
    with pytest.raises(NotFound, match="no such location"):
        lake_report(str(tmp_path / "typo"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(NotFound, match="no lake rows"):
        lake_report(str(tmp_path / "empty"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")
    with pytest.raises(LakeError, match="run directory"):
        lake_report(str(tmp_path / "run"))
    lake = _instance_lake(tmp_path)
    part = next((tmp_path / "lake" / "instance_metrics").rglob("*.parquet"))
    (part.parent / "notes.parquet").write_text("not parquet")
    with pytest.raises(LakeError, match="instance_metrics table cannot be read.*notes.parquet"):
        lake_report(lake)
    (part.parent / "notes.parquet").unlink()
    lake_report(lake)
    # a Parquet file of other columns (a store's manifest dropped in by hand) is no lake part either
    stray = tmp_path / "lake" / "dice" / "run_date=2026-11-20" / "model=unet" / "manifest.parquet"
    stray.parent.mkdir(parents=True)
    pq.write_table(_manifest([("img-0", "g000", 0, 0)]), stray)
    with pytest.raises(LakeError, match=r"dice table holds rows that segflow did not publish \(no run_id\): "
                                        r".*manifest\.parquet; move the files they come from out of"):
        lake_report(lake)


def test_locations_reach_the_lake_without_credentials_and_older_rows_with_them_count_as_the_same_store(tmp_path):
    lake = str(tmp_path / "lake")
    manifest = _manifest([("img-0", "g000", 0, 0)])
    for column in ("source_path", "mask_path"):
        manifest = manifest.set_column(manifest.schema.get_field_index(column), column,
                                       pa.array([f"s3://key:secret@landing/{column}/img-0.png?sig=token"]))
    # the run's spec and the model's provenance (the training command line) name the stores too
    spec = {"store": "s3://key:secret@b/s.zarr", "ingest": {"images": "https://host/x?X-Amz-Signature=token"}}
    provenance = {"command": "segflow train --store 's3://key:secret@b/t.zarr?token=x' --out m.safetensors"}
    for n, store in enumerate(["s3://key:secret@b/s.zarr?token=x", "s3://b/s.zarr"]):
        _publish(lake, str(tmp_path / f"run{n}"), run_id=f"run-{n}", sha=SHA_A, manifest=manifest, day=20 + n,
                 store=store, parts={"dice": {"unit-00000": _dice({"img-0": 0.5}, sha=SHA_A, unit="unit-00000")}},
                 spec=spec, provenance=provenance)
    files = sorted((tmp_path / "lake").rglob("*.parquet"))
    assert files and not any(b"secret" in f.read_bytes() or b"token" in f.read_bytes() for f in files)
    assert set(read_lake(lake, "dice").column("store").to_pylist()) == {"s3://b/s.zarr"}
    manifest_rows = read_lake(lake, "manifest").to_pylist()
    assert [(r["source_path"], r["mask_path"]) for r in manifest_rows] == [
        ("s3://landing/source_path/img-0.png", "s3://landing/mask_path/img-0.png")] * 2
    import json

    meta = json.loads(pq.read_schema(files[0]).metadata[b"segflow"])
    assert meta["model"]["provenance"]["command"] == "segflow train --store 's3://b/t.zarr' --out m.safetensors"
    assert meta["run_spec"] == {"store": "s3://b/s.zarr", "ingest": {"images": "https://host/x"}}
    # a part published before locations were cleaned: its store still holds the credentials
    (old,) = [f for f in files if "run-0-unit" in f.name]
    table = pq.read_table(old)
    pq.write_table(table.set_column(table.schema.get_field_index("store"), "store",
                                    pa.array(["s3://key:secret@b/s.zarr?token=x"] * table.num_rows)), old)
    assert _cell(lake_report(lake), "current", "model", "images") == [(UNET_A, 1)]  # one image of one store
