"""Volumes through the pipeline: NIfTI and TIFF z-stacks ingested slab by slab, segmented slice by
slice, scored per volume (3-D Dice, IoU, HD95, ASSD) and exported as NIfTI labels that overlay
their source exactly; 2-D slices grouped into volumes by a pattern."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
import torch
import zarr
from prefect.settings import PREFECT_API_URL

from flows import execution
from flows.artifacts import artifact_key
from flows.cli import main
from flows.pipeline import ingest_flow, run_flow, segment_flow, with_runner
from segcore.collection.imageio import write_png
from segcore.collection.store import read_manifest
from segcore.config import ExecutionSpec, IngestSpec, RunSpec, SegmentSpec
from segcore.metrics.dice import dice_from_counts
from segcore.models import create_model
from segcore.errors import SegflowError, StoreError
from segcore.models.checkpoint import ModelMeta, read_meta, save_checkpoint
from segcore.normalise import Normalisation
from segcore.run.results import open_run
from segcore.run.volumes import read_volume_table
from segcore.synthetic_volumes import generate_volume_collection
from segcore.training.from_store import labelled_volumes
from tests.ngff_validation import read_levels, validate_labels_group
from tests.flows.conftest import module_cluster

nib = pytest.importorskip("nibabel")

SLAB = Path(__file__).resolve().parents[1] / "data" / "ct-liver-slab"
ONE_WORKER = ExecutionSpec(n_workers=1, threads_per_worker=1)
_cluster = module_cluster(ONE_WORKER)
#: A CT-like affine: anisotropic voxels, an origin away from 0 and a flipped axis.
AFFINE = np.array([[-0.78125, 0, 0, 120.5], [0, 0.78125, 0, -99.25], [0, 0, 2.5, -310.0], [0, 0, 0, 1]])


def _stack_ct(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """The real CT slices stacked into ``folder/{images,masks}/ct.nii.gz``; returns the ``(D, H, W)``
    HU voxels and labels."""
    hu = np.stack([tifffile.imread(p) for p in sorted((SLAB / "images").glob("*.tif"))])
    labels = np.stack([tifffile.imread(p) for p in sorted((SLAB / "masks").glob("*.tif"))])
    for sub, data in (("images", hu), ("masks", labels)):
        (folder / sub).mkdir(parents=True)
        img = nib.Nifti1Image(np.moveaxis(data, 0, -1), AFFINE)
        img.header.set_xyzt_units("mm")
        nib.save(img, str(folder / sub / "ct.nii.gz"))
    return hu, labels


def test_real_ct_volume_ingest_train_segment_score_and_export(tmp_path, capsys):
    hu, labels = _stack_ct(tmp_path)
    store, ckpt, run_dir = tmp_path / "ct.zarr", tmp_path / "ct.safetensors", tmp_path / "run"
    assert main(["ingest", "--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"),
                 "--store", str(store)]) == 0
    rows = read_manifest(str(store)).to_pylist()
    assert [r["image_id"] for r in rows] == [f"ct/z{k:04d}" for k in range(16)]
    assert {r["volume_id"] for r in rows} == {"ct"} and [r["slice"] for r in rows] == list(range(16))
    assert (rows[0]["spacing_z"], rows[0]["spacing_y"], rows[0]["spacing_x"]) == (2.5, 0.78125, 0.78125)
    assert rows[0]["spacing_unit"] == "millimeter" and np.allclose(json.loads(rows[0]["affine"]), AFFINE)
    root = zarr.open_group(str(store), mode="r")
    np.testing.assert_array_equal(root[f"images/{rows[0]['group']}"][:][..., 0], hu)
    np.testing.assert_array_equal(root[f"gt/{rows[0]['group']}"][:], labels)

    assert main(["train", "--store", str(store), "--out", str(ckpt), "--epochs", "1", "--base", "4", "--depth", "2",
                 "--class-names", "background,liver,tumour", "--val-fraction", "0.25"]) == 0
    assert main(["segment", "--store", str(store), "--checkpoint", str(ckpt), "--out", str(run_dir),
                 "--workers", "1", "--threads-per-worker", "1"]) == 0
    assert "Volumes evaluated: 1" in (run_dir / "summary.md").read_text()

    # Per-volume 3-D metrics: one row per class, counts and Dice equal to the per-slice Dice rows summed.
    volumes = read_volume_table(str(run_dir)).to_pylist()
    assert [(v["volume_id"], v["class_id"], v["slices"], v["status"]) for v in volumes] == [
        ("ct", c, 16, "ok") for c in range(3)]
    dice = open_run(str(run_dir)).dice_table().to_pylist()
    for v in volumes:
        per_slice = [d for d in dice if d["class_id"] == v["class_id"]]
        assert len(per_slice) == 16
        tp, fp, fn = (sum(d[k] for d in per_slice) for k in ("tp", "fp", "fn"))
        assert (v["tp"], v["fp"], v["fn"]) == (tp, fp, fn)
        assert v["dice"] == pytest.approx(float(dice_from_counts(np.array([tp]), np.array([fp]), np.array([fn]))[0][0]),
                                          abs=1e-12)
        assert v["spacing_unit"] == "millimeter" and v["spacing_z"] == 2.5
    background = volumes[0]
    assert background["surface_status"] == "skipped" and np.isnan(background["hd95"])

    # The masks are an OME-NGFF 0.5 label image of the volume: axes z, y, x in millimetres, scale = spacing,
    # valid for the validator, read back headless with the same labels at full resolution.
    group = rows[0]["group"]
    images = validate_labels_group(str(run_dir / "masks.zarr"))
    axes = [(a.name, a.type, a.unit) for a in images[group].attributes.ome.multiscales[0].axes]
    assert axes == [("z", "space", "millimeter"), ("y", "space", "millimeter"), ("x", "space", "millimeter")]
    levels, meta = read_levels(str(run_dir / "masks.zarr" / group))
    assert meta["coordinateTransformations"][0] == [{"type": "scale", "scale": [2.5, 0.78125, 0.78125]}]
    np.testing.assert_array_equal(levels[0], open_run(str(run_dir)).masks_of([f"ct/z{k:04d}" for k in range(16)]))

    # Export: the labels overlay the source exactly (shape, affine, header units) and equal the run's masks.
    capsys.readouterr()
    assert main(["export", str(run_dir), "--format", "nifti", "--out", str(tmp_path / "nifti")]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("ct: ") and "(affine from the source header, units mm)" in printed
    # a pattern given for a run of ingested volumes only groups no 2-D image: refused, nothing written
    assert main(["export", str(run_dir), "--out", str(tmp_path / "none"), "--volume-pattern", "^(ct)"]) == 2
    assert "groups none of the run's 2-D images (it has 0)" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()
    source, exported = nib.load(str(tmp_path / "images" / "ct.nii.gz")), nib.load(str(tmp_path / "nifti" / "ct.nii.gz"))
    assert exported.shape == source.shape == (128, 128, 16)
    np.testing.assert_array_equal(exported.affine, source.affine)
    assert exported.header.get_xyzt_units()[0] == "mm" and exported.get_data_dtype() == np.uint8
    run = open_run(str(run_dir))
    masks = np.stack([run.mask(f"ct/z{k:04d}") for k in range(16)])
    np.testing.assert_array_equal(np.asarray(exported.dataobj), np.moveaxis(masks, 0, -1))
    # files in --out are replaced only with --overwrite; an ingested file (--out at the masks) never
    before = (tmp_path / "masks" / "ct.nii.gz").read_bytes()
    assert main(["export", str(run_dir), "--out", str(tmp_path / "nifti")]) == 2
    assert "1 of the 1 file(s) to export exist" in capsys.readouterr().err
    assert main(["export", str(run_dir), "--out", str(tmp_path / "nifti"), "--overwrite"]) == 0
    assert main(["export", str(run_dir), "--out", str(tmp_path / "masks"), "--overwrite"]) == 2
    assert "is an ingested mask file of the run's store" in capsys.readouterr().err
    assert (tmp_path / "masks" / "ct.nii.gz").read_bytes() == before
    assert main(["export", str(run_dir)]) == 0 and main(["export", str(run_dir)]) == 0  # its own folder: replaced


def test_an_unreadable_volume_and_one_with_labels_the_model_lacks_are_error_rows_not_scores(tmp_path, caplog):
    """A volume whose file could not be read has no prediction: no volume score, no export, no mask from
    the reader. One whose ground truth holds a label the model lacks is an error row, as its slices'
    rows are, not a score over made-up classes."""
    import gzip
    import logging

    from segcore.errors import NotFound
    from segcore.run.export import export_nifti

    rng = np.random.default_rng(4)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("good", "lab5", "trunc"):
        vol = rng.integers(0, 255, (24, 20, 4)).astype(np.int16)
        labels = (vol > 128).astype(np.uint8) * (5 if name == "lab5" else 1)
        nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "images" / f"{name}.nii.gz"))
        nib.save(nib.Nifti1Image(labels, np.eye(4)), str(tmp_path / "masks" / f"{name}.nii.gz"))
    whole = gzip.decompress((tmp_path / "images" / "trunc.nii.gz").read_bytes())  # header kept, voxels cut
    (tmp_path / "images" / "trunc.nii.gz").write_bytes(gzip.compress(whole[:len(whole) // 2]))
    store, run_dir = str(tmp_path / "s.zarr"), str(tmp_path / "run")
    assert main(["ingest", "--images", str(tmp_path / "images"), "--masks", str(tmp_path / "masks"),
                 "--store", store]) == 0
    torch.manual_seed(0)
    meta = ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2}, class_names=("bg", "a", "b"), in_channels=1,
                     normalisation=Normalisation(mode="range", scale=255.0))
    ckpt = str(save_checkpoint(tmp_path / "m.safetensors", create_model("unet", in_channels=1, num_classes=3, base=4,
                                                                        depth=2), meta))
    with_runner(segment_flow, ONE_WORKER)(SegmentSpec(store=store, checkpoint=ckpt, out=run_dir, execution=ONE_WORKER))
    rows = {r["volume_id"]: r for r in read_volume_table(run_dir).to_pylist()}
    assert rows["good"]["status"] == "ok"
    assert rows["lab5"]["status"] == "error" and "holds label 5 but the model has 3 classes" in rows["lab5"]["error"]
    assert rows["trunc"]["status"] == "error" and "could not be read at ingest" in rows["trunc"]["error"]
    assert {r["class_name"] for r in read_volume_table(run_dir).to_pylist()} <= {"bg", "a", "b", None}
    run = open_run(run_dir)
    with pytest.raises(NotFound, match="was not segmented: its file could not be read"):
        run.mask("trunc/z0000")
    with caplog.at_level(logging.WARNING, logger="segcore"):
        written = export_nifti(run_dir, tmp_path / "out")
    assert sorted(w.volume_id for w in written) == ["good", "lab5"] and not (tmp_path / "out" / "trunc.nii.gz").exists()
    assert any(r.message.startswith("trunc: not exported, its file could not be read") for r in caplog.records)


def test_volumes_mixed_with_images_slabs_errors_and_reuse(tmp_path, caplog):
    rng = np.random.default_rng(0)
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    zyx = rng.integers(0, 4000, (10, 24, 20)).astype(np.uint16)
    tifffile.imwrite(images / "stack.ome.tif", zyx, metadata={"axes": "ZYX", "PhysicalSizeZ": 2.0})
    tifffile.imwrite(masks / "stack.ome.tif", (zyx > 2000).astype(np.uint8), metadata={"axes": "ZYX"})
    nib.save(nib.Nifti1Image(np.zeros((24, 20, 5), np.int16), np.eye(4)), str(images / "short.nii.gz"))
    nib.save(nib.Nifti1Image(np.zeros((24, 20, 4), np.uint8), np.eye(4)), str(masks / "short.nii.gz"))  # 4 != 5
    (images / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    write_png(images / "flat.png", rng.integers(0, 255, (24, 20)).astype(np.uint8))
    store = str(tmp_path / "s.zarr")
    spec = IngestSpec(images=str(images), masks=str(masks), store=store, chunk_pixels=24 * 20 * 4)
    result = with_runner(ingest_flow, ONE_WORKER)(spec)
    assert (result["files"], result["errors"], result["images"]) == (4, 1, 1 + 10 + 5)
    rows = {r["image_id"]: r for r in read_manifest(store).to_pylist()}
    assert rows["broken"]["status"] == "error" and "broken.nii.gz" in rows["broken"]["error"]
    assert rows["flat"]["volume_id"] is None and rows["flat"]["group"] == "g000"
    assert all(rows[f"short/z{k:04d}"]["mask_status"] == "error" for k in range(5))
    assert "differs from volume shape" in rows["short/z0000"]["mask_error"]
    from segcore.collection.ingest import unusable_masks_note

    note = unusable_masks_note(store)  # what the ingest warns: the volume's mask once, with its reason
    assert note.startswith("1 mask(s) could not be used, so their images have no ground truth: short.nii.gz (")
    assert "differs from volume shape" in note
    import logging

    with caplog.at_level(logging.WARNING, logger="segcore"):  # training leaves it out, and says so
        assert labelled_volumes(store)[2] == ["stack.ome"]
    assert "1 volume(s) left out of training, their mask could not be used: short (StoreError: mask shape" in caplog.text
    stack = [rows[f"stack.ome/z{k:04d}"] for k in range(10)]
    assert [r["index"] for r in stack] == list(range(10)) and len({r["group"] for r in stack}) == 1
    root = zarr.open_group(store, mode="r")
    group = root[f"images/{stack[0]['group']}"]
    assert group.chunks[0] == 4  # slabs of 4 slices: 3 write units, the last one short
    np.testing.assert_array_equal(group[:][..., 0], zyx)
    np.testing.assert_array_equal(root[f"gt/{stack[0]['group']}"][:], (zyx > 2000).astype(np.uint32))

    again = with_runner(ingest_flow, ONE_WORKER)(spec)  # the same files and options: the store is kept
    assert again.get("reused") is True


def test_2d_slices_grouped_into_volumes_by_pattern(tmp_path, collection):
    rng = np.random.default_rng(3)
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    for case in ("case1", "case2"):
        for z in range(4):
            mask = np.zeros((48, 48), np.uint8)
            mask[10 + z:30, 8:28 + z] = 1
            write_png(images / f"{case}_z{z:02d}.png", (mask * 90 + rng.integers(0, 40, (48, 48))).astype(np.uint8))
            write_png(masks / f"{case}_z{z:02d}.png", mask)
    write_png(images / "other.png", np.zeros((48, 48), np.uint8))
    store, out = str(tmp_path / "s.zarr"), str(tmp_path / "run")
    spec = RunSpec(ingest=IngestSpec(images=str(images), masks=str(masks), store=store),
                   segment=SegmentSpec(store=store, checkpoint=collection["checkpoint"], out=out,
                                       execution=ONE_WORKER, volume_pattern=r"^(case\d)_z\d+$"))
    summary = with_runner(run_flow, ONE_WORKER)(spec)
    assert summary["volumes"]["volumes_evaluated"] == 2
    table = read_volume_table(out)
    rows = table.to_pylist()
    assert sorted({r["volume_id"] for r in rows}) == ["case1", "case2"]
    assert all(r["slices"] == 4 and r["spacing_unit"] is None and r["spacing_z"] == 1.0 for r in rows)
    dice = open_run(out).dice_table().to_pylist()
    for r in rows:
        slices = [d for d in dice if d["image_id"].startswith(r["volume_id"] + "_") and d["class_id"] == r["class_id"]]
        assert (r["tp"], r["fp"], r["fn"]) == tuple(sum(d[k] for d in slices) for k in ("tp", "fp", "fn"))
    assert pq.read_table(next(Path(out, "volumes").rglob("*.parquet"))).num_rows == len(rows)

    # Export: the run's pattern groups the slices into NIfTI volumes, in slice order, spacing 1, no unit.
    assert main(["export", out, "--out", str(tmp_path / "nifti")]) == 0
    run = open_run(out)
    for case in ("case1", "case2"):
        exported = nib.load(str(tmp_path / "nifti" / f"{case}.nii.gz"))
        assert exported.shape == (48, 48, 4) and exported.header.get_xyzt_units()[0] == "unknown"
        np.testing.assert_array_equal(exported.affine, np.eye(4))
        masks = np.stack([run.mask(f"{case}_z{z:02d}") for z in range(4)])
        np.testing.assert_array_equal(np.asarray(exported.dataobj), np.moveaxis(masks, 0, -1))
    assert not (tmp_path / "nifti" / "other.nii.gz").exists()
    # Another pattern (one volume of every image id with "_z") and one that groups nothing.
    assert main(["export", out, "--out", str(tmp_path / "all"), "--volume-pattern", r"^(c)ase\d_z\d+$"]) == 0
    assert nib.load(str(tmp_path / "all" / "c.nii.gz")).shape == (48, 48, 8)
    assert main(["export", out, "--out", str(tmp_path / "none"), "--volume-pattern", r"^nothing(\d)$"]) == 2

    # The UI's gallery of worst volumes: three slices of each volume (at 1/4, 2/4, 3/4 of its depth).
    worst = summary["volumes"]["worst_volumes"]
    assert sorted(w["volume_id"] for w in worst) == ["case1", "case2"]
    assert all(w["preview_slices"] == [f"{w['volume_id']}_z{z:02d}" for z in (1, 2, 3)] for w in worst)
    run_id = summary["run_id"]
    found = httpx.post(f"{PREFECT_API_URL.value()}/artifacts/filter", timeout=30,
                       json={"artifacts": {"key": {"any_": [artifact_key(f"worst-volumes-{run_id}")]}}}).json()
    assert len(found) == 1 and found[0]["data"].count("data:image/png;base64,") == 3 * 3 * 2


def _tiff_stack(tmp_path: Path, *, depth: int) -> tuple[Path, Path]:
    """``images/stack.tif`` and ``masks/stack.tif``: a ``depth``-slice 48x48 z-stack with one bright box."""
    images, masks = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    labels = np.zeros((depth, 48, 48), np.uint8)
    labels[:, 10:30, 12:40] = 1
    tifffile.imwrite(images / "stack.tif", (labels * 90 + 20).astype(np.uint8), photometric="minisblack")
    tifffile.imwrite(masks / "stack.tif", labels, photometric="minisblack")
    return images, masks


def test_volume_rows_reach_the_lake_with_their_file_as_lineage(tmp_path, collection):
    from segcore.lake.publish import read_lake

    images, masks = _tiff_stack(tmp_path, depth=3)
    store, out, lake = str(tmp_path / "s.zarr"), str(tmp_path / "run"), str(tmp_path / "lake")
    spec = RunSpec(ingest=IngestSpec(images=str(images), masks=str(masks), store=store),
                   segment=SegmentSpec(store=store, checkpoint=collection["checkpoint"], out=out, lake=lake,
                                       execution=ONE_WORKER))
    with_runner(run_flow, ONE_WORKER)(spec)
    rows = read_lake(lake, "volumes").to_pylist()
    assert [(r["volume_id"], r["class_id"]) for r in rows] == [("stack", c) for c in range(3)]
    assert {r["source_path"] for r in rows} == {str(images / "stack.tif")}
    assert all(r["source_sha256"] and r["run_id"] and r["slices"] == 3 for r in rows)


def _volumetric_checkpoint(path: Path, volume: np.ndarray) -> str:
    """A small random unet3d whose output layer is biased so that its classes are balanced on
    ``volume``: its labels then follow its features (a random model alone predicts one class)."""
    torch.manual_seed(0)
    model = create_model("unet3d", in_channels=1, num_classes=3, base=4, depth=2).eval()
    head = [m for m in model.modules() if isinstance(m, torch.nn.Conv3d)][-1]
    with torch.no_grad():
        x = torch.from_numpy(volume[None, None].astype(np.float32))
        head.bias -= model((x - x.mean()) / x.std()).mean(dim=(0, 2, 3, 4))
    meta = ModelMeta(arch="unet3d", arch_kwargs={"base": 4, "depth": 2}, class_names=("background", "a", "b"),
                     in_channels=1, input_axes="bczyx", normalisation=Normalisation(mode="percentile"))
    return str(save_checkpoint(path, model, meta))


def test_a_volumetric_model_tiled_in_3d_over_slabs_equals_whole_volume_inference(tmp_path):
    ids = generate_volume_collection(tmp_path / "data", n_volumes=1, shape=(24, 48, 40), seed=3, file_format="tiff")
    store = str(tmp_path / "s.zarr")
    with_runner(ingest_flow, ONE_WORKER)(IngestSpec(images=str(tmp_path / "data" / "images"),
                                                    masks=str(tmp_path / "data" / "masks"), store=store,
                                                    chunk_pixels=4 * 48 * 40))  # slabs of 4 slices: 6 units
    volume = tifffile.imread(tmp_path / "data" / "images" / f"{ids[0]}.tif")
    ckpt = _volumetric_checkpoint(tmp_path / "u3.safetensors", volume)
    from segcore.models.export import export_model

    onnx = str(tmp_path / "u3.segflow")
    export_model(ckpt, to="onnx", out=onnx)  # the same model in ONNX Runtime: 3-D tiles through its graph
    masks = {}
    for name, tile, model in (("tiled", 32, ckpt), ("whole", 0, ckpt), ("onnx", 32, onnx)):
        spec = SegmentSpec(store=store, checkpoint=model, out=str(tmp_path / name), tile_size=tile, overlap=8,
                           execution=ONE_WORKER)
        with_runner(segment_flow, ONE_WORKER)(spec)
        run = open_run(str(tmp_path / name))
        masks[name] = run.masks_of([f"{ids[0]}/z{k:04d}" for k in range(24)])
    counts = np.bincount(masks["whole"].ravel(), minlength=3)
    assert counts.min() > 0.02 * masks["whole"].size  # every class is predicted somewhere
    agreement = float((masks["tiled"] == masks["whole"]).mean())
    assert agreement >= 0.999, agreement
    assert float((masks["onnx"] == masks["tiled"]).mean()) >= 0.999
    assert read_volume_table(str(tmp_path / "tiled")).num_rows == 3


def test_segflow_train_trains_unet3d_on_the_stores_volumes(tmp_path, capsys):
    generate_volume_collection(tmp_path / "data", n_volumes=4, shape=(16, 24, 24), seed=5, file_format="tiff")
    store, ckpt = tmp_path / "v.zarr", tmp_path / "u3.safetensors"
    assert main(["ingest", "--images", str(tmp_path / "data" / "images"), "--masks", str(tmp_path / "data" / "masks"),
                 "--store", str(store)]) == 0
    assert main(["train", "--store", str(store), "--out", str(ckpt), "--model", "unet3d", "--epochs", "2",
                 "--base", "4", "--depth", "2", "--patch-size", "12", "--val-fraction", "0.25"]) == 0
    meta = read_meta(ckpt)
    assert meta.arch == "unet3d" and meta.input_axes == "bczyx" and meta.provenance["images"] == 4
    assert meta.provenance["patch_size"] == [12, 12, 12] and len(meta.provenance["val_ids"]) == 1
    assert meta.provenance["recipe"]["min_epoch_patches"] == 0  # a 3-D epoch: one patch per training volume
    assert main(["train", "--store", str(store), "--out", str(tmp_path / "more.safetensors"), "--model", "unet3d",
                 "--epochs", "1", "--base", "4", "--depth", "2", "--patch-size", "12", "--epoch-patches", "6"]) == 0
    assert read_meta(tmp_path / "more.safetensors").provenance["recipe"]["min_epoch_patches"] == 6
    with pytest.raises(StoreError, match="holds no volume with ground truth"):
        labelled_volumes(str(_two_dimensional_store(tmp_path)))


def _two_dimensional_store(tmp_path: Path) -> Path:
    images, masks = tmp_path / "flat" / "images", tmp_path / "flat" / "masks"
    images.mkdir(parents=True)
    masks.mkdir(parents=True)
    write_png(images / "a.png", np.zeros((16, 16), np.uint8))
    write_png(masks / "a.png", np.zeros((16, 16), np.uint8))
    store = tmp_path / "flat.zarr"
    with_runner(ingest_flow, ONE_WORKER)(IngestSpec(images=str(images), masks=str(masks), store=str(store)))
    return store


def test_a_run_with_failed_slabs_scores_no_volume_until_they_are_redone(tmp_path, collection, monkeypatch):
    images, masks = _tiff_stack(tmp_path, depth=4)
    store, out = str(tmp_path / "s.zarr"), str(tmp_path / "run")
    with_runner(ingest_flow, ONE_WORKER)(IngestSpec(images=str(images), masks=str(masks), store=store))
    spec = SegmentSpec(store=store, checkpoint=collection["checkpoint"], out=out, execution=ONE_WORKER,
                       unit_retries=0)
    monkeypatch.setattr(execution, "_started", None)  # a cluster of its own: its workers must see SEGFLOW_FAULTS
    monkeypatch.setenv("SEGFLOW_FAULTS", json.dumps({"oom_pixels": 1}))  # every forward pass runs out of memory
    with pytest.raises(SegflowError, match="unit"):
        with_runner(segment_flow, ONE_WORKER)(spec)
    assert read_volume_table(out).num_rows == 0  # never scored against the blank masks of failed slabs
    monkeypatch.delenv("SEGFLOW_FAULTS")
    with_runner(segment_flow, ONE_WORKER)(spec)
    rows = read_volume_table(out).to_pylist()
    assert [(r["volume_id"], r["status"]) for r in rows] == [("stack", "ok")] * 3
