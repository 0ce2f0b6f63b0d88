"""Loading architectures from ``segflow.models`` entry points: real entry-point objects, loaded
by :func:`segcore.models.load_entry_points`; a broken or clashing plugin is skipped, not fatal."""

from __future__ import annotations

import logging
from importlib.metadata import EntryPoint

import pytest
import torch

from segcore.errors import ConfigError
from segcore.models import (ENTRY_POINT_GROUP, MODEL_KINDS, MODELS, create_model, load_entry_points, register_model,
                            spatial_dims_of)


@pytest.fixture
def registry():
    """The registry as it was, restored after the test."""
    models, kinds = dict(MODELS), dict(MODEL_KINDS)
    yield
    MODELS.clear(), MODELS.update(models)
    MODEL_KINDS.clear(), MODEL_KINDS.update(kinds)


def test_installed_distribution_plugs_in():
    from segflow_example_plugin import build_tiny_conv

    assert MODELS["example:TinyConv"] is build_tiny_conv and MODEL_KINDS["example:TinyConv"] == "semantic"
    out = create_model("example:TinyConv", in_channels=2, num_classes=3)(torch.zeros(1, 2, 5, 7))
    assert out.shape == (1, 3, 5, 7)


def test_entry_points_register_pairs_and_builders_with_a_kind(registry, caplog):
    eps = [EntryPoint("ex:pair", "segflow_example_plugin:TINY_CONV", ENTRY_POINT_GROUP),
           EntryPoint("ex:bare", "segflow_example_plugin:build_tiny_conv", ENTRY_POINT_GROUP),
           EntryPoint("ex:missing", "no_such_module_xyz:build", ENTRY_POINT_GROUP),
           EntryPoint("unet", "segflow_example_plugin:TINY_CONV", ENTRY_POINT_GROUP)]
    with caplog.at_level(logging.WARNING, logger="segcore.models.registry"):
        added = load_entry_points(eps)
    assert added == ["ex:pair", "ex:bare"]
    assert MODEL_KINDS["ex:pair"] == MODEL_KINDS["ex:bare"] == "semantic"
    assert MODELS["unet"].__module__ == "segcore.models"  # a plugin cannot take a built-in name
    skipped = [r.getMessage() for r in caplog.records]
    assert len(skipped) == 2 and "ex:missing" in skipped[0] and "already registered" in skipped[1]


def test_register_model_checks_kind_and_names(registry):
    with pytest.raises(ConfigError, match="kind must be one of"):
        register_model("ex:x", lambda **_: None, kind="panoptic")
    with pytest.raises(ConfigError, match="unknown model 'nope'.*unet"):
        create_model("nope")


def test_a_builder_declares_volumes_by_its_spatial_dims(registry):
    def build_flat(**_):
        return torch.nn.Identity()

    def build_volume(**_):
        return torch.nn.Identity()

    def build_odd(**_):
        return torch.nn.Identity()

    build_volume.spatial_dims = 3
    build_odd.spatial_dims = 4
    for name, builder in (("ex:flat", build_flat), ("ex:volume", build_volume), ("ex:odd", build_odd)):
        register_model(name, builder, kind="semantic")
    assert (spatial_dims_of("ex:flat"), spatial_dims_of("ex:volume"), spatial_dims_of("unet3d")) == (2, 3, 3)
    with pytest.raises(ConfigError, match="spatial_dims must be 2 or 3"):
        spatial_dims_of("ex:odd")
    with pytest.raises(ConfigError, match="unknown model 'nope'"):
        spatial_dims_of("nope")
