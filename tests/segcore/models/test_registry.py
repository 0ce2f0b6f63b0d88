"""The one test every registered model must pass: build, forward, save, load, same outputs,
prediction contract respected (volumetric models, ``spatial_dims = 3`` on the builder, on
volumes). A new entry in MODELS is tested here without further code: segflow's own,
torchvision's, the adapters of the installed packages (smp, MONAI) and the architectures of
``segflow.models`` entry points (tests/plugins holds a distribution that registers one)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcore.errors import ConfigError
from segcore.models.checkpoint import INPUT_AXES, ModelMeta, load_checkpoint, save_checkpoint
from segcore.models.predict import TorchPredictor
from segcore.models.instances import InstancePrediction
from segcore.models import MODEL_KINDS, MODELS, spatial_dims_of
from segcore.normalise import Normalisation

#: Small builder arguments per architecture (defaults where absent; lists, as JSON gives them back).
SMALL = {
    "unet": {"base": 4, "depth": 2},
    "unet3d": {"base": 4, "depth": 2},
    "smp:Unet": {"encoder_name": "resnet18", "encoder_depth": 3, "decoder_channels": [16, 8, 4]},
    "monai:UNet": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
    "monai:BasicUNet": {"features": [4, 4, 8, 8, 16, 4]},
    "monai:SegResNet": {"init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]},
    "torchvision:maskrcnn_resnet50_fpn": {"min_size": 64, "max_size": 64},
    "torchvision:maskrcnn_resnet50_fpn_v2": {"min_size": 64, "max_size": 64},
}
NORM = Normalisation(mode="range", scale=255.0)


def test_every_model_has_a_kind():
    assert set(MODELS) == set(MODEL_KINDS) and set(MODEL_KINDS.values()) <= {"semantic", "instance"}


def test_the_contract_covers_adapters_and_plugins():
    """The parametrisation below runs on these (the packages are in the test extra)."""
    assert {"smp:Unet", "monai:UNet", "monai:BasicUNet", "monai:SegResNet", "torchvision:maskrcnn_resnet50_fpn",
            "torchvision:maskrcnn_resnet50_fpn_v2", "example:TinyConv"} <= set(MODELS)
    assert MODEL_KINDS["example:TinyConv"] == "semantic"


@pytest.mark.parametrize("arch", sorted(MODELS))
def test_registered_model_contract(arch, tmp_path):
    torch.manual_seed(0)
    dims = spatial_dims_of(arch)
    meta = ModelMeta(arch=arch, arch_kwargs=SMALL.get(arch, {}), class_names=("background", "a", "b"),
                     in_channels=1, normalisation=NORM, input_axes=INPUT_AXES[dims])
    model = MODELS[arch](in_channels=1, num_classes=3, **SMALL.get(arch, {})).eval()
    shape = (2, 40, 56) if dims == 2 else (2, 5, 40, 56)
    images = np.random.default_rng(0).integers(0, 256, (*shape, 1), dtype=np.uint8)
    path = save_checkpoint(tmp_path / f"{arch}.safetensors", model, meta)
    loaded, loaded_meta = load_checkpoint(path)
    assert loaded_meta == meta and not loaded.training
    assert meta.spatial_dims == dims == getattr(model, "spatial_dims", 2)
    if meta.kind == "semantic":
        a = TorchPredictor(model, meta).labels(images)
        b = TorchPredictor(loaded, loaded_meta).labels(images)
        assert a.shape == shape and a.dtype == np.uint8 and int(a.max()) < 3
        np.testing.assert_array_equal(a, b)
    else:
        a = TorchPredictor(model, meta).instances(images, batch_size=2)
        b = TorchPredictor(loaded, loaded_meta).instances(images, batch_size=2)
        assert len(a) == 2 and all(isinstance(p, InstancePrediction) for p in a)
        for p, q in zip(a, b):
            assert p.labels.shape == (40, 56) and p.labels.dtype == np.uint32 and p.classes.dtype == np.uint8
            np.testing.assert_array_equal(p.labels, q.labels)
            ids = [r["instance_id"] for r in p.records]
            assert ids == list(range(1, len(ids) + 1))
            for r in p.records:
                x0, y0, x1, y1 = r["bbox"]
                inside = np.zeros_like(p.labels, dtype=bool)
                inside[y0:y1, x0:x1] = True
                assert not ((p.labels == r["instance_id"]) & ~inside).any()
                assert r["area"] == int((p.labels == r["instance_id"]).sum()) > 0
                assert r["class_id"] in (1, 2)


def test_a_lazy_builder_is_its_builder_once_asked() -> None:
    import inspect

    from segcore.models.detection import TORCHVISION_NORMALISATION, build_torchvision_maskrcnn
    from segcore.models.registry import LazyBuilder

    lazy = MODELS["torchvision:maskrcnn_resnet50_fpn"]
    assert isinstance(lazy, LazyBuilder) and lazy.resolve() is build_torchvision_maskrcnn
    assert inspect.signature(lazy) == inspect.signature(build_torchvision_maskrcnn)
    assert lazy.normalisation == TORCHVISION_NORMALISATION and spatial_dims_of("maskrcnn") == 2
    with pytest.raises(AttributeError):
        _ = lazy.no_such_attribute
    with pytest.raises(Exception, match="module:name"):
        LazyBuilder("segcore.models.maskrcnn")
    assert LazyBuilder("segcore.models:build_unet3d").spatial_dims == 3


@pytest.mark.parametrize("target", ["segcore.models:no_such_builder", "segcore.no_such_module:build"])
def test_a_lazy_builder_that_cannot_load_says_so_wherever_it_is_asked(target) -> None:
    """Not an AttributeError: ``getattr(builder, "spatial_dims", 2)`` would take it for a missing
    attribute and go on with a default."""
    import inspect

    from segcore.models.registry import LazyBuilder

    lazy = LazyBuilder(target)
    for ask in (lambda: lazy(in_channels=1), lambda: inspect.signature(lazy), lambda: lazy.spatial_dims,
                lambda: getattr(lazy, "normalisation", None)):
        with pytest.raises(ConfigError, match=f"model builder {target} could not be loaded"):
            ask()


def test_listing_models_and_running_a_unet_never_import_torchvision() -> None:
    """A worker that segments with a UNet is spared torchvision's import (about 1.3 s of CPU)."""
    import subprocess
    import sys
    from pathlib import Path

    probe = ("import sys, segcore.models, segcore.run, segcore.models.predict\n"
             "from segcore.models import MODELS, create_model\n"
             "sorted(MODELS); create_model('unet', in_channels=1, num_classes=2, base=4, depth=2)\n"
             "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torchvision'))\n"
             "create_model('maskrcnn_r18', in_channels=1, num_classes=2)\n"
             "print('torchvision' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[3], check=True).stdout.splitlines()
    assert out == ["[]", "True"]
