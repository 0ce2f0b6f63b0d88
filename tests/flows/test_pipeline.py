"""The whole pipeline through Prefect + Dask on a small real collection."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from flows.pipeline import ingest_flow, run_flow, segment_flow, with_runner
from segcore.config import ExecutionSpec, IngestSpec, RunSpec, SegmentSpec
from segcore.errors import CheckpointError, StoreError
from segcore.run.results import open_run
from segcore.collection.store import open_store, read_manifest
from tests.flows.conftest import module_cluster

ONE_WORKER = ExecutionSpec(n_workers=1, threads_per_worker=1)
_cluster = module_cluster(ONE_WORKER)


def _run(collection, tmp_path: Path, name: str = "run") -> tuple[RunSpec, dict]:
    store = str(tmp_path / "store.zarr")
    spec = RunSpec(
        ingest=IngestSpec(images=collection["images"], masks=collection["masks"], store=store, max_chunk_images=16),
        segment=SegmentSpec(store=store, checkpoint=collection["checkpoint"], out=str(tmp_path / name),
                            batch_size=5, execution=ONE_WORKER),
    )
    return spec, with_runner(run_flow, ONE_WORKER)(spec)


def _independent_dice(pred: np.ndarray, gt: np.ndarray, k: int) -> float:
    x, y = pred == k, gt == k
    if x.sum() + y.sum() == 0:
        return 1.0
    return 2.0 * np.logical_and(x, y).sum() / (x.sum() + y.sum())


@pytest.fixture(scope="module")
def finished(collection, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipeline")
    spec, summary = _run(collection, tmp)
    return spec, summary


def test_every_image_has_a_mask_and_one_dice_row_per_class(finished, collection):
    spec, summary = finished
    run = open_run(spec.segment.out)
    manifest = read_manifest(spec.segment.store).to_pylist()
    ok_ids = sorted(r["image_id"] for r in manifest if r["status"] == "ok")
    assert run.image_ids == ok_ids and len(ok_ids) == collection["n_ok"]
    for image_id in ok_ids:
        assert run.mask(image_id).shape == run.image(image_id).shape[:2]
    table = run.dice_table().to_pandas()
    assert not table.duplicated(["image_id", "class_id"]).any()
    with_gt = {r["image_id"] for r in manifest if r["status"] == "ok" and r["mask_status"] == "ok"}
    ok_rows = table[table.status == "ok"]
    assert set(ok_rows.image_id) == with_gt
    assert (ok_rows.groupby("image_id").size() == 3).all()
    assert summary["images_evaluated"] == len(with_gt)


def test_bad_inputs_are_error_rows_and_the_rest_is_processed(finished):
    spec, summary = finished
    manifest = {r["image_id"]: r for r in read_manifest(spec.segment.store).to_pylist()}
    assert manifest["corrupt"]["status"] == "error" and manifest["corrupt"]["group"] is None
    assert "corrupt" in manifest["corrupt"]["error"] or "decode" in manifest["corrupt"]["error"]
    assert manifest["wrongmask"]["mask_status"] == "error" and "30x30" in manifest["wrongmask"]["mask_error"]
    assert manifest["img-007"]["mask_status"] == "missing"
    table = open_run(spec.segment.out).dice_table().to_pandas()
    err = table[table.image_id == "wrongmask"]
    assert len(err) == 3 and (err.status == "error").all() and err.dice.isna().all()
    assert "img-007" not in set(table.image_id)
    assert summary["unreadable_files"][0]["source_path"].endswith("corrupt.png")


def test_parquet_dice_equals_dice_recomputed_from_masks(finished):
    spec, _ = finished
    run = open_run(spec.segment.out)
    rows = run.dice_table().to_pylist()
    checked = 0
    for r in rows:
        if r["status"] != "ok":
            continue
        gt, pred = run.ground_truth(r["image_id"]), run.mask(r["image_id"])
        assert abs(r["dice"] - _independent_dice(pred, gt, r["class_id"])) <= 1e-6
        assert r["tp"] == int(np.logical_and(pred == r["class_id"], gt == r["class_id"]).sum())
        checked += 1
    assert checked >= 100


def test_dataset_reads_with_duckdb_pyarrow_and_pandas(finished):
    spec, _ = finished
    dice_dir = Path(spec.segment.out) / "dice"
    run_id = open_run(spec.segment.out).run_id
    n_duck, ids = duckdb.sql(
        f"select count(*), list(distinct run_id) from read_parquet('{dice_dir}/**/*.parquet', hive_partitioning=true)"
    ).fetchall()[0]
    frame = pd.read_parquet(dice_dir)
    table = pq.read_table(dice_dir)
    assert n_duck == len(frame) == table.num_rows > 0
    assert ids == [run_id]
    assert {"run_id", "image_id", "class_id", "class_name", "dice", "tp", "fp", "fn", "gt_pixels", "pred_pixels",
            "empty_gt", "model", "checkpoint_sha256", "status", "error"} <= set(frame.columns)


def test_running_again_skips_finished_units_and_redoes_missing_ones(finished):
    spec, first = finished
    out = Path(spec.segment.out)
    before = open_run(out).dice_table().sort_by([("image_id", "ascending"), ("class_id", "ascending")])
    parts_before = sorted(p.name for p in (out / "dice").rglob("*.parquet"))
    victim = out / "units" / "unit-00001.json"
    victim.unlink()
    again = with_runner(segment_flow, ONE_WORKER)(spec.segment)
    assert again["units_skipped"] == again["units"] - 1
    after = open_run(out).dice_table().sort_by([("image_id", "ascending"), ("class_id", "ascending")])
    assert after.equals(before)
    assert sorted(p.name for p in (out / "dice").rglob("*.parquet")) == parts_before
    assert victim.exists()


def test_a_run_directory_of_another_checkpoint_is_refused(finished, tmp_path):
    spec, _ = finished
    other = tmp_path / "other.safetensors"
    other.write_bytes(Path(spec.segment.checkpoint).read_bytes() + b"")
    from segcore.models.checkpoint import load_checkpoint, save_checkpoint
    model, meta = load_checkpoint(spec.segment.checkpoint)
    for p in model.parameters():
        p.data.mul_(0.5)
    save_checkpoint(other, model, meta)
    bad = spec.segment.model_copy(update={"checkpoint": str(other)})
    with pytest.raises(StoreError, match="new --out"):
        with_runner(segment_flow, ONE_WORKER)(bad)


def test_wrong_checkpoint_fails_before_fan_out(finished, tmp_path):
    spec, _ = finished
    from segcore.models.checkpoint import ModelMeta, save_checkpoint
    from segcore.models import create_model
    two_channel = create_model("unet", in_channels=2, num_classes=3, base=4, depth=2)
    ckpt = save_checkpoint(tmp_path / "two.safetensors", two_channel,
                           ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2},
                                     class_names=("bg", "a", "b"), in_channels=2))
    bad = spec.segment.model_copy(update={"checkpoint": str(ckpt), "out": str(tmp_path / "never")})
    with pytest.raises(CheckpointError, match="channel"):
        with_runner(segment_flow, ONE_WORKER)(bad)
    assert not (tmp_path / "never").exists()


def test_the_same_run_twice_reuses_the_store_and_resumes(finished):
    spec, first = finished
    again = with_runner(run_flow, ONE_WORKER)(spec)
    assert again["units_skipped"] == again["units"] and again["run_id"] == first["run_id"]
    table = open_run(spec.segment.out).dice_table().to_pandas()
    assert not table.duplicated(["image_id", "class_id"]).any()


def test_overwrite_into_a_run_directory_with_results_is_refused_before_the_store_is_replaced(finished):
    spec, first = finished
    store_id = open_store(spec.ingest.store).store_id
    overwrite = spec.model_copy(update={"ingest": spec.ingest.model_copy(update={"overwrite": True})})
    with pytest.raises(StoreError, match="holds the results of a run; --overwrite would replace its store"):
        with_runner(run_flow, ONE_WORKER)(overwrite)
    assert open_store(spec.ingest.store).store_id == store_id


def test_an_existing_store_of_other_sources_is_refused_before_any_work(finished, collection, tmp_path):
    spec, _ = finished
    other = spec.ingest.model_copy(update={"masks": None})
    with pytest.raises(StoreError, match="already exists"):
        with_runner(ingest_flow, ONE_WORKER)(other)


def test_the_flow_publishes_the_summary_as_a_markdown_artifact(finished):
    spec, summary = finished
    import httpx
    from prefect.settings import PREFECT_API_URL

    key = f"dice-summary-{summary['run_id']}".lower()
    response = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter",
                          json={"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 10})
    response.raise_for_status()
    artifacts = response.json()
    # One version per execution of the run (earlier tests resumed it); the newest is the last summary.
    assert artifacts and all(a["type"] == "markdown" for a in artifacts), f"no markdown artifact {key}"
    text = artifacts[0]["data"]
    assert "mean foreground Dice" in text and summary["run_id"] in text
    assert (Path(spec.segment.out) / "summary.md").read_text() == text


def test_flow_run_in_the_locations_gives_every_run_its_own_store_and_run_directory(collection, tmp_path):
    """The on-demand full-run deployment: triggered twice with the same parameters, both runs complete
    (the second through the deployments' entry flow, where the pipeline runs as a subflow)."""
    store = str(tmp_path / "runs" / "{flow_run}" / "store.zarr")
    spec = RunSpec(ingest=IngestSpec(images=collection["images"], masks=collection["masks"], store=store),
                   segment=SegmentSpec(store=store, checkpoint=collection["checkpoint"],
                                       out=str(tmp_path / "runs" / "{flow_run}" / "run"), execution=ONE_WORKER))
    from flows.deployed import run_deployment_flow

    first, second = with_runner(run_flow, ONE_WORKER)(spec), run_deployment_flow(spec)
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 2 and [r["run_dir"] for r in (first, second)] == [str(r / "run") for r in runs]
    for result, run in zip((first, second), runs):
        assert run.name.endswith("-" + result["flow_run_id"].replace("-", "")[:8])  # <UTC start>-<flow run id>
        assert run.name[:8].isdigit() and run.name[8] == "T" and run.name[15] == "Z"
        assert result["images_evaluated"] > 0 and result["units_skipped"] == 0
        manifest = read_manifest(str(run / "store.zarr"))
        ok = manifest.filter(pc.equal(manifest.column("status"), "ok")).column("image_id").to_pylist()
        assert sorted(open_run(str(run / "run")).image_ids) == sorted(ok)
    assert not (tmp_path / "runs" / "{flow_run}").exists()
