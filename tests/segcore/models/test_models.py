"""Tests for the model registry: every registered model passes one shared tester (any H x W,
``(N, classes, H, W)`` logits; volumetric models any D x H x W, ``(N, classes, D, H, W)``), and bad
names, arguments and values are refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.segcore.models.test_registry import SMALL as REGISTRY_SMALL

from segcore.errors import ConfigError
from segcore.models import MODEL_KINDS, MODELS, UNet, create_model, spatial_dims_of
from segcore.models.checkpoint import ModelMeta
from segcore.models.padding import crop_to, pad_to_multiple
from segcore.models.predict import TorchPredictor
from segcore.normalise import Normalisation

SMALL = {"in_channels": 2, "num_classes": 3, "base": 4, "depth": 2}


def test_registry_names_and_kinds_agree() -> None:
    assert "unet" in MODELS
    assert set(MODEL_KINDS) == set(MODELS)
    assert set(MODEL_KINDS.values()) <= {"semantic", "instance"}


@pytest.mark.parametrize("arch", sorted(a for a in MODELS if MODEL_KINDS[a] == "semantic"))
@pytest.mark.parametrize(("h", "w"), [(1, 1), (2, 3), (37, 50), (65, 64), (16, 16)])
def test_output_shape_for_any_size(arch: str, h: int, w: int) -> None:
    torch.manual_seed(0)
    model = create_model(arch, in_channels=2, num_classes=3, **REGISTRY_SMALL.get(arch, {})).eval()
    depth = (h % 4 + 3,) if spatial_dims_of(arch) == 3 else ()  # volumes: 3 to 6 slices
    x = torch.randn(2, 2, *depth, h, w)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 3, *depth, h, w)
    assert y.dtype == torch.float32
    assert torch.isfinite(y).all()


def test_default_depth_handles_tiny_and_odd_inputs() -> None:
    model = create_model("unet", in_channels=1, num_classes=2, base=2).eval()  # depth 4: padded to x16
    with torch.no_grad():
        for h, w in [(1, 1), (5, 17), (33, 2)]:
            assert model(torch.randn(1, 1, h, w)).shape == (1, 2, h, w)


def test_images_of_a_batch_are_independent_in_eval_mode() -> None:
    torch.manual_seed(1)
    model = create_model("unet", **SMALL).eval()
    x = torch.randn(3, 2, 13, 9)
    with torch.no_grad():
        whole = model(x)
        single = model(x[1:2])
    torch.testing.assert_close(whole[1:2], single, rtol=1e-5, atol=1e-5)


def test_train_step_reaches_every_parameter() -> None:
    torch.manual_seed(2)
    model = create_model("unet", **SMALL).train()
    y = model(torch.randn(2, 2, 12, 10))
    y.sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name


def test_builder_arguments_reach_the_model() -> None:
    model = create_model("unet", in_channels=3, num_classes=5, base=8, depth=3)
    assert isinstance(model, UNet)
    assert (model.in_channels, model.num_classes, model.depth, model.divisor) == (3, 5, 3, 8)
    assert model.head.out_channels == 5
    assert model.bottleneck[0].out_channels == 8 * 2**3
    assert len(model.down) == len(model.up) == len(model.dec) == 3


def test_defaults() -> None:
    model = create_model("unet")
    assert (model.in_channels, model.num_classes, model.depth) == (1, 2, 4)
    assert model.down[0][0].out_channels == 16


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="unet") as info:
        create_model("resnet-9000")
    assert "resnet-9000" in str(info.value)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("kwargs", [{"channels": 3}, {"in_channels": 1, "bogus": True}])
def test_bad_keyword_is_config_error(kwargs: dict) -> None:
    with pytest.raises(ConfigError, match="bad arguments for model 'unet'"):
        create_model("unet", **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"num_classes": 1}, {"in_channels": 0}, {"base": 0}, {"depth": 0}, {"num_classes": -2}],
)
def test_invalid_values_are_refused(kwargs: dict) -> None:
    with pytest.raises(ValueError, match="UNet needs"):
        create_model("unet", **kwargs)


def test_positional_arguments_are_refused() -> None:
    with pytest.raises(TypeError):
        UNet(1, 2)  # type: ignore[misc]


# --------------------------------------------------------------------------------------------
# unet3d: the same UNet with spatial_dims=3; padding in 2-D and 3-D


@pytest.mark.parametrize(("d", "h", "w"), [(5, 17, 23), (1, 1, 1), (4, 8, 12), (9, 3, 2)])
def test_unet3d_output_shape_for_odd_sizes(d: int, h: int, w: int) -> None:
    torch.manual_seed(0)
    model = create_model("unet3d", in_channels=2, num_classes=4, base=2, depth=2).eval()
    with torch.no_grad():
        y = model(torch.randn(2, 2, d, h, w))
    assert y.shape == (2, 4, d, h, w) and y.dtype == torch.float32 and torch.isfinite(y).all()


def test_unet3d_is_the_unet_in_three_dimensions() -> None:
    flat, vol = create_model("unet", **SMALL), create_model("unet3d", **SMALL)
    assert spatial_dims_of("unet3d") == vol.spatial_dims == 3 and spatial_dims_of("unet") == flat.spatial_dims == 2
    assert MODEL_KINDS["unet3d"] == "semantic" and isinstance(vol, UNet)
    flat_state, vol_state = flat.state_dict(), vol.state_dict()
    assert list(flat_state) == list(vol_state)
    for key, t in flat_state.items():  # 3-D kernels have one more axis of the same size
        assert vol_state[key].shape == (t.shape + t.shape[-1:] if t.ndim >= 4 else t.shape), key
    assert isinstance(vol.head, torch.nn.Conv3d) and isinstance(vol.up[0], torch.nn.ConvTranspose3d)
    assert vol.head.out_channels == 3 and vol.bottleneck[0].out_channels == 4 * 2**2 and vol.divisor == 4


def test_unet3d_volumes_of_a_batch_are_independent_and_every_parameter_learns() -> None:
    torch.manual_seed(1)
    model = create_model("unet3d", **SMALL).eval()
    x = torch.randn(3, 2, 5, 7, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x)[1:2], model(x[1:2]), rtol=1e-5, atol=1e-5)
    model.train()
    model(torch.randn(2, 2, 4, 6, 5)).sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name


def test_unet3d_padded_forward_is_the_unpadded_forward_of_the_reflected_volume() -> None:
    torch.manual_seed(2)
    model = create_model("unet3d", **SMALL).eval()
    x = torch.randn(1, 2, 3, 5, 6)  # padded to 4 x 8 x 8: reflect on every axis
    reflected = torch.nn.functional.pad(x, (0, 2, 0, 3, 0, 1), mode="reflect")
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_unpadded(reflected)[..., :3, :5, :6])


def test_pad_to_multiple_in_two_and_three_dimensions() -> None:
    image = torch.arange(6.0).reshape(1, 1, 2, 3)
    padded, sizes = pad_to_multiple(image, 2)
    assert sizes == (2, 3) and padded[0, 0].tolist() == [[0, 1, 2, 1], [3, 4, 5, 4]]
    same, sizes = pad_to_multiple(image, 1)
    assert same is image and sizes == (2, 3)
    volume = torch.arange(4.0).reshape(1, 1, 1, 2, 2)  # D=1 cannot reflect: every axis replicates
    padded, sizes = pad_to_multiple(volume, 2, spatial_dims=3)
    assert sizes == (1, 2, 2) and padded.shape == (1, 1, 2, 2, 2)
    assert padded[0, 0, 0].tolist() == padded[0, 0, 1].tolist() == [[0, 1], [2, 3]]
    padded, sizes = pad_to_multiple(torch.arange(27.0).reshape(1, 1, 3, 3, 3), 2, spatial_dims=3)
    assert sizes == (3, 3, 3) and padded.shape == (1, 1, 4, 4, 4)
    assert padded[0, 0, 3, 3, 3] == 13.0  # reflect of index 3 is index 1 on each axis: 9 + 3 + 1
    assert crop_to(padded, sizes).shape == (1, 1, 3, 3, 3)


def test_unet3d_refuses_other_dimensionalities_and_bad_values() -> None:
    with pytest.raises(ValueError, match="spatial_dims 2 or 3"):
        UNet(spatial_dims=1)
    with pytest.raises(ConfigError, match="bad arguments for model 'unet3d'"):
        create_model("unet3d", base=0)
    with pytest.raises(ConfigError, match="bad arguments for model 'unet3d'"):
        create_model("unet3d", spatial_dims=2)  # the builder fixes it


def test_the_predictor_of_a_volumetric_model_labels_volumes_only() -> None:
    torch.manual_seed(3)
    model = create_model("unet3d", in_channels=1, num_classes=3, base=2, depth=2).eval()
    meta = ModelMeta(arch="unet3d", arch_kwargs={"base": 2, "depth": 2}, class_names=("bg", "a", "b"),
                     in_channels=1, normalisation=Normalisation(mode="range", scale=255.0), input_axes="bczyx")
    predictor = TorchPredictor(model, meta, precision="fp32")
    volumes = np.random.default_rng(0).integers(0, 256, (3, 5, 9, 7, 1), dtype=np.uint8)
    labels = predictor.labels(volumes, batch_size=2)
    assert predictor.spatial_dims == 3 and labels.shape == (3, 5, 9, 7) and labels.dtype == np.uint8
    with torch.no_grad():
        expected = model(torch.from_numpy(volumes).float().permute(0, 4, 1, 2, 3) / 255.0).argmax(1)
    np.testing.assert_array_equal(labels, expected.numpy())
    with pytest.raises(ConfigError, match=r"takes \(N, D, H, W, C\) volumes"):
        predictor.labels(volumes[:, 0])
