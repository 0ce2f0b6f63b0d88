"""segment_unit run by hand on single units (no Prefect, no Dask), and the run directory rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from segcore.models.checkpoint import ModelMeta, save_checkpoint
from segcore.fsio import file_sha256
from segcore.errors import ConfigError, StoreError
from segcore.collection.imageio import write_png
from segcore.run.units import load_model_cached, predict_labels, resolve_device, segment_unit
from segcore.models import create_model
from segcore.normalise import Normalisation
from segcore.run.plan import check_alignment, plan_units
from segcore.run.results import open_run
from segcore.run.rundir import finished_units, mask_chunks, prepare_run
from segcore.collection.sources import pair_sources, probe_sources
from segcore.collection.store import chunk_rows, create_store, open_store, plan_groups, write_manifest, write_store_chunk

META = ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2}, class_names=("bg", "fg"), in_channels=1,
                 normalisation=Normalisation(mode="range", scale=255.0))


class Threshold(torch.nn.Module):
    """A pointwise 'model': class 1 where the normalised pixel is above 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([0.5 - x, x - 0.5], dim=1)


@pytest.fixture
def small_store(tmp_path: Path) -> dict:
    rng = np.random.default_rng(3)
    for i in range(7):
        img = rng.integers(0, 256, (16, 16), dtype=np.uint8)
        write_png(tmp_path / "img" / f"i{i}.png", img)
        if i != 2:
            gt = (img > 100).astype(np.uint8)  # differs from the threshold model's 128 on purpose
            write_png(tmp_path / "gt" / f"i{i}.png", gt)
    rows = probe_sources(pair_sources(str(tmp_path / "img"), str(tmp_path / "gt")))
    groups, planned = plan_groups(rows, chunk_pixels=3 * 256, max_chunk_images=64)
    store = str(tmp_path / "s.zarr")
    create_store(store, groups, with_gt=True, mask_kind="class", spec={})
    written = [r for c in chunk_rows(planned, groups) for r in write_store_chunk(store, c, threads=2)]
    write_manifest(store, written)
    ckpt = save_checkpoint(tmp_path / "m.safetensors", create_model("unet", in_channels=1, num_classes=2,
                                                                    base=4, depth=2), META)
    return {"store": store, "ckpt": str(ckpt), "sha": file_sha256(ckpt), "tmp": tmp_path}


def test_resolve_device_on_a_cpu_machine():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    assert resolve_device("auto") == "cpu" and resolve_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match="no CUDA"):
        resolve_device("cuda")
    with pytest.raises(ConfigError, match="auto, cpu, cuda"):
        resolve_device("tpu")


def test_predict_labels_is_argmax_of_the_model():
    images = np.array([[[0], [200]], [[129], [127]]], dtype=np.uint8)[None]  # (1, 2, 2, 1)
    labels = predict_labels(Threshold(), images, normalisation=META.normalisation, device="cpu")
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, [[[0, 1], [1, 0]]])


def test_units_run_by_hand_write_masks_dice_and_markers(small_store):
    info = open_store(small_store["store"])
    run_dir = str(small_store["tmp"] / "run")
    run = prepare_run(run_dir, store_path=info.path, checkpoint=small_store["ckpt"],
                      checkpoint_sha256=small_store["sha"], meta=META, groups=info.groups, spec={})
    units = plan_units(info)
    assert [u.n_images for u in units] == [3, 3, 1]
    check_alignment(units, chunks=mask_chunks(run_dir)[0], counts=mask_chunks(run_dir)[1])
    model, _ = load_model_cached(small_store["ckpt"], sha256=small_store["sha"], device="cpu")
    assert load_model_cached(small_store["ckpt"], sha256=small_store["sha"], device="cpu")[0] is model
    records = [segment_unit(store_path=info.path, run_dir=run_dir, run_id=run["run_id"], unit=u,
                            checkpoint=small_store["ckpt"], checkpoint_sha256=small_store["sha"],
                            mask_kind="class", batch_size=2) for u in units]
    assert sum(r["n_evaluated"] for r in records) == 6  # i2 has no mask
    assert set(finished_units(run_dir)) == {u.name for u in units}
    reader = open_run(run_dir)
    table = reader.dice_table()
    assert table.num_rows == 12 and set(table["status"].to_pylist()) == {"ok"}
    for image_id in reader.image_ids:
        pred = predict_labels(model, reader.image(image_id)[None], normalisation=META.normalisation, device="cpu")[0]
        np.testing.assert_array_equal(reader.mask(image_id), pred)
    assert reader.ground_truth("i2") is None and reader.dice("i2") == []


def test_prepare_run_refuses_other_runs_and_foreign_directories(small_store, tmp_path):
    info = open_store(small_store["store"])
    kwargs = dict(store_path=info.path, checkpoint=small_store["ckpt"], meta=META, groups=info.groups, spec={})
    first = prepare_run(str(tmp_path / "r"), checkpoint_sha256=small_store["sha"], **kwargs)
    again = prepare_run(str(tmp_path / "r"), checkpoint_sha256=small_store["sha"], **kwargs)
    assert again["run_id"] == first["run_id"]
    with pytest.raises(StoreError, match="new --out"):
        prepare_run(str(tmp_path / "r"), checkpoint_sha256="0" * 64, **kwargs)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match="not a segflow run directory"):
        prepare_run(str(tmp_path / "foreign"), checkpoint_sha256=small_store["sha"], **kwargs)
    assert json.loads((tmp_path / "r" / "run.json").read_text())["run_id"] == first["run_id"]


def test_labels_beyond_the_model_classes_are_error_rows(small_store, tmp_path):
    # A 3-valued class mask evaluated with a 2-class model: that image becomes error rows.
    write_png(tmp_path / "img" / "x.png", np.zeros((16, 16), np.uint8))
    write_png(tmp_path / "gt" / "x.png", np.full((16, 16), 2, np.uint8))
    rows = probe_sources(pair_sources(str(tmp_path / "img"), str(tmp_path / "gt")))
    groups, planned = plan_groups(rows, chunk_pixels=10_000, max_chunk_images=64)
    store = str(tmp_path / "x.zarr")
    create_store(store, groups, with_gt=True, mask_kind="class", spec={})
    write_manifest(store, [r for c in chunk_rows(planned, groups) for r in write_store_chunk(store, c)])
    info = open_store(store)
    run = prepare_run(str(tmp_path / "run"), store_path=store, checkpoint=small_store["ckpt"],
                      checkpoint_sha256=small_store["sha"], meta=META, groups=info.groups, spec={})
    (unit,) = plan_units(info)
    rec = segment_unit(store_path=store, run_dir=str(tmp_path / "run"), run_id=run["run_id"], unit=unit,
                       checkpoint=small_store["ckpt"], checkpoint_sha256=small_store["sha"], mask_kind="class")
    assert rec["n_errors"] == 1
    rows = [r for r in open_run(tmp_path / "run").dice("x")]
    assert len(rows) == 2 and all(r["status"] == "error" and "label 2" in r["error"] for r in rows)
