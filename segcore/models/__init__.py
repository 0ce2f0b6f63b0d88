"""Model registry: architectures are looked up by name through keyword-only builders.

``MODELS`` is a plain dict ``name -> builder`` and ``MODEL_KINDS`` ``name -> kind``
(:mod:`segcore.models.registry`); :func:`create_model` builds one and, for an unknown name, raises
:class:`~segcore.errors.ConfigError` listing the valid names. A volumetric architecture says so
with ``spatial_dims = 3`` on its builder (:func:`~segcore.models.registry.spatial_dims_of`).
Registered here: segflow's own (``unet``; ``unet3d``, its volumetric twin; ``maskrcnn``,
``maskrcnn_r18``), torchvision's Mask R-CNNs keyed as torchvision distributes them
(:mod:`segcore.models.detection`), the adapters of installed packages
(:mod:`segcore.models.adapters`: ``smp:Unet``, ``monai:*``) and the architectures of the
``segflow.models`` entry points of installed distributions.
"""

from __future__ import annotations

from typing import Any

from segcore.models.adapters import register_available
from segcore.models.registry import (ENTRY_POINT_GROUP, MODEL_KINDS, MODELS, LazyBuilder, create_model,
                                     load_entry_points, register_model, spatial_dims_of)
from segcore.models.unet import UNet


def build_unet(*, in_channels: int = 1, num_classes: int = 2, base: int = 16, depth: int = 4) -> UNet:
    """Semantic UNet; see :class:`segcore.models.unet.UNet`."""
    return UNet(in_channels=in_channels, num_classes=num_classes, base=base, depth=depth)


def build_unet3d(*, in_channels: int = 1, num_classes: int = 2, base: int = 16, depth: int = 4) -> UNet:
    """Volumetric semantic UNet: ``(N, C, D, H, W)`` in, ``(N, num_classes, D, H, W)`` logits out; see
    :class:`segcore.models.unet.UNet` (``spatial_dims=3``)."""
    return UNet(in_channels=in_channels, num_classes=num_classes, base=base, depth=depth, spatial_dims=3)


build_unet3d.spatial_dims = 3  # type: ignore[attr-defined]


def _builtin() -> dict[str, tuple[object, str]]:
    # The Mask R-CNNs are imported when first built or asked about (they need torchvision).
    return {"unet": (build_unet, "semantic"), "unet3d": (build_unet3d, "semantic"),
            "maskrcnn": (LazyBuilder("segcore.models.maskrcnn:build_maskrcnn"), "instance"),
            "maskrcnn_r18": (LazyBuilder("segcore.models.maskrcnn:build_maskrcnn_r18"), "instance"),
            "torchvision:maskrcnn_resnet50_fpn":
                (LazyBuilder("segcore.models.detection:build_torchvision_maskrcnn"), "instance"),
            "torchvision:maskrcnn_resnet50_fpn_v2":
                (LazyBuilder("segcore.models.detection:build_torchvision_maskrcnn_v2"), "instance")}


for _name, (_builder, _kind) in _builtin().items():
    register_model(_name, _builder, kind=_kind, replace=True)  # type: ignore[arg-type]
register_available()
load_entry_points()


def __getattr__(name: str) -> Any:
    if name == "InstanceSegmenter":  # imported on first use, with torchvision
        from segcore.models.maskrcnn import InstanceSegmenter

        return InstanceSegmenter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ENTRY_POINT_GROUP", "MODELS", "MODEL_KINDS", "InstanceSegmenter", "UNet", "create_model",
           "load_entry_points", "register_model", "spatial_dims_of"]
