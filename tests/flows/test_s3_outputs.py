"""The same runs with the run directory on S3 (a local moto server) and on a local disk give the same bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import zarr

from flows.pipeline import ingest_flow, segment_flow, with_runner
from segcore import fsio
from segcore.models.checkpoint import ModelMeta, save_checkpoint
from segcore.config import ExecutionSpec, IngestSpec, SegmentSpec
from segcore.errors import StoreError
from segcore.collection.imageio import write_png
from segcore.models import create_model
from segcore.normalise import Normalisation
from segcore.run.results import open_run
from segcore.run.rundir import instances_path, label_arrays, masks_path
from segcore.synthetic_large import make_large_sample
from segcore.run.blocks import load_block
from tests.flows.conftest import module_cluster

ONE_WORKER = ExecutionSpec(n_workers=1, threads_per_worker=1)
_cluster = module_cluster(ONE_WORKER, "s3_server")


def _chunk_objects(array_group: str) -> dict[str, bytes]:
    """Every chunk object of every array in a Zarr group, by key relative to the group."""
    found = [loc for loc in fsio.list_files(array_group) if not loc.endswith("zarr.json")]
    return {loc[len(array_group) + 1:]: data for loc, data in zip(found, fsio.read_many(found))}


def _assert_same_arrays(local: str, remote: str) -> None:
    a, b = label_arrays(local), label_arrays(remote)
    assert sorted(a) == sorted(b) and a
    for name in a:
        assert a[name].chunks == b[name].chunks and a[name].dtype == b[name].dtype
        np.testing.assert_array_equal(a[name][:], b[name][:])
    local_chunks, remote_chunks = _chunk_objects(local), _chunk_objects(remote)
    assert local_chunks and sorted(local_chunks) == sorted(remote_chunks)
    assert all(local_chunks[k] == remote_chunks[k] for k in local_chunks)
    # the same OME-Zarr metadata, but only a local run can point at the (local) store's images
    assert zarr.open_group(local, mode="r").attrs["ome"] == zarr.open_group(remote, mode="r").attrs["ome"]
    for name in a:
        ome = dict(zarr.open_group(fsio.join(local, name), mode="r").attrs["ome"])
        assert "source" in ome["image-label"]
        ome["image-label"] = {k: v for k, v in ome["image-label"].items() if k != "source"}
        assert ome == zarr.open_group(fsio.join(remote, name), mode="r").attrs["ome"]


def _same_table(local: pd.DataFrame, remote: pd.DataFrame, keys: list[str]) -> None:
    assert len(local) > 0
    assert local.run_id.nunique() == 1 and remote.run_id.nunique() == 1
    left = local.drop(columns="run_id").sort_values(keys).reset_index(drop=True)
    right = remote.drop(columns="run_id").sort_values(keys).reset_index(drop=True)
    pd.testing.assert_frame_equal(left, right)


@pytest.fixture(scope="module")
def semantic_runs(prefect_harness, collection, fitted_checkpoint, s3_server, tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("s3-semantic")
    checkpoint = fitted_checkpoint
    store = str(tmp / "store.zarr")
    with_runner(ingest_flow, ONE_WORKER)(IngestSpec(images=collection["images"], masks=collection["masks"],
                                                    store=store, max_chunk_images=16))
    local = SegmentSpec(store=store, checkpoint=checkpoint, out=str(tmp / "run"), batch_size=5,
                        execution=ONE_WORKER)
    remote = local.model_copy(update={"out": s3_server.bucket() + "/runs/r1"})
    return {"local": local, "remote": remote, "local_summary": with_runner(segment_flow, ONE_WORKER)(local),
            "remote_summary": with_runner(segment_flow, ONE_WORKER)(remote)}


def test_masks_and_dice_on_s3_equal_the_local_run(semantic_runs) -> None:
    local, remote = semantic_runs["local"].out, semantic_runs["remote"].out
    assert not fsio.is_local(remote) and fsio.exists(fsio.join(remote, "run.json"))
    assert not Path(remote.split("://", 1)[1]).exists()  # nothing was written to a local path of that name
    _assert_same_arrays(masks_path(local), masks_path(remote))
    _same_table(open_run(local).dice_table().to_pandas(), open_run(remote).dice_table().to_pandas(),
                ["image_id", "class_id"])
    run = open_run(remote)
    assert run.mask("img-000").shape == (48, 48)
    assert run.info["store"] == str(Path(semantic_runs["local"].store).resolve())
    for name in ("summary.json", "summary.md"):
        assert fsio.exists(fsio.join(remote, name))
    assert semantic_runs["remote_summary"]["mean_foreground_dice"] == semantic_runs["local_summary"][
        "mean_foreground_dice"] > 0.2


def test_resume_on_s3_skips_done_units_and_redoes_lost_ones(semantic_runs) -> None:
    spec = semantic_runs["remote"]
    before = _chunk_objects(masks_path(spec.out))
    again = with_runner(segment_flow, ONE_WORKER)(spec)
    assert again["units_skipped"] == again["units"] and again["run_id"] == semantic_runs["remote_summary"]["run_id"]
    markers = fsio.list_files(fsio.join(spec.out, "units"), suffix=".json")
    assert len(markers) == again["units"]
    fs, path = fsio.url_to_fs(markers[0])
    fs.rm_file(path)
    third = with_runner(segment_flow, ONE_WORKER)(spec)
    assert third["units_skipped"] == third["units"] - 1
    assert _chunk_objects(masks_path(spec.out)) == before
    dice = open_run(spec.out).dice_table().to_pandas()
    assert not dice.duplicated(["image_id", "class_id"]).any()
    _same_table(open_run(semantic_runs["local"].out).dice_table().to_pandas(), dice, ["image_id", "class_id"])


def test_a_run_directory_on_s3_of_another_checkpoint_is_refused(semantic_runs, collection) -> None:
    spec = semantic_runs["remote"].model_copy(update={"checkpoint": collection["checkpoint"]})
    with pytest.raises(StoreError, match="holds run"):
        with_runner(segment_flow, ONE_WORKER)(spec)


def _instance_collection(root: Path) -> dict:
    """One 200 x 260 image (tiled in 128-px blocks) and three 48 x 48 ones, with instance labels."""
    rng = np.random.default_rng(11)
    for name, (h, w), per_128 in (("big", (200, 260), 3.0), ("small-0", (48, 48), 8.0), ("small-1", (48, 48), 8.0),
                                  ("small-2", (48, 48), 8.0)):
        image, labels = make_large_sample(rng, height=h, width=w, kind="instance", per_128=per_128)
        write_png(root / "images" / f"{name}.png", image)
        write_png(root / "masks" / f"{name}.png", labels.astype(np.uint16))
    return {"images": str(root / "images"), "masks": str(root / "masks")}


def test_tiled_instance_run_on_s3_equals_the_local_run(s3_server, tmp_path: Path) -> None:
    data = _instance_collection(tmp_path)
    store = str(tmp_path / "store.zarr")
    execution = ExecutionSpec(n_workers=1, threads_per_worker=1)
    with_runner(ingest_flow, execution)(IngestSpec(images=data["images"], masks=data["masks"], store=store,
                                                   mask_kind="instance", chunk_pixels=20_000, tile_chunk=128))
    torch.manual_seed(0)
    arch = {"score_threshold": 0.0, "box_detections_per_img": 25,  # dozens of objects per block, not 100,
            "proposals_per_img": 100}  # and a tenth of the proposals (the box head's time halves)
    ckpt = save_checkpoint(tmp_path / "mrcnn.safetensors", create_model("maskrcnn_r18", in_channels=1, num_classes=2,
                                                                        **arch),
                           ModelMeta(arch="maskrcnn_r18", arch_kwargs=arch, class_names=("background", "nucleus"),
                                     in_channels=1, normalisation=Normalisation(mode="percentile")))
    local = SegmentSpec(store=store, checkpoint=str(ckpt), out=str(tmp_path / "run"), tile_size=128, overlap=24,
                        batch_size=2, execution=execution)
    remote = local.model_copy(update={"out": s3_server.bucket() + "/run"})
    for spec in (local, remote):
        with_runner(segment_flow, execution)(spec)
    blocks = fsio.list_files(fsio.join(remote.out, "blocks"), suffix=".npz")
    assert len(blocks) == 2 * 3
    assert [b.rsplit("/", 1)[1] for b in blocks] == [
        b.rsplit("/", 1)[1] for b in fsio.list_files(fsio.join(local.out, "blocks"), suffix=".npz")]
    for b in blocks:  # the same objects (npz archives carry their write time, so compare contents)
        name = b.rsplit("/", 1)[1][:-len(".npz")]
        x, y = load_block(local.out, name), load_block(remote.out, name)
        assert len(x) == len(y) and all(np.array_equal(m, n) for m, n in zip(x.masks, y.masks))
        np.testing.assert_array_equal(x.boxes, y.boxes)
        np.testing.assert_array_equal(x.scores, y.scores)
    _assert_same_arrays(masks_path(local.out), masks_path(remote.out))
    _assert_same_arrays(instances_path(local.out), instances_path(remote.out))
    a, b = open_run(local.out), open_run(remote.out)
    _same_table(a.dice_table().to_pandas(), b.dice_table().to_pandas(), ["image_id", "class_id"])
    _same_table(a.instance_table().to_pandas(), b.instance_table().to_pandas(), ["image_id", "instance_id"])
    _same_table(a.instance_metrics_table().to_pandas(), b.instance_metrics_table().to_pandas(), ["image_id"])
    _same_table(a.seam_table().to_pandas(), b.seam_table().to_pandas(), ["image_id"])
    assert b.instances("big").max() > 0
    again = with_runner(segment_flow, execution)(remote)
    assert again["units_skipped"] == again["units"]
