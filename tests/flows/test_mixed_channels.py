"""A collection mixing grey, RGB and RGBA images, segmented by a 1-channel and by a 3-channel model:
every adaptable image is segmented (whole images and a tiled large one) with its adaptation
recorded, an RGBA image with a varying alpha is an error row, and the rest of its unit is kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from flows.pipeline import run_flow, segment_flow, with_runner
from segcore.collection.imageio import write_png
from segcore.collection.store import read_manifest
from segcore.config import ExecutionSpec, IngestSpec, RunSpec, SegmentSpec
from segcore.models import create_model
from segcore.models.checkpoint import ModelMeta, save_checkpoint
from segcore.models.predict import open_predictor
from segcore.normalise import Normalisation
from segcore.run.results import open_run
from segcore.run.rundir import label_array
from tests.flows.conftest import module_cluster

ONE_WORKER = ExecutionSpec(n_workers=1, threads_per_worker=1)
_cluster = module_cluster(ONE_WORKER)
SMALL, BIG = (32, 32), (160, 160)


def _checkpoint(path: Path, *, in_channels: int) -> str:
    """A random 2-class UNet whose head bias is shifted so that half the pixels of a 0..255 ramp are
    class 1: its masks then depend on the pixel values (an untrained UNet gives one class everywhere)."""
    torch.manual_seed(in_channels)
    model = create_model("unet", in_channels=in_channels, num_classes=2, base=4, depth=2).eval()
    ramp = torch.linspace(0, 1, 32 * 32).reshape(1, 1, 32, 32).repeat(1, in_channels, 1, 1)
    with torch.no_grad():
        logits = model(ramp)
        model.head.bias[1] -= (logits[0, 1] - logits[0, 0]).median()
    meta = ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2}, class_names=("background", "cell"),
                     in_channels=in_channels, normalisation=Normalisation(mode="range", scale=255.0))
    return str(save_checkpoint(path, model, meta))


def _pixels(rng: np.random.Generator, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    mask = np.zeros(shape, np.uint8)
    yy, xx = np.ogrid[:shape[0], :shape[1]]
    mask[(yy - shape[0] // 2) ** 2 + (xx - shape[1] // 3) ** 2 < (shape[0] // 4) ** 2] = 1
    return (mask * 120 + rng.integers(0, 60, shape)).astype(np.uint8), mask


@pytest.fixture(scope="module")
def mixed(tmp_path_factory) -> dict:
    """Images: 2 grey, 2 RGB, one RGBA with a constant alpha, one with a varying alpha (all 32x32, with
    masks) and one 160x160 RGB image stored in 128-pixel chunks (tiled)."""
    root = tmp_path_factory.mktemp("mixed")
    rng = np.random.default_rng(5)
    pixels: dict[str, np.ndarray] = {}
    for name, channels, shape in [("grey-0", 1, SMALL), ("grey-1", 1, SMALL), ("rgb-0", 3, SMALL),
                                  ("rgb-1", 3, SMALL), ("rgba-flat", 4, SMALL), ("rgba-holes", 4, SMALL),
                                  ("big-rgb", 3, BIG)]:
        base, mask = _pixels(rng, shape)
        image = base if channels == 1 else np.stack([base, 255 - base, base // 2], axis=-1)
        if channels == 4:
            alpha = np.full(shape, 255, np.uint8)
            if name == "rgba-holes":
                alpha[:8] = 0
            image = np.concatenate([image, alpha[..., None]], axis=-1)
        pixels[name] = image
        write_png(root / "images" / f"{name}.png", image)
        write_png(root / "masks" / f"{name}.png", mask)
    store = str(root / "store.zarr")
    grey_model, rgb_model = (_checkpoint(root / "grey.safetensors", in_channels=1),
                             _checkpoint(root / "rgb.safetensors", in_channels=3))
    spec = RunSpec(ingest=IngestSpec(images=str(root / "images"), masks=str(root / "masks"), store=store,
                                     chunk_pixels=20_000, tile_chunk=128),
                   segment=SegmentSpec(store=store, checkpoint=grey_model, out=str(root / "grey-run"),
                                       tile_size=64, overlap=16, execution=ONE_WORKER))
    with_runner(run_flow, ONE_WORKER)(spec)
    reverse = spec.segment.model_copy(update={"checkpoint": rgb_model, "out": str(root / "rgb-run")})
    with_runner(segment_flow, ONE_WORKER)(reverse)
    return {"root": root, "store": store, "pixels": pixels, "grey_model": grey_model, "rgb_model": rgb_model}


def _rows(run_dir: Path) -> dict[str, dict]:
    """Class-1 Dice row of each image."""
    return {r["image_id"]: r for r in open_run(str(run_dir)).dice_table().to_pylist() if r["class_id"] == 1}


def _mask(mixed: dict, run: str, image_id: str) -> np.ndarray:
    row = next(r for r in read_manifest(mixed["store"]).to_pylist() if r["image_id"] == image_id)
    return label_array(str(mixed["root"] / run / "masks.zarr"), row["group"])[row["index"]]


def test_a_one_channel_model_segments_every_adaptable_image_and_records_how(mixed):
    rows = _rows(mixed["root"] / "grey-run")
    assert sorted(rows) == ["big-rgb", "grey-0", "grey-1", "rgb-0", "rgb-1", "rgba-flat", "rgba-holes"]
    assert {i: r["channels_adapted"] for i, r in rows.items() if r["status"] == "ok"} == {
        "grey-0": "", "grey-1": "", "rgb-0": "rgb->grey", "rgb-1": "rgb->grey", "rgba-flat": "rgba->grey",
        "big-rgb": "rgb->grey"}
    refused = rows["rgba-holes"]
    assert refused["status"] == "error" and "varying alpha" in refused["error"]
    assert "1-channel model" in refused["error"] and refused["dice"] is None
    assert not _mask(mixed, "grey-run", "rgba-holes").any()


def test_rgb_is_fed_as_its_bt601_luminance(mixed):
    rgb = mixed["pixels"]["rgb-0"].astype(np.float64)
    grey = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]).astype(np.float32)
    expected = open_predictor(mixed["grey_model"], precision="fp32").labels(grey[None, ..., None])[0]
    assert 0 < expected.mean() < 1  # the mask depends on the pixel values
    np.testing.assert_array_equal(_mask(mixed, "grey-run", "rgb-0"), expected)
    assert _mask(mixed, "grey-run", "big-rgb").shape == BIG


def test_a_three_channel_model_gets_grey_replicated_and_rgba_without_alpha(mixed):
    rows = _rows(mixed["root"] / "rgb-run")
    assert {i: r["channels_adapted"] for i, r in rows.items() if r["status"] == "ok"} == {
        "grey-0": "grey->rgb", "grey-1": "grey->rgb", "rgb-0": "", "rgb-1": "", "rgba-flat": "rgba->rgb",
        "big-rgb": ""}
    assert rows["rgba-holes"]["status"] == "error" and "3-channel model" in rows["rgba-holes"]["error"]
    grey = mixed["pixels"]["grey-0"]
    expected = open_predictor(mixed["rgb_model"], precision="fp32").labels(np.repeat(grey[None, ..., None], 3, -1))[0]
    assert 0 < expected.mean() < 1
    np.testing.assert_array_equal(_mask(mixed, "rgb-run", "grey-0"), expected)
    flat = mixed["pixels"]["rgba-flat"]
    expected = open_predictor(mixed["rgb_model"], precision="fp32").labels(flat[None, ..., :3])[0]
    np.testing.assert_array_equal(_mask(mixed, "rgb-run", "rgba-flat"), expected)
