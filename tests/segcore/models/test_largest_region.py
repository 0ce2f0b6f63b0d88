"""The output rule that keeps each image's largest connected foreground region: by hand, through the
prediction seam (whole images, with their confusion counts), decided on validation images after
training, refused where it cannot apply, and described by ``segflow model info``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segcore.errors import CheckpointError, ConfigError
from segcore.models import create_model
from segcore.models.checkpoint import ModelMeta, save_checkpoint
from segcore.models.outputs import OutputRule, keep_largest_region
from segcore.models.predict import TorchPredictor
from segcore.models.record import describe_model
from segcore.models.stream import stream_labels
from segcore.normalise import Normalisation
from segcore.training.validation import decide_largest_region, pooled_dice

META = ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2}, class_names=("bg", "a", "b"), in_channels=1,
                 normalisation=Normalisation(mode="range", scale=1.0))
RULED = META.model_copy(update={"output": OutputRule(largest_region=True)})


def test_the_largest_foreground_region_is_kept_by_hand() -> None:
    labels = np.array([[
        [1, 2, 0, 0, 1],
        [0, 2, 0, 0, 1],  # left: 1 + 2 + 2 + 1 = 4 px of two classes joined by edges (one region)
        [0, 1, 0, 0, 0],
        [0, 0, 0, 2, 0],  # right: 2 px; the 2 at (3, 3) touches nothing by an edge
        [0, 0, 0, 0, 0],
    ], [
        [1, 0, 0, 0, 0],
        [0, 1, 0, 0, 0],  # three single pixels touching only by corners: a tie, the first in raster order wins
        [0, 0, 2, 0, 0],
        [0, 0, 0, 0, 0],
        [0, 0, 0, 0, 0],
    ], [
        [0] * 5] * 5], dtype=np.uint8)
    before = labels.copy()
    kept = keep_largest_region(labels)
    expected = np.zeros_like(labels)
    expected[0, 0, :2] = [1, 2]
    expected[0, 1, 1] = 2
    expected[0, 2, 1] = 1
    expected[1, 0, 0] = 1
    np.testing.assert_array_equal(kept, expected)
    np.testing.assert_array_equal(labels, before)  # a new array; the input is untouched


class Bright(torch.nn.Module):
    """Class 1 where the input is above 0.5, class 2 where above 1.5, background elsewhere."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full_like(x, 0.5), x, 2 * x - 1.5], dim=1)


def _scene(seed: int, *, specks: int) -> tuple[np.ndarray, np.ndarray]:
    """A 24x24 image: one 8x8 block (value 1, a 2x2 core of value 2) and ``specks`` single bright
    pixels away from it; the truth is the block alone."""
    rng = np.random.default_rng(seed)
    img = np.zeros((24, 24), np.float32)
    truth = np.zeros((24, 24), np.int64)
    y, x = rng.integers(1, 8, size=2)
    img[y:y + 8, x:x + 8] = 1.0
    img[y + 3:y + 5, x + 3:x + 5] = 2.0
    truth[y:y + 8, x:x + 8] = 1
    truth[y + 3:y + 5, x + 3:x + 5] = 2
    for k in range(specks):
        img[20, 2 + 4 * k] = 1.0
    return img[..., None], truth


def test_the_prediction_seam_applies_the_rule_and_counts_what_it_keeps() -> None:
    images, truth = map(np.stack, zip(*[_scene(s, specks=3) for s in range(5)]))
    plain = stream_labels(TorchPredictor(Bright(), META), images, batch_size=2, gt=truth)
    ruled = stream_labels(TorchPredictor(Bright(), RULED), images, batch_size=2, gt=truth)
    assert (plain.labels[:, 20] == 1).sum() == 15  # the specks are labelled without the rule
    np.testing.assert_array_equal(ruled.labels, keep_largest_region(plain.labels))
    np.testing.assert_array_equal(ruled.labels, truth)
    for i in range(len(images)):  # the confusion counts are those of the labels written
        expected = np.zeros((3, 3), np.int64)
        np.add.at(expected, (truth[i].ravel(), ruled.labels[i].ravel().astype(np.int64)), 1)
        np.testing.assert_array_equal(ruled.confusion[i], expected)


def test_auto_keeps_the_rule_only_when_it_raises_the_validation_dice() -> None:
    model = Bright()
    specks = [_scene(s, specks=2) for s in range(4)]
    x_val, y_val = np.stack([p[0] for p in specks]), np.stack([p[1] for p in specks])
    without = float(pooled_dice(TorchPredictor(model, META).labels(x_val), y_val, 3)[1:].mean())
    meta, record = decide_largest_region(model, META, "auto", without, x_val=x_val, y_val=y_val,
                                         device=torch.device("cpu"), batch_size=4, dims=2)
    assert meta.output.largest_region and record["kept"] and record["val_dice_mean_fg_with"] == 1.0 > without

    # Two true objects per image: the rule drops one, so auto leaves it off; "on" forces it anyway.
    pairs = [_scene(s, specks=0) for s in range(4)]
    x2 = np.stack([p[0] for p in pairs])
    y2 = np.stack([p[1] for p in pairs])
    x2[:, 18:22, 14:22] = 1.0
    y2[:, 18:22, 14:22] = 1
    without = float(pooled_dice(TorchPredictor(model, META).labels(x2), y2, 3)[1:].mean())
    assert without == 1.0
    meta, record = decide_largest_region(model, META, "auto", without, x_val=x2, y_val=y2,
                                         device=torch.device("cpu"), batch_size=4, dims=2)
    assert not meta.output.largest_region and not record["kept"] and record["val_dice_mean_fg_with"] < 1.0
    meta, record = decide_largest_region(model, META, "on", without, x_val=x2, y_val=y2,
                                         device=torch.device("cpu"), batch_size=4, dims=2)
    assert meta.output.largest_region and record["kept"]
    meta, record = decide_largest_region(model, META, "off", without, x_val=x2, y_val=y2,
                                         device=torch.device("cpu"), batch_size=4, dims=2)
    assert meta == META and record == {"choice": "off", "kept": False}
    assert decide_largest_region(model, META, "auto", 0.5, x_val=x2, y_val=y2, device=torch.device("cpu"),
                                 batch_size=4, dims=3)[1]["kept"] is False
    with pytest.raises(ConfigError, match="2-D models only"):
        decide_largest_region(model, META, "on", 0.5, x_val=x2, y_val=y2, device=torch.device("cpu"),
                              batch_size=4, dims=3)


def test_model_info_states_the_rule_and_a_volumetric_model_with_it_is_refused(tmp_path: Path) -> None:
    from segcore.run.start import preflight

    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "ruled.safetensors", create_model("unet", in_channels=1, num_classes=3, base=4,
                                                                        depth=2), RULED)
    assert "only the largest connected foreground region of each image is kept" in describe_model(ckpt)["output"]
    assert "largest" not in describe_model(save_checkpoint(
        tmp_path / "plain.safetensors", create_model("unet", in_channels=1, num_classes=3, base=4, depth=2),
        META))["output"]
    volumetric = ModelMeta(arch="unet3d", arch_kwargs={"base": 4, "depth": 2}, class_names=("bg", "a"), in_channels=1,
                           input_axes="bczyx", output=OutputRule(largest_region=True))
    ckpt3 = save_checkpoint(tmp_path / "ruled3d.safetensors", create_model("unet3d", in_channels=1, num_classes=2,
                                                                           base=4, depth=2), volumetric)
    with pytest.raises(CheckpointError, match="2-D semantic models only; this one is volumetric"):
        preflight(str(tmp_path / "no-store.zarr"), str(ckpt3))


def test_slices_of_a_volume_segmented_by_a_2d_model_get_the_rule_slice_by_slice(tmp_path: Path) -> None:
    """Through the run seam: a TIFF z-stack ingested as a volume group, segmented by hand unit by unit by
    a 2-D UNet with the rule and by the same weights without it."""
    import tifffile

    from segcore.collection.sources import pair_sources, probe_sources
    from segcore.collection.store import chunk_rows, create_store, plan_groups, write_manifest, write_store_chunk
    from segcore.run.results import open_run
    from segcore.run.start import start_run
    from segcore.run.units import segment_unit

    rng = np.random.default_rng(4)
    (tmp_path / "img").mkdir()
    tifffile.imwrite(tmp_path / "img" / "stack.ome.tif", rng.integers(0, 255, (6, 32, 32)).astype(np.uint8),
                     metadata={"axes": "ZYX"})
    rows = probe_sources(pair_sources(str(tmp_path / "img"), None))
    groups, planned = plan_groups(rows, chunk_pixels=4 * 32 * 32, max_chunk_images=64)
    store = str(tmp_path / "s.zarr")
    create_store(store, groups, with_gt=False, mask_kind="class", spec={})
    write_manifest(store, [r for c in chunk_rows(planned, groups) for r in write_store_chunk(store, c, threads=1)])
    torch.manual_seed(3)
    net = create_model("unet", in_channels=1, num_classes=3, base=4, depth=2).eval()
    with torch.no_grad():  # a random head labels everything alike: move the background logit so that
        x = torch.from_numpy(tifffile.imread(tmp_path / "img" / "stack.ome.tif")[:, None] / 255.0).float()
        logits = net(x)  # about half of the pixels, scattered, are foreground
        net.head.bias[0] -= float((logits[:, 0] - logits[:, 1:].amax(dim=1)).median())
    masks = {}
    for name, meta in (("plain", META), ("ruled", RULED)):
        meta = meta.model_copy(update={"normalisation": Normalisation(mode="range", scale=255.0)})
        ckpt = save_checkpoint(tmp_path / f"{name}.safetensors", net, meta)
        ctx, plan, _, _ = start_run(store, str(ckpt), str(tmp_path / name), batch_size=4, device="cpu")
        for unit in plan.units:
            segment_unit(ctx, unit)
        run = open_run(str(tmp_path / name))
        masks[name] = np.stack([run.mask(f"stack.ome/z{k:04d}") for k in range(6)])
    from scipy import ndimage
    assert max(ndimage.label(m > 0)[1] for m in masks["plain"]) > 1  # several regions: the rule has work to do
    np.testing.assert_array_equal(masks["ruled"], keep_largest_region(masks["plain"]))
    assert not np.array_equal(masks["ruled"], masks["plain"])


def test_the_rule_on_is_refused_for_a_volumetric_model_before_training() -> None:
    from segcore.config import TrainSpec
    from segcore.training.settings import Recipe
    from segcore.training.volumes import train_volumes

    with pytest.raises(ValueError, match="2-D models only"):
        TrainSpec(store="s.zarr", out="m.safetensors", model="unet3d", largest_region="on")
    volumes = np.zeros((2, 8, 16, 16, 1), np.float32)
    labels = np.zeros((2, 8, 16, 16), np.int64)
    with pytest.raises(ConfigError, match="2-D models only"):  # refused before any epoch runs
        train_volumes(volumes, labels, arch="unet3d", class_names=("bg", "a"), arch_kwargs={"base": 4, "depth": 1},
                      normalisation=Normalisation(), epochs=1, val_fraction=0.5, recipe=Recipe(largest_region="on"),
                      progress=lambda rec: pytest.fail("an epoch ran"))
