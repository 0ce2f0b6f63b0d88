"""Models from elsewhere through the run path (start_run + segment_unit), against the package's own
forward pass on the same images: torchvision's Mask R-CNN, segmentation_models_pytorch's Unet,
MONAI's UNet (imported from state dicts with 'segflow model import'), and a segflow UNet exported
to TorchScript and ONNX."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flows.cli import main
from segcore.collection.imageio import write_png
from segcore.collection.sources import pair_sources, probe_sources
from segcore.collection.store import chunk_rows, create_store, plan_groups, write_manifest, write_store_chunk
from segcore.models import create_model
from segcore.models.checkpoint import ModelMeta, save_checkpoint
from segcore.models.detection import IMAGENET_MEAN, IMAGENET_STD
from segcore.models.export import export_model
from segcore.models.instances import instances_to_labels
from segcore.normalise import Normalisation
from segcore.run.results import open_run
from segcore.run.start import start_run
from segcore.run.units import segment_unit


def make_store(tmp: Path, images: list[np.ndarray], masks: list[np.ndarray] | None = None) -> str:
    for i, img in enumerate(images):
        write_png(tmp / "img" / f"i{i}.png", img)
        if masks is not None:
            write_png(tmp / "gt" / f"i{i}.png", masks[i])
    rows = probe_sources(pair_sources(str(tmp / "img"), str(tmp / "gt") if masks is not None else None))
    groups, planned = plan_groups(rows, chunk_pixels=1 << 20, max_chunk_images=64)
    store = str(tmp / "s.zarr")
    create_store(store, groups, with_gt=masks is not None, mask_kind="class", spec={})
    write_manifest(store, [r for c in chunk_rows(planned, groups) for r in write_store_chunk(store, c, threads=1)])
    return store


def segment(store: str, model: str, run_dir: Path, *, batch_size: int):
    ctx, plan, meta, _ = start_run(store, model, str(run_dir), batch_size=batch_size, device="cpu",
                                   precision="fp32")
    for unit in plan.units:
        segment_unit(ctx, unit)
    return open_run(run_dir), meta


def import_(*argv: str) -> None:
    assert main(["model", "import", *argv]) == 0


def test_torchvision_maskrcnn_weights_give_torchvision_detections(tmp_path):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    tv = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=96, max_size=96,
                               box_score_thresh=0.0).eval()
    torch.save(tv.state_dict(), tmp_path / "maskrcnn.pth")  # as torchvision saves its weights
    import_(str(tmp_path / "maskrcnn.pth"), "--out", str(tmp_path / "m.safetensors"), "--arch",
            "torchvision:maskrcnn_resnet50_fpn", "--arch-kwargs", '{"min_size": 96, "max_size": 96, '
            '"score_threshold": 0.0}', "--class-names", "coco")
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(2)]
    reader, meta = segment(make_store(tmp_path, images), str(tmp_path / "m.safetensors"), tmp_path / "run",
                           batch_size=2)
    assert meta.normalisation == Normalisation(mode="range", scale=255.0) and meta.class_names[1] == "person"
    with torch.inference_mode():
        direct = tv([torch.from_numpy(im).permute(2, 0, 1).float() / 255.0 for im in images])
    rows = reader.instance_table().to_pylist()
    n = 0
    for i, det in enumerate(direct):
        keep = det["scores"] > 0.0
        want = instances_to_labels(boxes=det["boxes"][keep], scores=det["scores"][keep], labels=det["labels"][keep],
                                   masks=det["masks"][keep], image_size=(96, 96), mask_form="image")
        np.testing.assert_array_equal(reader.instances(f"i{i}"), want.labels)
        got = sorted((r for r in rows if r["image_id"] == f"i{i}"), key=lambda r: r["instance_id"])
        assert [r["class_id"] for r in got] == [r["class_id"] for r in want.records]
        assert [tuple(r["bbox"]) for r in got] == [r["bbox"] for r in want.records]
        np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in want.records], atol=1e-4)
        n += len(got)
    assert n >= 24  # dozens of detections compared


def _direct_labels(model: torch.nn.Module, images: list[np.ndarray], norm: Normalisation) -> np.ndarray:
    out = []
    with torch.inference_mode():
        for im in images:
            x = torch.from_numpy(im.reshape(*im.shape[:2], -1)).float().permute(2, 0, 1)[None] / 255.0
            if norm.mean is not None:
                x = (x - torch.tensor(norm.mean)[None, :, None, None]) / torch.tensor(norm.std)[None, :, None, None]
            out.append(model(x).argmax(1)[0].numpy())
    return np.stack(out)


@pytest.mark.parametrize("package", ["smp", "monai"])
def test_state_dicts_of_other_packages_segment_as_their_forward_pass(tmp_path, package):
    torch.manual_seed(0)
    rng = np.random.default_rng(2)
    if package == "smp":
        import segmentation_models_pytorch as smp

        model = smp.Unet(encoder_name="resnet18", encoder_weights=None, in_channels=3, classes=3).eval()
        args = ["--arch", "smp:Unet", "--arch-kwargs", '{"encoder_name": "resnet18"}', "--normalisation", "imagenet"]
        norm = Normalisation(mode="range", scale=255.0, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        images = [rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(3)]
    else:
        from monai.networks.nets import UNet

        model = UNet(spatial_dims=2, in_channels=1, out_channels=3, channels=(8, 16, 32), strides=(2, 2)).eval()
        args = ["--arch", "monai:UNet", "--arch-kwargs", '{"channels": [8, 16, 32], "strides": [2, 2]}',
                "--in-channels", "1", "--normalisation", "range"]
        norm = Normalisation(mode="range", scale=255.0)
        images = [rng.integers(0, 256, (48, 64), dtype=np.uint8) for _ in range(3)]
    torch.save(model.state_dict(), tmp_path / "weights.pth")
    import_(str(tmp_path / "weights.pth"), "--out", str(tmp_path / "m.safetensors"), "--class-names", "bg,a,b", *args)
    reader, _ = segment(make_store(tmp_path, images), str(tmp_path / "m.safetensors"), tmp_path / "run", batch_size=1)
    want = _direct_labels(model, images, norm)
    got = np.stack([reader.mask(f"i{i}") for i in range(len(images))])
    assert len(np.unique(want)) > 1
    np.testing.assert_array_equal(got, want)


def test_exported_unet_segments_as_the_torch_checkpoint(tmp_path):
    torch.manual_seed(0)
    meta = ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2}, class_names=("bg", "fg"), in_channels=1,
                     normalisation=Normalisation(mode="range", scale=255.0))
    unet = create_model("unet", in_channels=1, num_classes=2, base=4, depth=2).eval()
    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (42, 54), dtype=np.uint8) for _ in range(4)]  # not multiples of 4: padded
    with torch.no_grad():  # random weights, the foreground bias set so that about half the pixels are foreground
        logits = unet(torch.from_numpy(np.stack(images)).float()[:, None] / 255.0)
        unet.head.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    ckpt = save_checkpoint(tmp_path / "u.safetensors", unet, meta)
    store = make_store(tmp_path, images, masks=[(im > 120).astype(np.uint8) for im in images])
    runs = {"torch": str(ckpt)}
    for to in ("torchscript", "onnx"):
        runs[to] = str(tmp_path / f"u-{to}.segflow")
        assert export_model(ckpt, to=to, out=runs[to]).input_multiple == 4
    masks, dice = {}, {}
    for name, model in runs.items():
        reader, meta_run = segment(store, model, tmp_path / f"run-{name}", batch_size=2)
        assert meta_run.runtime == name
        masks[name] = np.stack([reader.mask(f"i{i}") for i in range(4)])
        table = reader.dice_table().to_pylist()
        dice[name] = np.mean([r["dice"] for r in table if r["class_name"] == "fg"])
    assert 0 < masks["torch"].mean() < 1
    np.testing.assert_array_equal(masks["torchscript"], masks["torch"])
    assert (masks["onnx"] == masks["torch"]).mean() >= 0.9999
    assert abs(dice["onnx"] - dice["torch"]) <= 1e-4


def test_an_exported_volumetric_unet_segments_volumes_as_the_torch_checkpoint(tmp_path):
    """unet3d exports with (N, C, D, H, W) inputs and dynamic depth too; the runtimes pad D, H and W."""
    from segcore.models.predict import open_predictor
    from segcore.models.record import read_model_meta

    torch.manual_seed(0)
    meta = ModelMeta(arch="unet3d", arch_kwargs={"base": 4, "depth": 2}, class_names=("bg", "fg"), in_channels=1,
                     normalisation=Normalisation(mode="range", scale=255.0), input_axes="bczyx")
    unet = create_model("unet3d", in_channels=1, num_classes=2, base=4, depth=2).eval()
    rng = np.random.default_rng(5)
    volumes = rng.integers(0, 256, (2, 10, 22, 26, 1), dtype=np.uint8)  # no side a multiple of 4: padded
    with torch.no_grad():
        logits = unet(torch.from_numpy(volumes[..., 0]).float()[:, None] / 255.0)
        unet.head.bias[1] -= (logits[:, 1] - logits[:, 0]).median()
    ckpt = save_checkpoint(tmp_path / "u3.safetensors", unet, meta)
    want = open_predictor(str(ckpt), device="cpu").labels(volumes, batch_size=1)
    assert want.shape == (2, 10, 22, 26) and 0 < want.mean() < 1
    for to in ("torchscript", "onnx"):
        out = str(tmp_path / f"u3-{to}.segflow")
        assert export_model(ckpt, to=to, out=out).input_axes == "bczyx"
        assert read_model_meta(out).spatial_dims == 3
        got = open_predictor(out, device="cpu").labels(volumes, batch_size=2)
        assert (got == want).mean() >= (1.0 if to == "torchscript" else 0.9999), to
