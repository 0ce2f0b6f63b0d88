"""segment_unit run by hand on single units (no Prefect, no Dask), the prediction seam, and the run
directory rules (resume keyed by everything that shapes the outputs)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from segcore.models.checkpoint import ModelMeta, save_checkpoint
from segcore.fsio import file_sha256
from segcore.errors import CheckpointError, ConfigError, StoreError
from segcore.collection.imageio import write_png
from segcore.models import create_model
from segcore.models.predict import TorchPredictor, load_predictor, resolve_device
from segcore.normalise import Normalisation
from segcore.run.context import UnitRecord
from segcore.run.plan import check_alignment
from segcore.run.results import open_run
from segcore.run.rundir import done_records, mask_chunks, read_plan, read_run_info
from segcore.run.start import check_mask_labels, start_run
from segcore.run.units import segment_unit
from segcore.collection.fingerprint import fold, write_fingerprint
from segcore.collection.sources import pair_sources, probe_sources
from segcore.collection.store import chunk_rows, create_store, plan_groups, write_manifest, write_store_chunk

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


def test_check_device_knows_this_machines_gpus(monkeypatch):
    from segcore.models.predict import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert check_device("cuda:1") == "cuda:1" and check_device("cpu") == "cpu"
    with pytest.raises(ConfigError, match=r"torch sees 2 CUDA device\(s\) \(cuda:0 to cuda:1\)"):
        check_device("cuda:2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert check_device("auto") == "cpu"
    with pytest.raises(ConfigError, match="no CUDA"):
        check_device("cuda:0")


def test_predictor_labels_are_argmax_of_the_model():
    images = np.array([[[0], [200]], [[129], [127]]], dtype=np.uint8)[None]  # (1, 2, 2, 1)
    labels = TorchPredictor(Threshold(), META, device="cpu").labels(images)
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, [[[0, 1], [1, 0]]])


def test_a_semantic_predictor_gives_no_detections():
    with pytest.raises(ConfigError, match="semantic model"):
        TorchPredictor(Threshold(), META).detect(torch.zeros(1, 1, 2, 2))


def test_units_run_by_hand_write_masks_dice_and_done_records(small_store):
    run_dir = str(small_store["tmp"] / "run")
    ctx, plan, _, _ = start_run(small_store["store"], small_store["ckpt"], run_dir, batch_size=2, device="cpu")
    assert [u.n_images for u in plan.units] == [3, 3, 1]
    assert read_plan(run_dir) == plan
    check_alignment(plan.units, chunks=mask_chunks(run_dir)[0], counts=mask_chunks(run_dir)[1])
    predictor = load_predictor(small_store["ckpt"], sha256=small_store["sha"], device="cpu")
    assert load_predictor(small_store["ckpt"], sha256=small_store["sha"], device="cpu") is predictor
    records = [segment_unit(ctx, u) for u in plan.units]
    assert all(isinstance(r, UnitRecord) and r.key == ctx.key for r in records)
    assert sum(r.n_evaluated for r in records) == 6  # i2 has no mask
    assert done_records(run_dir, ctx.key) == {r.unit: r for r in records}  # the records round-trip
    assert done_records(run_dir, "another-key") == {}
    reader = open_run(run_dir)
    table = reader.dice_table()
    assert table.num_rows == 12 and set(table["status"].to_pylist()) == {"ok"}
    for image_id in reader.image_ids:
        pred = predictor.labels(reader.image(image_id)[None])[0]
        np.testing.assert_array_equal(reader.mask(image_id), pred)
    assert reader.ground_truth("i2") is None and reader.dice("i2") == []


def test_start_run_refuses_other_runs_and_foreign_directories(small_store, tmp_path):
    first = start_run(small_store["store"], small_store["ckpt"], str(tmp_path / "r"))[0]
    again = start_run(small_store["store"], small_store["ckpt"], str(tmp_path / "r"))[0]
    assert again == first
    other = tmp_path / "other.safetensors"
    save_checkpoint(other, create_model("unet", in_channels=1, num_classes=2, base=4, depth=2), META)
    with pytest.raises(StoreError, match="new --out"):
        start_run(small_store["store"], str(other), str(tmp_path / "r"))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("x")
    with pytest.raises(StoreError, match="not a segflow run directory"):
        start_run(small_store["store"], small_store["ckpt"], str(tmp_path / "foreign"))
    assert json.loads((tmp_path / "r" / "run.json").read_text())["run_id"] == first.run_id


# Every parameter that shapes the outputs, with a value other than the first run's.
OTHER_SETTINGS = {
    "tile_size": {"tile_size": 256},
    "overlap": {"overlap": 16},
    "blend": {"blend": "linear"},
    "tta": {"tta": True},
    "precision": {"precision": "fp32"},
    "tiling off": {"tile_size": 0},
    "compile": {"compile": True},
}


@pytest.mark.parametrize("name", sorted(OTHER_SETTINGS))
def test_another_output_shaping_setting_into_the_same_run_directory_is_refused(small_store, tmp_path, name):
    run_dir = str(tmp_path / "r")
    base = {"device": "auto" if name == "precision" else "cpu"}  # the CPU computes in fp32 whatever is asked
    ctx, plan, _, _ = start_run(small_store["store"], small_store["ckpt"], run_dir, **base)
    segment_unit(ctx.on_worker(), plan.units[0])
    before = {p.name: p.read_bytes() for p in (tmp_path / "r" / "units").iterdir()}
    with pytest.raises(StoreError, match="other settings") as err:
        start_run(small_store["store"], small_store["ckpt"], run_dir, **base, **OTHER_SETTINGS[name])
    changed = {"tile_size": "--tile-size: 512 in the run directory, 256 now", "overlap": "--overlap: 128 in the run "
               "directory, 16 now", "blend": "--blend: 'gaussian' in the run directory, 'linear' now",
               "tta": "--tta (whole images): off in the run directory, on now", "precision": "precision (--precision",
               "tiling off": "--tile-size: 512 in the run directory, off now",
               "compile": "--compile: off in the run directory, on now"}[name]  # named by the options that set them
    assert changed in str(err.value) and "new --out" in str(err.value), str(err.value)
    if name == "tile_size":  # the overlap follows the tile when not given: said so, not named as if asked
        assert "--overlap (not given: derived from the tile size): 128 in the run directory, 64 now" in str(err.value)
    assert {p.name: p.read_bytes() for p in (tmp_path / "r" / "units").iterdir()} == before  # nothing touched
    assert start_run(small_store["store"], small_store["ckpt"], run_dir, **base)[0] == ctx  # same: resumes


def test_on_the_cpu_another_precision_computes_the_same_and_resumes(small_store, tmp_path):
    first = start_run(small_store["store"], small_store["ckpt"], str(tmp_path / "r"), device="cpu")[0]
    again = start_run(small_store["store"], small_store["ckpt"], str(tmp_path / "r"), device="cpu", precision="fp16")[0]
    assert again.key == first.key and again.precision == "fp16"


@pytest.mark.skipif(torch.cuda.is_available(), reason="auto means this machine's CPU only without CUDA")
def test_auto_on_a_machine_without_cuda_is_the_cpu_and_older_run_directories_resume(small_store, tmp_path):
    from segcore.run.start import pending_work

    store, ckpt = small_store["store"], small_store["ckpt"]
    here = start_run(store, ckpt, str(tmp_path / "new"), device="auto", workers_here=True)[0]
    assert read_run_info(str(tmp_path / "new"))["shaping"]["precision"] == "fp32"  # what the CPU computes in
    again = start_run(store, ckpt, str(tmp_path / "new"), device="auto", workers_here=True, precision="fp16")[0]
    assert again.key == here.key
    # written before auto was told apart from the CPU here: bf16 recorded, no key_device; resumed by any precision
    old_dir = str(tmp_path / "old")
    ctx, plan, _, _ = start_run(store, ckpt, old_dir, device="auto")
    info = read_run_info(old_dir)
    assert info["shaping"]["precision"] == "bf16" and info.pop("key_device") == "auto"
    (tmp_path / "old" / "run.json").write_text(json.dumps(info))
    segment_unit(ctx.on_worker(), plan.units[0])
    for precision in ("bf16", "fp16", "fp32"):
        assert start_run(store, ckpt, old_dir, device="auto", workers_here=True, precision=precision)[0].key == ctx.key
        assert pending_work(store, ckpt, old_dir, device="auto", workers_here=True,
                            precision=precision) == len(plan.units) - 1
    with pytest.raises(StoreError, match="precision"):  # asked for the CPU by name: not a run of auto
        start_run(store, ckpt, old_dir, device="cpu")
    # a run directory of this version computed its bf16 key for a device elsewhere (auto, remote workers): kept
    remote = str(tmp_path / "remote")
    start_run(store, ckpt, remote, device="auto")
    with pytest.raises(StoreError, match="precision"):
        start_run(store, ckpt, remote, device="auto", workers_here=True)


def test_pending_work_counts_what_remains_with_these_settings(small_store, tmp_path):
    from segcore.run.start import pending_work

    run_dir = str(tmp_path / "r")
    assert pending_work(small_store["store"], small_store["ckpt"], run_dir, device="cpu") is None  # no run yet
    ctx, plan, _, _ = start_run(small_store["store"], small_store["ckpt"], run_dir, device="cpu")
    segment_unit(ctx, plan.units[0])
    assert pending_work(small_store["store"], small_store["ckpt"], run_dir, device="cpu") == len(plan.units) - 1
    assert pending_work(small_store["store"], small_store["ckpt"], run_dir, device="cpu", tile_size=256) is None


@pytest.mark.parametrize("change", ["normalisation", "score threshold"])
def test_a_checkpoint_with_other_normalisation_or_score_threshold_is_refused(tmp_path, change):
    # Both live in the checkpoint's metadata: the same weights saved with another value are another
    # checkpoint (sha256), refused in the same run directory.
    from segcore.collection.imageio import write_png as png

    png(tmp_path / "img" / "a.png", np.zeros((32, 32), np.uint8))
    rows = probe_sources(pair_sources(str(tmp_path / "img"), None))
    groups, planned = plan_groups(rows, chunk_pixels=10_000, max_chunk_images=64)
    store = str(tmp_path / "s.zarr")
    create_store(store, groups, with_gt=False, mask_kind="class", spec={})
    write_manifest(store, [r for c in chunk_rows(planned, groups) for r in write_store_chunk(store, c)])
    if change == "normalisation":
        model, meta = create_model("unet", in_channels=1, num_classes=2, base=4, depth=2), META
        other = meta.model_copy(update={"normalisation": Normalisation(mode="range", scale=4095.0)})
    else:
        kwargs = {"score_threshold": 0.7}
        model = create_model("maskrcnn_r18", in_channels=1, num_classes=2, **kwargs)
        meta = ModelMeta(arch="maskrcnn_r18", arch_kwargs=kwargs, class_names=("bg", "obj"), in_channels=1)
        other = meta.model_copy(update={"arch_kwargs": {**kwargs, "score_threshold": 0.5}})
    save_checkpoint(tmp_path / "a.safetensors", model, meta)
    save_checkpoint(tmp_path / "b.safetensors", model, other)
    start_run(store, str(tmp_path / "a.safetensors"), str(tmp_path / "r"), device="cpu")
    with pytest.raises(StoreError, match="checkpoint sha256"):
        start_run(store, str(tmp_path / "b.safetensors"), str(tmp_path / "r"), device="cpu")


def test_labels_beyond_the_model_classes_are_error_rows(small_store, tmp_path):
    # A 3-valued class mask evaluated with a 2-class model: that image becomes error rows.
    write_png(tmp_path / "img" / "x.png", np.zeros((16, 16), np.uint8))
    write_png(tmp_path / "gt" / "x.png", np.full((16, 16), 2, np.uint8))
    rows = probe_sources(pair_sources(str(tmp_path / "img"), str(tmp_path / "gt")))
    groups, planned = plan_groups(rows, chunk_pixels=10_000, max_chunk_images=64)
    store = str(tmp_path / "x.zarr")
    create_store(store, groups, with_gt=True, mask_kind="class", spec={})
    write_manifest(store, [r for c in chunk_rows(planned, groups) for r in write_store_chunk(store, c)])
    ctx, plan, _, _ = start_run(store, small_store["ckpt"], str(tmp_path / "run"), device="cpu")
    (unit,) = plan.units
    rec = segment_unit(ctx, unit)
    assert rec.n_errors == 1
    rows = [r for r in open_run(tmp_path / "run").dice("x")]
    assert len(rows) == 2 and all(r["status"] == "error" and "label 2" in r["error"] for r in rows)


def test_a_run_is_refused_before_any_work_when_no_labelled_image_fits_the_model(small_store, tmp_path, caplog):
    # Ingest counts the images by their mask's largest label; a model that has none of the classes
    # of any image is the wrong model (or --mask-kind): refused before the run is recorded.
    write_png(tmp_path / "one" / "img" / "x.png", np.zeros((16, 16), np.uint8))
    write_png(tmp_path / "one" / "gt" / "x.png", np.full((16, 16), 2, np.uint8))
    rows = probe_sources(pair_sources(str(tmp_path / "one" / "img"), str(tmp_path / "one" / "gt")))
    groups, planned = plan_groups(rows, chunk_pixels=10_000, max_chunk_images=64)
    store = str(tmp_path / "x.zarr")
    create_store(store, groups, with_gt=True, mask_kind="class", spec={})
    written = [r for c in chunk_rows(planned, groups) for r in write_store_chunk(store, c)]
    write_manifest(store, written)
    write_fingerprint(store, fold(written))
    with pytest.raises(CheckpointError, match=r"every labelled image holds a label the model lacks \(labels up to 2; "
                                              r"the model has 2 classes \(bg, fg\)\)"):
        start_run(store, small_store["ckpt"], str(tmp_path / "run"), device="cpu")
    assert not (tmp_path / "run").exists()
    # One image that fits: the run goes ahead, saying how many will be error rows.
    write_fingerprint(store, fold(written + [dict(written[0], mask_max=1)]))
    with caplog.at_level(logging.WARNING, logger="segcore.run.start"):
        start_run(store, small_store["ckpt"], str(tmp_path / "run"), device="cpu")
    assert "1 of 2 labelled image(s) hold labels the model lacks (up to 2; the model has 2 classes" in caplog.text


def test_mask_label_check_of_a_fingerprint():
    meta = ModelMeta(arch="unet", class_names=("bg", "a", "b"), in_channels=1)
    assert check_mask_labels(meta, None) is None  # a store ingested before labels were counted
    assert check_mask_labels(meta, {"images": 3}) is None
    assert check_mask_labels(meta, {"mask_maxima": {}}) is None
    assert check_mask_labels(meta, {"mask_maxima": {"0": 4, "2": 7}}) is None
    assert check_mask_labels(meta, {"mask_maxima": {"0": 4, "3": 1, "255": 2}}).startswith(
        "3 of 7 labelled image(s) hold labels the model lacks (up to 255; the model has 3 classes (bg, a, b))")
    with pytest.raises(CheckpointError, match="labels up to 5"):
        check_mask_labels(meta, {"mask_maxima": {"3": 1, "5": 2}})


def _as_format_1(run_dir: Path) -> None:
    """Rewrite a run directory as segflow wrote it before run plans and keys (run.json format 1)."""
    info = json.loads((run_dir / "run.json").read_text())
    for k in ("key", "shaping"):
        info.pop(k)
    info["format"] = 1
    info["spec"] = {"tile_size": None, "overlap": None, "blend": "gaussian", "tta": False, "precision": "bf16"}
    (run_dir / "run.json").write_text(json.dumps(info))
    (run_dir / "plan.json").unlink()
    for marker in (run_dir / "units").glob("*.json"):
        rec = json.loads(marker.read_text())
        old = {k: v for k, v in rec.items() if k not in ("type", "key", "timing")} | rec["timing"]
        marker.write_text(json.dumps(old))


def test_a_run_directory_of_an_earlier_segflow_is_read_and_resumed_without_redoing_units(small_store, tmp_path):
    run_dir = tmp_path / "r"
    ctx, plan, _, _ = start_run(small_store["store"], small_store["ckpt"], str(run_dir), device="cpu")
    for u in plan.units[:2]:
        segment_unit(ctx, u)
    rows = open_run(run_dir).dice_table().num_rows
    _as_format_1(run_dir)
    assert open_run(run_dir).dice_table().num_rows == rows and open_run(run_dir).dice("i0")  # readable as it is
    with pytest.raises(StoreError, match="tile_size: None in the run directory, 0 now"):
        start_run(small_store["store"], small_store["ckpt"], str(run_dir), device="cpu", tile_size=0)
    ctx2, plan2, _, _ = start_run(small_store["store"], small_store["ckpt"], str(run_dir), device="cpu")
    assert ctx2.run_id == ctx.run_id and read_plan(str(run_dir)) == plan2 == plan
    assert set(done_records(str(run_dir), ctx2.key)) == {u.name for u in plan.units[:2]}  # kept, not redone
    assert json.loads((run_dir / "run.json").read_text())["format"] == 2


def test_tta_acts_on_whole_images_and_is_part_of_the_run_key(small_store, tmp_path):
    import zarr

    from segcore.run.rundir import label_arrays, masks_path

    # A random UNet whose head is biased so that about half the pixels are each class: its labels
    # then depend on the orientation, and TTA must change some.
    root = zarr.open_group(small_store["store"], mode="r")
    images = np.concatenate([root["images"][g][:] for g in sorted(root["images"].array_keys())])
    torch.manual_seed(1)
    model = create_model("unet", in_channels=1, num_classes=2, base=4, depth=2).eval()
    with torch.inference_mode():
        margin = TorchPredictor(model, META, device="cpu").logits(TorchPredictor(model, META).prepare(images))
        model.head.bias[1] -= float((margin[:, 1] - margin[:, 0]).median())
    ckpt = str(save_checkpoint(tmp_path / "balanced.safetensors", model, META))

    def masks(run_dir: str, tta: bool) -> np.ndarray:
        ctx, plan, _, _ = start_run(small_store["store"], ckpt, run_dir, device="cpu", tta=tta)
        assert not plan.tiled_images  # 16x16 images: whole-image units only
        for unit in plan.units:
            segment_unit(ctx.on_worker(), unit)
        return np.concatenate([a[:] for a in label_arrays(masks_path(run_dir)).values()]), ctx

    plain, plain_ctx = masks(str(tmp_path / "plain"), False)
    flipped, tta_ctx = masks(str(tmp_path / "tta"), True)
    assert tta_ctx.key != plain_ctx.key
    # By hand: the mean of the logits of the image and its three flips, flipped back.
    predictor = load_predictor(ckpt, device="cpu", sha256=file_sha256(ckpt))
    with torch.inference_mode():
        x = predictor.prepare(images)
        total = predictor.logits(x)
        for dims in ((-1,), (-2,), (-2, -1)):
            total = total + predictor.logits(x.flip(dims)).flip(dims)
    np.testing.assert_array_equal(flipped, total.argmax(1).numpy())
    assert (flipped != plain).any()  # the random UNet is not flip-symmetric: TTA changed some pixels


def test_tta_of_an_instance_model_is_refused_even_without_tiling(small_store, tmp_path):
    kwargs = {"score_threshold": 0.7}
    meta = ModelMeta(arch="maskrcnn_r18", arch_kwargs=kwargs, class_names=("bg", "obj"), in_channels=1)
    ckpt = save_checkpoint(tmp_path / "mrcnn.safetensors",
                           create_model("maskrcnn_r18", in_channels=1, num_classes=2, **kwargs), meta)
    with pytest.raises(ConfigError, match="semantic models only"):
        start_run(small_store["store"], str(ckpt), str(tmp_path / "r"), device="cpu", tta=True, tile_size=0)


@pytest.mark.parametrize("norm, match", [
    (Normalisation(mode="zscore"), "'zscore' normalisation has no fitted values"),
    (Normalisation(mode="ct", mean=(50.0,), std=(20.0,)), "'ct' normalisation has no fitted values"),
    (Normalisation(mode="zscore", mean=(1.0, 2.0), std=(1.0, 1.0)), "2 mean value.*takes 1 channel"),
    (Normalisation(mode="ct", mean=(1.0,), std=(1.0,), clip_low=(0.0, 0.0), clip_high=(9.0, 9.0)),
     "2 clip_low value.*takes 1 channel"),
])
def test_a_model_whose_normalisation_cannot_be_applied_is_refused_before_any_work(small_store, tmp_path, norm,
                                                                                  match):
    """A record made through the Python API without fitting its normalisation would turn every image
    into an error row: it is refused up front, and no run directory is made."""
    ckpt = save_checkpoint(tmp_path / "unfit.safetensors", create_model("unet", in_channels=1, num_classes=2, base=4,
                                                                        depth=2), META.model_copy(update={"normalisation": norm}))
    with pytest.raises(CheckpointError, match=match):
        start_run(small_store["store"], str(ckpt), str(tmp_path / "run"), device="cpu")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("arch", ["unet", "maskrcnn_r18"])
def test_versions_that_newer_content_replaced_get_no_forward_pass_no_rows_and_a_blank_mask(small_store, tmp_path,
                                                                                           arch):
    """A run that reaches image versions already superseded (a new checkpoint's run directory over an
    incremental store) segments only the current ones: a unit partly superseded runs on the rest,
    one wholly superseded runs no model at all."""
    from segcore.collection.incremental import append_groups
    from segcore.collection.store import open_store, read_manifest
    from segcore.run.units import current_slots

    store, rows = small_store["store"], read_manifest(small_store["store"]).to_pylist()
    old = {"i1", "i6"}  # i6 is alone in the last unit
    rng = np.random.default_rng(9)  # their new content, ingested as batch 1 into a group of its own
    for name in sorted(old):
        img = rng.integers(0, 256, (16, 16), dtype=np.uint8)
        write_png(tmp_path / "v1" / "img" / f"{name}.png", img)
        write_png(tmp_path / "v1" / "gt" / f"{name}.png", (img > 60).astype(np.uint8))
    probed = probe_sources(pair_sources(str(tmp_path / "v1" / "img"), str(tmp_path / "v1" / "gt")))
    groups, planned = plan_groups([dict(r, batch=1) for r in probed], chunk_pixels=3 * 256, max_chunk_images=64,
                                  first_group=len(open_store(store).groups))
    append_groups(store, groups)
    new = {r["image_id"]: r for c in chunk_rows(planned, groups) for r in write_store_chunk(store, c, threads=1)}
    write_manifest(store, [dict(r, superseded_by=new[r["image_id"]]["sha256"] if r["image_id"] in old else None)
                           for r in rows] + list(new.values()))
    if arch == "unet":
        ckpt = small_store["ckpt"]
    else:
        kwargs = {"score_threshold": 0.0}
        meta = ModelMeta(arch=arch, arch_kwargs=kwargs, class_names=("bg", "obj"), in_channels=1,
                         normalisation=Normalisation(mode="range", scale=255.0))
        torch.manual_seed(0)
        ckpt = str(save_checkpoint(tmp_path / "mrcnn.safetensors",
                                   create_model(arch, in_channels=1, num_classes=2, **kwargs), meta))
    run_dir = str(tmp_path / "run")
    ctx, plan, _, _ = start_run(small_store["store"], ckpt, run_dir, batch_size=2, device="cpu", tile_size=0)
    predictor = load_predictor(ckpt, sha256=file_sha256(ckpt), device="cpu")
    records = [segment_unit(ctx, u) for u in plan.units]
    assert [r.n_superseded for r in records] == [1, 0, 1, 0] and [r.n_images for r in records] == [3, 3, 1, 2]
    reader = open_run(run_dir)
    import pyarrow.parquet as pq

    dice = pq.read_table(Path(run_dir) / "dice")  # every row written, not only those the reader calls current
    old_units = {u.name for u in plan.units[:3]}
    assert sorted({i for i, u in zip(dice["image_id"].to_pylist(), dice["unit"].to_pylist()) if u in old_units}) == [
        "i0", "i3", "i4", "i5"]  # i2 has no mask; i1 and i6 are scored in their new version's unit only
    for image_id in ("i0", "i1", "i3", "i6"):  # each row's counts are those of the mask written
        pred, gt = reader.mask(image_id), reader.ground_truth(image_id)
        assert [r["tp"] for r in reader.dice(image_id)] == [int(((pred == c) & (gt == c)).sum()) for c in (0, 1)]
    if arch != "unet":
        found = pq.read_table(Path(run_dir) / "instances").select(["image_id", "unit"]).to_pylist()
        assert not [r for r in found if r["image_id"] in old and r["unit"] in old_units]
    import zarr

    masks = zarr.open_group(str(Path(run_dir) / "masks.zarr"), mode="r")
    for r in rows + list(new.values()):
        got = masks[f"{r['group']}/0"][r["index"]]
        if r["image_id"] in old and r["batch"] != 1:
            assert not got.any()
        else:  # the reader serves each image's current version
            image = reader.image(r["image_id"])[None]
            want = (predictor.labels(image)[0] if arch == "unet"
                    else predictor.instances(image, batch_size=1)[0].classes)
            np.testing.assert_array_equal(got, want)
    # the slabs of a volume are segmented together: kept whole unless every one is left out
    two = [{"image_id": "a", "superseded_by": None}, {"image_id": "b", "superseded_by": "x"}]
    assert current_slots(two, segmented={"a", "b"}, whole=True) == [0, 1]
    assert current_slots([dict(r, superseded_by="x") for r in two], segmented={"a", "b"}, whole=True) == []
    assert current_slots(two, segmented={"a", "b"}) == [0]
    # a newer version this run did not plan (an ingest while it runs): the older one is segmented still
    assert current_slots(two, segmented={"a"}) == [0, 1]


def test_images_whose_detections_reach_the_models_cap_are_counted_and_told(small_store, tmp_path, caplog):
    """torchvision keeps at most box_detections_per_img detections an image: an image that reaches the
    cap may miss objects, which a run must not pass over in silence."""
    kwargs = {"score_threshold": 0.0, "box_detections_per_img": 1}
    meta = ModelMeta(arch="maskrcnn_r18", arch_kwargs=kwargs, class_names=("bg", "obj"), in_channels=1,
                     normalisation=Normalisation(mode="range", scale=255.0))
    torch.manual_seed(0)
    ckpt = str(save_checkpoint(tmp_path / "capped.safetensors",
                               create_model("maskrcnn_r18", in_channels=1, num_classes=2, **kwargs), meta))
    ctx, plan, _, _ = start_run(small_store["store"], ckpt, str(tmp_path / "run"), batch_size=2, device="cpu",
                                tile_size=0)
    with caplog.at_level(logging.WARNING, logger="segcore"):
        records = [segment_unit(ctx, u) for u in plan.units]
    found = open_run(str(tmp_path / "run")).instance_table().column("image_id").to_pylist()
    at_cap = len(set(found))  # a cap of 1: every image with a detection reached it
    assert at_cap > 0 and sum(r.n_capped for r in records) == at_cap
    told = [r.message for r in caplog.records if "reached the model's cap of 1 detections" in r.message]
    assert len(told) == sum(r.n_capped > 0 for r in records) and "box_detections_per_img" in told[0]
