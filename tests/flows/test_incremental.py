"""Scheduled incremental runs: a landing zone, content hashes, appended stores and an append-only lake."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest

import httpx

from flows.pipeline import incremental_run_dir, run_flow, with_runner
from segcore.config import ExecutionSpec, IngestSpec, RunSpec, SegmentSpec
from segcore.errors import StoreError
from segcore.collection.imageio import write_png
from segcore.lake.publish import lake_columns, read_lake
from segcore.lake.report import lake_report
from segcore.run.results import open_run
from segcore.run.rundir import done_records, read_run_info
from segcore.collection.store import open_store, read_manifest
from tests.flows.conftest import module_cluster

ONE_WORKER = ExecutionSpec(n_workers=1, threads_per_worker=1)
_cluster = module_cluster(ONE_WORKER, "s3_server")
CLASSES = 3


def _drop(landing: Path, masks: Path, first: int, count: int, *, seed: int, shape=(48, 48)) -> None:
    """Write ``count`` new images (and masks) named img-<first>... into the landing zone."""
    rng = np.random.default_rng(seed)
    h, w = shape
    for i in range(first, first + count):
        mask = np.zeros((h, w), np.uint8)
        yy, xx = np.ogrid[:h, :w]
        for _ in range(2):
            y, x, r = rng.integers(0, h), rng.integers(0, w), rng.integers(4, 10)
            mask[(yy - y) ** 2 + (xx - x) ** 2 < r * r] = rng.integers(1, CLASSES)
        write_png(landing / f"img-{i:04d}.png", (mask * 90 + rng.integers(0, 40, (h, w))).astype(np.uint8))
        write_png(masks / f"img-{i:04d}.png", mask)


def _spec(root: Path, checkpoint: str) -> RunSpec:
    store = str(root / "store.zarr")
    return RunSpec(
        ingest=IngestSpec(images=str(root / "landing"), masks=str(root / "masks"), store=store, incremental=True,
                          max_chunk_images=16),
        segment=SegmentSpec(store=store, checkpoint=checkpoint, out=str(root / "run"), lake=str(root / "lake"),
                            batch_size=8, execution=ONE_WORKER))


def _first_run(collection, root: Path, count: int, *, seed: int) -> tuple[RunSpec, Any]:
    """A landing zone of ``count`` images with masks below ``root``, and its first incremental run;
    returns the spec and the flow to run it again."""
    (root / "landing").mkdir()
    (root / "masks").mkdir()
    _drop(root / "landing", root / "masks", 0, count, seed=seed)
    spec = _spec(root, collection["checkpoint"])
    flow = with_runner(run_flow, ONE_WORKER)
    flow(spec)
    return spec, flow


def _lake_files(root: Path) -> list[Path]:
    return sorted((root / "lake").rglob("*.parquet"))


@pytest.fixture(scope="module")
def scheduled(collection, tmp_path_factory):
    """A first run on 20 images, then three scheduled runs with 0, 50 and 0 new images in between."""
    root = tmp_path_factory.mktemp("incremental")
    (root / "landing").mkdir()
    (root / "masks").mkdir()
    spec = _spec(root, collection["checkpoint"])
    flow = with_runner(run_flow, ONE_WORKER)
    # Nothing to hash, nothing to segment: such a run must not need a Dask cluster at all, so the
    # quiet runs are given one that does not exist (a task submitted to it would fail the run).
    no_cluster = with_runner(run_flow, ExecutionSpec(dask_address="tcp://127.0.0.1:9"))
    _drop(root / "landing", root / "masks", 0, 20, seed=1)
    results, files, units = [], [], []
    for new in (None, 0, 50, 0):
        if new:
            _drop(root / "landing", root / "masks", 20, new, seed=2, shape=(40, 56))
        results.append((no_cluster if new == 0 else flow)(spec))
        files.append(_lake_files(root))
        run_dir = results[-1]["run_dir"]
        units.append(dict(done_records(run_dir, read_run_info(run_dir)["key"])))
    return root, spec, results, files, units


def test_three_scheduled_runs_give_exactly_the_expected_rows(scheduled):
    root, spec, results, files, units = scheduled
    first, empty1, fifty, empty2 = results
    assert [r["ingest"]["new_files"] for r in results] == [20, 0, 50, 0]
    assert [r["ingest"].get("hashed") for r in results[1:]] == [0, 50, 0]  # unchanged files are not read again
    assert [r["segmented"] for r in results] == [True, False, True, False]
    dice = read_lake(spec.segment.lake, "dice").to_pandas()
    assert len(dice) == 70 * CLASSES
    assert not dice.duplicated(["image_id", "class_id"]).any()
    assert sorted(dice.image_id.unique()) == [f"img-{i:04d}" for i in range(70)]
    assert (dice.status == "ok").all() and (dice.ingest_batch.isin([0, 1])).all()
    assert dice.groupby("ingest_batch").image_id.nunique().to_dict() == {0: 20, 1: 50}
    manifest = read_lake(spec.segment.lake, "manifest").to_pandas()
    assert len(manifest) == 70 and not manifest.sha256.duplicated().any()
    run_dice = open_run(results[-1]["run_dir"]).dice_table().to_pandas()
    assert len(run_dice) == 70 * CLASSES


def _task_names(flow_run_id: str) -> list[str]:
    import os

    found = httpx.post(f"{os.environ['PREFECT_API_URL']}/task_runs/filter",
                       json={"flow_runs": {"id": {"any_": [flow_run_id]}}}).json()
    return sorted(r["name"] for r in found)


def test_runs_without_new_images_do_no_inference_and_write_nothing(scheduled):
    root, spec, results, files, units = scheduled
    assert files[1] == files[0] and files[3] == files[2]
    assert units[1] == units[0] and units[3] == units[2]
    assert len(files[2]) > len(files[1])
    for quiet in (results[1], results[3]):  # the landing zone is probed, the lake checked; no model runs
        names = _task_names(quiet["flow_run_id"])
        assert names and all(n.startswith(("probe-files", "publish-lake")) for n in names), names
    busy = _task_names(results[2]["flow_run_id"])
    assert any(n.startswith("segment-unit") for n in busy) and any(n.startswith("publish-lake") for n in busy)
    assert len(open_store(spec.ingest.store).groups) == 2  # the first batch and one appended group
    assert {r["run_dir"] for r in results} == {incremental_run_dir(spec.segment.out, spec.segment.checkpoint)}


def test_lake_is_hive_partitioned_with_schema_metadata_and_duckdb_reads_it(scheduled):
    root, spec, *_ = scheduled
    lake = Path(spec.segment.lake)
    parts = [p.relative_to(lake / "dice").parts for p in (lake / "dice").rglob("*.parquet")]
    assert parts and all(len(p) == 3 and p[0].startswith("run_date=20") and p[1] == "model=unet" for p in parts)
    assert not any("model" in pq.read_schema(lake / "dice" / Path(*p)).names for p in parts)  # Hive: in the path only
    query = f"from read_parquet('{lake}/dice/**/*.parquet', hive_partitioning = true)"
    columns = [r[0] for r in duckdb.sql(f"describe select * {query}").fetchall()]
    assert sorted(columns) == sorted(lake_columns("dice"))
    per_model = duckdb.sql(f"select model, count(*), count(distinct image_id) {query} group by model").fetchall()
    assert per_model == [("unet", 70 * CLASSES, 70)]
    meta = pq.read_schema(next((lake / "dice").rglob("*.parquet"))).metadata
    assert b"segflow" in meta and b'"checkpoint_sha256"' in meta[b"segflow"] and b'"run_spec"' in meta[b"segflow"]


def test_a_changed_file_supersedes_its_old_rows(collection, tmp_path):
    spec, flow = _first_run(collection, tmp_path, 6, seed=3)
    from segcore.collection.imageio import read_image

    image = tmp_path / "landing" / "img-0003.png"
    write_png(image, 255 - read_image(image)[..., 0])
    result = flow(spec)
    assert result["ingest"]["new_files"] == 1 and result["ingest"]["superseded"] == 1
    manifest = read_manifest(spec.ingest.store).to_pandas()
    versions = manifest[manifest.image_id == "img-0003"]
    assert len(versions) == 2 and versions.superseded_by.notna().sum() == 1
    dice = read_lake(spec.segment.lake, "dice").to_pandas()
    assert len(dice) == 7 * CLASSES  # append-only: the old rows stay, marked by their batch
    assert sorted(dice[dice.image_id == "img-0003"].ingest_batch.unique()) == [0, 1]
    assert result["images_evaluated"] == 6  # the run summary counts the newest version only
    assert open_run(result["run_dir"]).image_ids == [f"img-{i:04d}" for i in range(6)]
    newest = dice[~((dice.image_id == "img-0003") & (dice.ingest_batch == 0)) & ~dice.empty_gt]
    current = lake_report(spec.segment.lake)["current"].to_pandas().set_index("class_name")
    for name, rows in newest.groupby("class_name"):
        assert current.loc[name, "images"] == len(rows)
        assert current.loc[name, "mean_dice"] == pytest.approx(rows.dice.mean())
    # the same bytes written again (a new modification time): hashed again, and not new
    image.write_bytes(image.read_bytes())
    os.utime(image, ns=(1, 1))
    touched = flow(spec)
    assert touched["ingest"]["hashed"] == 1 and touched["ingest"]["new_files"] == 0 and not touched["segmented"]
    assert flow(spec)["ingest"]["hashed"] == 0  # its new stamp was recorded: not read a third time
    # changed back to its first content: new again, and it supersedes the second version
    write_png(image, 255 - read_image(image)[..., 0])
    back = flow(spec)
    assert back["ingest"]["new_files"] == 1 and back["ingest"]["superseded"] == 1
    manifest = read_manifest(spec.ingest.store).to_pandas()
    versions = manifest[manifest.image_id == "img-0003"].sort_values("batch")
    assert versions.sha256.iloc[0] == versions.sha256.iloc[2] != versions.sha256.iloc[1]
    assert versions.superseded_by.isna().tolist() == [False, False, True]
    # a retrained checkpoint gets a run directory of its own and segments every current image
    import torch

    from segcore.models.checkpoint import load_checkpoint, save_checkpoint

    model, meta = load_checkpoint(collection["checkpoint"])
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    retrained = save_checkpoint(tmp_path / "retrained.safetensors", model, meta)
    spec2 = spec.model_copy(update={"segment": spec.segment.model_copy(update={"checkpoint": str(retrained)})})
    again = flow(spec2)
    assert again["run_dir"] != back["run_dir"] and again["ingest"]["new_files"] == 0
    assert again["segmented"] and again["images_evaluated"] == 6
    # ... once: the two older versions of img-0003 get no forward pass, no rows and a blank mask
    records = done_records(again["run_dir"], read_run_info(again["run_dir"])["key"]).values()
    assert sum(r.n_superseded for r in records) == 2 and sum(r.n_images - r.n_superseded for r in records) == 6
    rows = pq.read_table(os.path.join(again["run_dir"], "dice")).to_pandas()
    assert len(rows) == 6 * CLASSES and sorted(rows.image_id.unique()) == [f"img-{i:04d}" for i in range(6)]
    new_rows = read_lake(spec.segment.lake, "dice").to_pandas()
    new_rows = new_rows[new_rows.checkpoint_sha256 == read_run_info(again["run_dir"])["checkpoint_sha256"]]
    assert len(new_rows) == 6 * CLASSES and (new_rows.source_sha256.isin(versions.sha256.iloc[2:])
                                             | (new_rows.image_id != "img-0003")).all()
    import zarr

    masks = zarr.open_group(os.path.join(again["run_dir"], "masks.zarr"), mode="r")
    for _, old in versions.iloc[:2].iterrows():
        assert not masks[f"{old.group}/0"][int(old["index"])].any()


def test_a_corrected_mask_is_evaluated_again_and_a_vanished_one_changes_nothing(collection, tmp_path):
    from segcore.collection.imageio import read_mask

    spec, flow = _first_run(collection, tmp_path, 6, seed=4)
    image_before = (tmp_path / "landing" / "img-0002.png").read_bytes()
    corrected = read_mask(tmp_path / "masks" / "img-0002.png").copy()
    corrected[:, : corrected.shape[1] // 2] = 2  # the annotator painted the left half as class 2
    write_png(tmp_path / "masks" / "img-0002.png", corrected)
    result = flow(spec)
    assert (tmp_path / "landing" / "img-0002.png").read_bytes() == image_before
    assert result["ingest"]["new_files"] == 1 and result["ingest"]["superseded"] == 1 and result["segmented"]
    versions = read_manifest(spec.ingest.store).to_pandas().query("image_id == 'img-0002'").sort_values("batch")
    assert versions.sha256.nunique() == 1 and versions.mask_sha256.nunique() == 2
    assert versions.superseded_by.tolist()[0] == versions.sha256.iloc[0] and versions.superseded_by.isna().iloc[1]
    # the run's current Dice of the image is the one against the corrected mask
    run = open_run(result["run_dir"])
    np.testing.assert_array_equal(run.ground_truth("img-0002"), corrected)
    pred = run.mask("img-0002")
    for row in run.dice("img-0002"):
        gt, pr = corrected == row["class_id"], pred == row["class_id"]
        tp = int((gt & pr).sum())
        assert (row["tp"], row["fp"], row["fn"]) == (tp, int(pr.sum()) - tp, int(gt.sum()) - tp)
    assert result["images_evaluated"] == 6
    lake = read_lake(spec.segment.lake, "dice").to_pandas().query("image_id == 'img-0002'")
    assert lake.groupby("ingest_batch").mask_sha256.unique().map(len).tolist() == [1, 1]
    assert set(lake.mask_sha256) == set(versions.mask_sha256)  # each row names the ground truth it was scored on
    # nothing changed: neither file is read again; a mask that disappears changes nothing either
    quiet = flow(spec)
    assert quiet["ingest"]["new_files"] == 0 and quiet["ingest"]["hashed"] == 0 and not quiet["segmented"]
    (tmp_path / "masks" / "img-0005.png").unlink()
    gone = flow(spec)
    assert gone["ingest"]["new_files"] == 0 and gone["ingest"]["hashed"] == 0 and not gone["segmented"]


def test_source_paths_are_recorded_absolute_whatever_the_working_directory(collection, tmp_path, monkeypatch):
    (tmp_path / "landing").mkdir()
    (tmp_path / "masks").mkdir()
    _drop(tmp_path / "landing", tmp_path / "masks", 0, 4, seed=5)
    absolute = _spec(tmp_path, collection["checkpoint"])
    relative = absolute.model_copy(update={"ingest": absolute.ingest.model_copy(
        update={"images": "landing", "masks": "masks"})})
    flow = with_runner(run_flow, ONE_WORKER)
    monkeypatch.chdir(tmp_path)
    flow(relative)
    manifest = read_manifest(absolute.ingest.store).to_pandas()
    assert sorted(manifest.source_path) == [str(tmp_path / "landing" / f"img-{i:04d}.png") for i in range(4)]
    assert sorted(manifest.mask_path) == [str(tmp_path / "masks" / f"img-{i:04d}.png") for i in range(4)]
    assert sorted(read_lake(absolute.segment.lake, "dice").to_pandas().source_path.unique()) == sorted(
        manifest.source_path)
    monkeypatch.chdir(tmp_path.parent)  # the same landing zone named another way: known files, not read again
    again = flow(absolute)
    assert again["ingest"]["hashed"] == 0 and again["ingest"]["new_files"] == 0 and not again["segmented"]


def test_a_store_whose_manifest_predates_mask_hashes_is_read_once_then_quick_checked(collection, tmp_path):
    spec, flow = _first_run(collection, tmp_path, 4, seed=6)
    path = Path(spec.ingest.store) / "manifest.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["mask_sha256", "mask_signature"]), path)  # an older manifest
    upgraded = flow(spec)
    assert upgraded["ingest"]["hashed"] == 4 and upgraded["ingest"]["new_files"] == 0 and not upgraded["segmented"]
    assert read_manifest(spec.ingest.store).column("mask_sha256").null_count == 0  # the masks' hashes recorded
    assert flow(spec)["ingest"]["hashed"] == 0


def test_an_empty_landing_zone_is_nothing_to_do(collection, tmp_path):
    (tmp_path / "landing").mkdir()
    (tmp_path / "masks").mkdir()
    result = with_runner(run_flow, ONE_WORKER)(_spec(tmp_path, collection["checkpoint"]))
    assert result["ingest"]["new_files"] == 0 and not result["segmented"]
    assert not (tmp_path / "store.zarr").exists()


def test_incremental_into_a_store_with_other_masks_is_refused(scheduled, collection, tmp_path):
    root, spec, *_ = scheduled
    bad = spec.model_copy(update={"ingest": spec.ingest.model_copy(update={"masks": None})})
    with pytest.raises(StoreError, match="masks"):
        with_runner(run_flow, ONE_WORKER)(bad)


def test_a_landing_zone_on_s3_is_staged_and_recorded_by_url(collection, tmp_path, s3_server):
    import s3fs

    local = tmp_path / "drop"
    (local / "landing").mkdir(parents=True)
    (local / "masks").mkdir()
    bucket = s3_server.bucket()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)

    def upload(first: int, count: int, seed: int) -> None:
        _drop(local / "landing", local / "masks", first, count, seed=seed)
        for sub in ("landing", "masks"):
            for f in sorted((local / sub).glob("*.png")):
                fs.put_file(str(f), f"{bucket[5:]}/{sub}/{f.name}")

    store = str(tmp_path / "store.zarr")
    spec = RunSpec(
        ingest=IngestSpec(images=f"{bucket}/landing", masks=f"{bucket}/masks", store=store, incremental=True),
        segment=SegmentSpec(store=store, checkpoint=collection["checkpoint"], out=f"{bucket}/run",
                            lake=f"{bucket}/lake", execution=ONE_WORKER))
    flow = with_runner(run_flow, ONE_WORKER)
    upload(0, 5, seed=4)
    results = [flow(spec)]
    upload(5, 3, seed=5)
    results += [flow(spec), flow(spec)]
    assert [r["ingest"]["new_files"] for r in results] == [5, 3, 0]
    assert [r["ingest"]["hashed"] for r in results[1:]] == [3, 0]  # unchanged objects are not downloaded again
    assert [r["segmented"] for r in results] == [True, True, False]
    manifest = read_manifest(store).to_pandas()
    assert sorted(manifest.source_path) == [f"{bucket}/landing/img-{i:04d}.png" for i in range(8)]
    assert manifest.mask_path.str.startswith(f"{bucket}/masks/").all() and (manifest.mask_status == "ok").all()
    assert not Path(f"{store}.staging").exists()
    dice = read_lake(f"{bucket}/lake", "dice").to_pandas()
    assert len(dice) == 8 * CLASSES and not dice.duplicated(["image_id", "class_id"]).any()


def test_an_interrupted_first_ingest_is_redone_and_missing_masks_are_an_error(collection, tmp_path):
    from segcore.errors import NotFound
    from segcore.collection.store import GroupInfo, create_store

    (tmp_path / "landing").mkdir()
    (tmp_path / "masks").mkdir()
    _drop(tmp_path / "landing", tmp_path / "masks", 0, 4, seed=6)
    spec = _spec(tmp_path, collection["checkpoint"])
    stale = GroupInfo(name="g000", height=9, width=9, channels=1, dtype="uint8", count=1, chunk_images=1)
    create_store(spec.ingest.store, [stale], with_gt=True, mask_kind="class", spec={})  # no manifest: died here
    result = with_runner(run_flow, ONE_WORKER)(spec)
    assert result["ingest"]["new_files"] == 4 and result["images_evaluated"] == 4
    assert [(g.height, g.count) for g in open_store(spec.ingest.store).groups] == [(48, 4)]
    no_masks = spec.model_copy(update={"ingest": spec.ingest.model_copy(update={"masks": str(tmp_path / "nope")})})
    with pytest.raises(NotFound, match="mask directory"):
        with_runner(run_flow, ONE_WORKER)(no_masks)
