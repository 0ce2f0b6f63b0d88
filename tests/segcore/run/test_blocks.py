"""Tiling options derived from the model, whole-image normalisation statistics, large synthetic
images, and the training spec's checks on options that only some models take."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from segcore.models.checkpoint import ModelMeta
from segcore.config import TrainSpec
from segcore.errors import ConfigError
from segcore.normalise import Normalisation, normalise_batch, percentile_stats
from segcore.synthetic_large import make_large_sample
from segcore.run.plan import DEFAULT_INSTANCE_OVERLAP, DEFAULT_INSTANCE_TILE, resolve_tiling


def _meta(arch: str, **kwargs) -> ModelMeta:
    return ModelMeta(arch=arch, arch_kwargs=kwargs, class_names=("background", "a"), in_channels=1,
                     normalisation=Normalisation())


def test_semantic_defaults_follow_the_unet() -> None:
    t = resolve_tiling(_meta("unet", depth=3), tile_size=None, overlap=None)
    assert (t.tile, t.overlap, t.blend, t.tta) == (512, 128, "gaussian", False)
    assert resolve_tiling(_meta("unet", depth=4), tile_size=100, overlap=None).tile == 112  # divisor 16
    assert resolve_tiling(_meta("unet"), tile_size=64, overlap=0, blend="linear", tta=True).tta


def test_instance_defaults_and_refusals() -> None:
    t = resolve_tiling(_meta("maskrcnn_r18"), tile_size=None, overlap=None)
    assert (t.tile, t.overlap) == (DEFAULT_INSTANCE_TILE, DEFAULT_INSTANCE_OVERLAP)
    with pytest.raises(ConfigError, match="semantic models only"):
        resolve_tiling(_meta("maskrcnn_r18"), tile_size=None, overlap=None, tta=True)
    with pytest.raises(ConfigError, match="overlap"):
        resolve_tiling(_meta("unet"), tile_size=64, overlap=64)
    with pytest.raises(ConfigError, match="blend"):
        resolve_tiling(_meta("unet"), tile_size=64, overlap=8, blend="max")


def test_tiles_normalised_with_the_whole_image_statistics() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 4000, (1, 64, 64, 2)).astype(np.uint16)
    norm = Normalisation(mode="percentile", low=1, high=99)
    stats = percentile_stats(image[0], norm)
    whole = normalise_batch(image, norm)
    tile = normalise_batch(image[:, 10:30, 5:40], norm, stats=stats)
    torch.testing.assert_close(tile, whole[:, :, 10:30, 5:40])
    assert not torch.allclose(normalise_batch(image[:, 10:30, 5:40], norm), tile)


def test_large_samples() -> None:
    img, labels = make_large_sample(np.random.default_rng(1), height=300, width=200, kind="instance", per_128=6)
    assert img.shape == labels.shape == (300, 200) and img.dtype == np.uint8 and labels.dtype == np.uint32
    ids = np.unique(labels)
    assert ids[0] == 0 and (ids == np.arange(ids.size)).all() and ids.size > 10  # 1..K consecutive
    assert np.bincount(labels.ravel())[1:].min() >= 12
    again = make_large_sample(np.random.default_rng(1), height=300, width=200, kind="instance", per_128=6)
    np.testing.assert_array_equal(again[0], img)
    img, classes = make_large_sample(np.random.default_rng(2), height=256, width=256)
    assert set(np.unique(classes)) == {0, 1, 2}
    with pytest.raises(ConfigError):
        make_large_sample(np.random.default_rng(0), height=256, width=256, kind="panoptic")


def test_train_spec_refuses_options_the_model_does_not_take() -> None:
    with pytest.raises(ValidationError, match="takes no option"):
        TrainSpec(store="s.zarr", out="m.safetensors", model="unet", arch_kwargs={"score_threshold": 0.5})
    assert TrainSpec(store="s.zarr", out="m.safetensors", model="unet3d", val_fraction=0).val_fraction == 0
    with pytest.raises(ValidationError, match=r"refit \(--refit\) .* val_fraction 0 \(--val-fraction 0\)"):
        TrainSpec(store="s.zarr", out="m.safetensors", model="unet", val_fraction=0, refit=True)
    for bad in (-0.1, 1.0):
        with pytest.raises(ValidationError, match=r"must lie in \[0, 1\): .* 0 for none"):
            TrainSpec(store="s.zarr", out="m.safetensors", val_fraction=bad)
    spec = TrainSpec(store="s.zarr", out="m.safetensors", model="maskrcnn_r18", val_fraction=0,
                     arch_kwargs={"score_threshold": 0.5, "proposals_per_img": 2000})
    assert spec.val_fraction == 0


def test_train_spec_refuses_patches_too_small_repeated_class_names_and_an_infinite_learning_rate() -> None:
    with pytest.raises(ValidationError, match="patch_size 3 is too small for a UNet of depth 3: .* at least 16"):
        TrainSpec(store="s.zarr", out="m.safetensors", model="unet3d", patch_size=3)
    with pytest.raises(ValidationError, match="patch_size 4 is too small for a UNet of depth 2: .* at least 8"):
        TrainSpec(store="s.zarr", out="m.safetensors", arch_kwargs={"depth": 2}, patch_size=4)
    assert TrainSpec(store="s.zarr", out="m.safetensors", arch_kwargs={"depth": 2}, patch_size=8).patch_size == 8
    with pytest.raises(ValidationError, match="patch_size applies to semantic models .* crop_size"):
        TrainSpec(store="s.zarr", out="m.safetensors", model="maskrcnn_r18", patch_size=64)
    assert TrainSpec(store="s.zarr", out="m.safetensors", model="maskrcnn_r18", schedule="cosine",
                     device="cuda").schedule == "cosine"  # the Mask R-CNN trainer takes both
    for names, said in ((("background", "liver", "liver"), r"\(repeated: liver\)"), (("",), r"got \[''\]"),
                        (("bg", " "), r"got \['bg', ' '\]")):
        with pytest.raises(ValidationError, match=f"class_names must be two or more distinct, non-empty.*{said}"):
            TrainSpec(store="s.zarr", out="m.safetensors", class_names=names)
    for lr in (float("inf"), float("nan")):
        with pytest.raises(ValidationError, match="lr"):
            TrainSpec(store="s.zarr", out="m.safetensors", lr=lr)
