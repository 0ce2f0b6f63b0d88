"""Large images through the same Prefect + Dask path: ingest into spatial chunks, blended semantic
tiles, stitched instances, mixed image sizes in one collection, resume, and tiling switched off."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from flows.pipeline import run_flow, segment_flow, with_runner
from segcore.models.checkpoint import ModelMeta, load_checkpoint, save_checkpoint
from segcore.config import ExecutionSpec, IngestSpec, RunSpec, SegmentSpec
from segcore.collection.imageio import write_png
from segcore.models.predict import TorchPredictor
from segcore.models import create_model
from segcore.normalise import Normalisation, normalise_batch
from segcore.run.results import open_run
from segcore.pyramid import downsample_mode
from segcore.run.rundir import label_array
from segcore.collection.store import open_store
from segcore.synthetic_large import make_large_sample
from segcore.tiling import Window, blend_block, lattice
from tests.ngff_validation import read_levels, validate_labels_group
from tests.flows.conftest import module_cluster

EXECUTION = ExecutionSpec(n_workers=1, threads_per_worker=2)
_cluster = module_cluster(EXECUTION)
LARGE = (300, 420)


def _collection(root: Path, kind: str) -> dict:
    """One large image (300 x 420) and three small ones (48 x 48), with masks."""
    rng = np.random.default_rng(3)
    image, labels = make_large_sample(rng, height=LARGE[0], width=LARGE[1], kind=kind, per_128=3.0)
    write_png(root / "images" / "big.png", image)
    write_png(root / "masks" / "big.png", labels.astype(np.uint16))
    for i in range(3):
        small, small_labels = make_large_sample(rng, height=48, width=48, kind=kind, per_128=8.0)
        write_png(root / "images" / f"small-{i}.png", small)
        write_png(root / "masks" / f"small-{i}.png", small_labels.astype(np.uint16))
    return {"images": str(root / "images"), "masks": str(root / "masks"), "big": image, "labels": labels}


def _ingest(root: Path, data: dict, kind: str) -> IngestSpec:
    return IngestSpec(images=data["images"], masks=data["masks"], store=str(root / "store.zarr"),
                      mask_kind="class" if kind == "semantic" else "instance", chunk_pixels=20_000, tile_chunk=128)


@pytest.fixture(scope="module")
def semantic(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiled")
    data = _collection(root, "semantic")
    torch.manual_seed(0)
    model = create_model("unet", in_channels=1, num_classes=3, base=4, depth=2)
    meta = ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2}, class_names=("background", "disc", "square"),
                     in_channels=1, normalisation=Normalisation(mode="range", scale=255.0))
    ckpt = str(save_checkpoint(root / "unet.safetensors", model, meta))
    spec = RunSpec(ingest=_ingest(root, data, "semantic"),
                   segment=SegmentSpec(store=str(root / "store.zarr"), checkpoint=ckpt, out=str(root / "run"),
                                       tile_size=64, overlap=16, execution=EXECUTION))
    summary = with_runner(run_flow, EXECUTION)(spec)
    return {"root": root, "data": data, "ckpt": ckpt, "spec": spec, "summary": summary}


def test_large_image_is_stored_in_blocks_and_small_ones_batched(semantic) -> None:
    store = open_store(str(semantic["root"] / "store.zarr"))
    tiled = [g for g in store.groups if g.tile]
    small = [g for g in store.groups if not g.tile]
    assert [(g.height, g.width, g.count, g.tile) for g in tiled] == [(*LARGE, 1, 128)]
    assert [(g.height, g.width, g.count) for g in small] == [(48, 48, 3)]
    arr = zarr.open_group(str(semantic["root"] / "store.zarr"), mode="r")[f"images/{tiled[0].name}"]
    assert arr.chunks == (1, 128, 128, 1)
    masks = label_array(str(semantic["root"] / "run" / "masks.zarr"), tiled[0].name)
    assert masks.chunks == (1, 128, 128)  # output chunks = work units
    assert semantic["summary"]["units"] == 3 * 4 + 1


def test_blocks_equal_one_whole_image_sliding_window(semantic) -> None:
    """The pipeline's blocks give the labels of one whole-image Gaussian sliding window."""
    model, meta = load_checkpoint(semantic["ckpt"])
    image = semantic["data"]["big"][..., None]
    h, w = LARGE
    with torch.inference_mode():
        logits = blend_block(model, image, (0, 0), Window(0, h, 0, w), lattice(h, w, 64, 16),
                             to_input=lambda b: normalise_batch(b, meta.normalisation), overlap=16)
    expected = logits.argmax(axis=0)
    got = open_run(str(semantic["root"] / "run")).mask("big")
    assert got.shape == LARGE
    assert (got == expected).mean() > 0.9999


def test_dice_rows_of_the_large_image_match_its_mask(semantic) -> None:
    run = open_run(str(semantic["root"] / "run"))
    dice = run.dice_table().to_pandas()
    assert sorted(dice.image_id.unique()) == ["big", "small-0", "small-1", "small-2"]
    assert not dice.duplicated(["image_id", "class_id"]).any()
    big = dice[dice.image_id == "big"].sort_values("class_id")
    pred, gt = run.mask("big"), semantic["data"]["labels"]
    for _, r in big.iterrows():
        p, g = pred == r.class_id, gt == r.class_id
        assert (r.tp, r.fp, r.fn) == ((p & g).sum(), (p & ~g).sum(), (~p & g).sum())


def _mtimes(folder: Path, pattern: str) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in folder.rglob(pattern) if p.is_file()}


def test_every_label_image_of_the_run_is_valid_ngff_with_its_pyramid(semantic) -> None:
    masks = str(semantic["root"] / "run" / "masks.zarr")
    images = validate_labels_group(masks)  # OME-NGFF 0.5, by ome-zarr-models
    big = next(g.name for g in open_store(str(semantic["root"] / "store.zarr")).groups if g.tile)
    levels = {name: [d.path for d in image.attributes.ome.multiscales[0].datasets] for name, image in images.items()}
    assert levels == {name: (["0", "1"] if name == big else ["0"]) for name in images} and len(images) == 2
    scales = [d.coordinateTransformations[0].scale for d in images[big].attributes.ome.multiscales[0].datasets]
    assert scales == [[1.0, 1.0, 1.0], [1.0, 2.0, 2.0]]
    # read back headless by ome-zarr-py: level 0 is the run's masks, level 1 their mode per 2 x 2 block
    read, meta = read_levels(f"{masks}/{big}")
    np.testing.assert_array_equal(read[0], label_array(masks, big)[:])
    assert [a.shape for a in read] == [(1, *LARGE), (1, LARGE[0] // 2, LARGE[1] // 2)]
    np.testing.assert_array_equal(read[1], downsample_mode(read[0], (1, 2, 2)))
    assert meta["properties"][1] == {"class": "disc"}


def test_rerun_skips_every_block_and_tiling_off_segments_whole(semantic) -> None:
    spec = semantic["spec"].segment
    parts = _mtimes(Path(spec.out, "dice"), "*.parquet")
    masks = _mtimes(Path(spec.out, "masks.zarr"), "*")
    again = with_runner(segment_flow, EXECUTION)(spec)
    assert again["units_skipped"] == again["units"]
    # nothing is evaluated twice: the large image's Dice part (and every other) is left as it was,
    # and so are the masks and their pyramids
    assert _mtimes(Path(spec.out, "dice"), "*.parquet") == parts
    assert _mtimes(Path(spec.out, "masks.zarr"), "*") == masks and any("/1/" in str(p) for p in masks)
    assert any("-" in p.stem and p.stem.startswith("g") for p in parts)
    whole_spec = spec.model_copy(update={"out": str(semantic["root"] / "whole"), "tile_size": 0})
    summary = with_runner(segment_flow, EXECUTION)(whole_spec)
    assert summary["units"] == 2
    model, meta = load_checkpoint(semantic["ckpt"])
    expected = TorchPredictor(model, meta).labels(semantic["data"]["big"][None, ..., None])[0]
    np.testing.assert_array_equal(open_run(whole_spec.out).mask("big"), expected)


def test_instance_model_stitches_blocks(tmp_path: Path) -> None:
    data = _collection(tmp_path, "instance")
    torch.manual_seed(0)
    arch = {"score_threshold": 0.0, "box_detections_per_img": 25,  # dozens of objects per block, not 100,
            "proposals_per_img": 100}  # and a tenth of the proposals (the box head's time halves)
    model = create_model("maskrcnn_r18", in_channels=1, num_classes=2, **arch)
    ckpt = save_checkpoint(tmp_path / "mrcnn.safetensors", model,
                           ModelMeta(arch="maskrcnn_r18", arch_kwargs=arch, class_names=("background", "nucleus"),
                                     in_channels=1, normalisation=Normalisation(mode="percentile")))
    out = str(tmp_path / "run")
    spec = RunSpec(ingest=_ingest(tmp_path, data, "instance"),
                   segment=SegmentSpec(store=str(tmp_path / "store.zarr"), checkpoint=str(ckpt), out=out,
                                       tile_size=64, overlap=24, execution=EXECUTION))
    from tasks.progress import listen

    events = []
    with listen(events.append):
        summary = with_runner(run_flow, EXECUTION)(spec)
    run = open_run(out)
    # the detection pass shows its own progress; a large image counts as segmented with its last block
    detect = [(e.done, e.total) for e in events if e.stage == "detect"]
    from segcore.run.rundir import read_plan

    plan = read_plan(out)
    n_blocks = sum(len(plan.blocks_of(*image)) for image in plan.tiled_images)
    assert detect[0] == (0, n_blocks) and detect[-1] == (n_blocks, n_blocks) and len(detect) == n_blocks + 1
    segment = [e for e in events if e.stage == "segment"]
    n_images = sum(g.count for g in open_store(str(tmp_path / "store.zarr")).groups)
    assert segment[-1].done == segment[-1].total and segment[-1].message.startswith(f"{n_images} images, "), segment
    inst = run.instance_table().to_pandas()
    assert summary["instance"]["instances_predicted"] == len(inst)
    labels = run.instances("big")
    rows = inst[inst.image_id == "big"]
    assert len(rows) > 0 and not rows.instance_id.duplicated().any()
    assert sorted(rows.instance_id) == sorted(set(np.unique(labels).tolist()) - {0})
    for _, r in rows.iterrows():
        x0, y0, x1, y1 = r.bbox
        own = labels == r.instance_id
        assert own.sum() == r.area and own[y0:y1, x0:x1].sum() == r.area
    np.testing.assert_array_equal(run.mask("big"), (labels > 0).astype(np.uint8))
    seams = run.seam_table().to_pandas()
    assert list(seams.image_id) == ["big"] and seams.blocks.iloc[0] == 12
    assert seams.objects.iloc[0] == len(rows)
    metrics = run.instance_metrics_table().to_pandas()
    assert sorted(metrics.image_id) == ["big", "small-0", "small-1", "small-2"]
    for location in (f"{out}/masks.zarr", f"{out}/instances.zarr"):  # OME-NGFF 0.5, by ome-zarr-models
        images = validate_labels_group(location)
        assert sorted(len(i.attributes.ome.multiscales[0].datasets) for i in images.values()) == [1, 2]
    # a block pasted again (its done-record lost) rewrites the pyramid of its image's group
    (Path(out) / "units" / "unit-00012.json").unlink()
    (big,) = {r["group"] for r in run.manifest.to_pylist() if r["image_id"] == "big"}
    Path(out, "instances.zarr", big, "1", "c", "0", "0", "0").write_bytes(b"stale")
    with_runner(segment_flow, EXECUTION)(spec.segment)
    np.testing.assert_array_equal(open_run(out).instances("big"), labels)
    read, _ = read_levels(f"{out}/instances.zarr/{big}")
    np.testing.assert_array_equal(read[1], downsample_mode(labels[None], (1, 2, 2)))
    # a lost block's objects are not needed once its image is finished: nothing is redone
    lost = Path(out) / "blocks" / "unit-00005.npz"
    lost.unlink()
    with_runner(segment_flow, EXECUTION)(spec.segment)
    assert not lost.exists()
    np.testing.assert_array_equal(open_run(out).instances("big"), labels)
    # while the image still needs them (here: to be finished again), that block is detected again,
    # every block of its image pasted again, and the image finished
    (image_record,) = Path(out, "units").glob(f"image-{big}-*.json")
    image_record.unlink()
    with_runner(segment_flow, EXECUTION)(spec.segment)
    assert lost.exists() and image_record.exists()
    np.testing.assert_array_equal(open_run(out).instances("big"), labels)
    # a finished image with one block's objects gone and another block's detection record lost: that
    # block is detected again, so every block of the image is pasted again, and the gone objects are
    # needed after all: they are detected again too
    lost.unlink()
    (Path(out) / "units" / "unit-00006.detect.json").unlink()
    with_runner(segment_flow, EXECUTION)(spec.segment)
    assert lost.exists() and (Path(out) / "units" / "unit-00006.detect.json").exists()
    np.testing.assert_array_equal(open_run(out).instances("big"), labels)
    again = open_run(out).instance_table().to_pandas()
    again = again[again.image_id == "big"].sort_values("instance_id")
    assert again.instance_id.tolist() == sorted(rows.instance_id) and again.area.tolist() == \
        rows.sort_values("instance_id").area.tolist()


def test_an_older_version_of_a_large_image_runs_no_block_in_a_new_checkpoints_run(tmp_path: Path) -> None:
    """A large image changed in place is segmented again; a retrained checkpoint's run directory then
    segments the new version only: the old one's blocks run no model and it gets no rows."""
    from segcore.run.context import BlockRecord, ImageRecord
    from segcore.run.rundir import done_records, read_run_info
    from segcore.collection.store import read_manifest

    data = _collection(tmp_path, "semantic")
    torch.manual_seed(0)
    meta = ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2}, class_names=("background", "disc", "square"),
                     in_channels=1, normalisation=Normalisation(mode="range", scale=255.0))
    first = str(save_checkpoint(tmp_path / "a.safetensors", create_model("unet", in_channels=1, num_classes=3,
                                                                         base=4, depth=2), meta))
    ingest = _ingest(tmp_path, data, "semantic").model_copy(update={"incremental": True})
    spec = RunSpec(ingest=ingest, segment=SegmentSpec(store=ingest.store, checkpoint=first, out=str(tmp_path / "run"),
                                                      tile_size=64, overlap=16, execution=EXECUTION))
    flow = with_runner(run_flow, EXECUTION)
    flow(spec)
    write_png(Path(data["images"]) / "big.png", 255 - data["big"])  # changed in place: a new version
    changed = flow(spec)
    assert changed["ingest"]["superseded"] == 1
    versions = [r for r in read_manifest(ingest.store).to_pylist() if r["image_id"] == "big"]
    old, new = sorted(versions, key=lambda r: r["batch"])
    assert old["superseded_by"] == new["sha256"] and old["group"] != new["group"]
    torch.manual_seed(1)
    second = str(save_checkpoint(tmp_path / "b.safetensors", create_model("unet", in_channels=1, num_classes=3,
                                                                          base=4, depth=2), meta))
    again = flow(spec.model_copy(update={"segment": spec.segment.model_copy(update={"checkpoint": second})}))
    assert again["run_dir"] != changed["run_dir"] and again["images_evaluated"] == 4
    records = done_records(again["run_dir"], read_run_info(again["run_dir"])["key"])
    images = {(r.group, r.index): r for r in records.values() if isinstance(r, ImageRecord)}
    assert images[(old["group"], old["index"])].superseded and images[(old["group"], old["index"])].dice_rows == 0
    assert not images[(new["group"], new["index"])].superseded
    blocks = [r for r in records.values() if isinstance(r, BlockRecord)]
    assert {r.tiles == 0 for r in blocks if r.group == old["group"]} == {True}  # no forward pass
    assert all(r.tiles > 0 for r in blocks if r.group == new["group"])
    import pyarrow.parquet as pq

    rows = pq.read_table(Path(again["run_dir"], "dice")).to_pandas()
    assert sorted(rows[rows.image_id == "big"].unit.unique()) == [f"{new['group']}-{new['index']:06d}"]
    masks = zarr.open_group(str(Path(again["run_dir"], "masks.zarr")), mode="r")
    assert not masks[f"{old['group']}/0"][old["index"]].any()
    model, _ = load_checkpoint(second)
    expected = TorchPredictor(model, meta).labels((255 - data["big"])[None, ..., None])[0]
    assert (open_run(again["run_dir"]).mask("big") == expected).mean() > 0.99  # blended tiles, not one pass
    # run again: nothing left to do, the old version included
    assert with_runner(segment_flow, EXECUTION)(spec.segment.model_copy(
        update={"checkpoint": second, "out": again["run_dir"]}))["units_skipped"] == len(records) - len(images)
