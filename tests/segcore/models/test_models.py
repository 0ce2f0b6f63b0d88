"""Tests for the model registry: every registered model passes one shared tester (any H x W,
``(N, classes, H, W)`` logits), and bad names, arguments and values are refused."""

from __future__ import annotations

import pytest
import torch

from tests.segcore.models.test_registry import SMALL as REGISTRY_SMALL

from segcore.errors import ConfigError
from segcore.models import MODEL_KINDS, MODELS, UNet, create_model

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
    x = torch.randn(2, 2, h, w)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 3, h, w)
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
