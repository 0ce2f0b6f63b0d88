"""Model registry: architectures are looked up by name through keyword-only builders.

``MODELS`` is a plain dict ``name -> builder``; :func:`create_model` builds one and, for an
unknown name, raises :class:`~segcore.errors.ConfigError` listing the valid names.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from segcore.errors import ConfigError
from segcore.models.maskrcnn import InstanceSegmenter, build_maskrcnn, build_maskrcnn_r18
from segcore.models.unet import UNet


def build_unet(*, in_channels: int = 1, num_classes: int = 2, base: int = 16, depth: int = 4) -> UNet:
    """Semantic UNet; see :class:`segcore.models.unet.UNet`."""
    return UNet(in_channels=in_channels, num_classes=num_classes, base=base, depth=depth)


#: name -> keyword-only builder returning an ``nn.Module``.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "unet": build_unet,
    "maskrcnn": build_maskrcnn,
    "maskrcnn_r18": build_maskrcnn_r18,
}

#: name -> kind of output ("semantic" label maps or "instance" label maps + records).
MODEL_KINDS: dict[str, str] = {
    "unet": "semantic",
    "maskrcnn": "instance",
    "maskrcnn_r18": "instance",
}


def create_model(arch: str, **kwargs: Any) -> nn.Module:
    """Build the registered architecture ``arch`` with keyword arguments ``kwargs``."""
    try:
        builder = MODELS[arch]
    except KeyError:
        raise ConfigError(f"unknown model {arch!r}; valid names: {', '.join(sorted(MODELS))}") from None
    try:
        return builder(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"bad arguments for model {arch!r}: {exc}") from exc


__all__ = ["MODELS", "MODEL_KINDS", "InstanceSegmenter", "UNet", "create_model"]
