"""Architectures of other packages, keyed exactly as those packages name their weights.

Registered (see :func:`register_available`) only when the package is installed (extras
``segflow[smp]``, ``segflow[monai]``); nothing is ever downloaded (``encoder_weights=None``):

- ``smp:Unet``: ``segmentation_models_pytorch.Unet``, any encoder (``encoder_name``);
- ``monai:UNet``, ``monai:BasicUNet``, ``monai:SegResNet``: MONAI's 2-D networks.

Each model is a subclass of the package's own class, so its ``state_dict`` keys are the
package's: a state dict saved from the package's model loads strictly. The subclass pads inputs to
the multiple the network needs (:class:`~segcore.models.padding.PaddedForward`) and crops the
logits back, so any ``H x W`` works; ``(N, in_channels, H, W)`` float32 in,
``(N, num_classes, H, W)`` logits out.
"""

from __future__ import annotations

import importlib.util
import math
from functools import lru_cache
from typing import Any, Sequence

from torch import nn

from segcore.models.padding import PaddedForward
from segcore.models.registry import register_model


@lru_cache(maxsize=None)
def _padded(cls: type) -> type:
    """``cls`` with :class:`PaddedForward`: ``forward`` pads, ``forward_unpadded`` is ``cls.forward``."""
    def forward_unpadded(self: Any, x: Any) -> Any:
        return cls.forward(self, x)

    return type(f"Padded{cls.__name__}", (PaddedForward, cls), {"forward_unpadded": forward_unpadded,
                                                              "__module__": __name__})


def _make(cls: type, multiple: int, *, minimum: int = 1, **kwargs: Any) -> nn.Module:
    model = _padded(cls)(**kwargs)
    model.input_multiple = int(multiple)
    model.input_minimum = int(minimum)
    return model


def build_smp_unet(*, in_channels: int = 3, num_classes: int = 2, encoder_name: str = "resnet34",
                   encoder_depth: int = 5, decoder_channels: Sequence[int] | None = None,
                   decoder_attention_type: str | None = None) -> nn.Module:
    """``segmentation_models_pytorch.Unet`` (``encoder_weights=None``); inputs padded to ``2**encoder_depth``."""
    import segmentation_models_pytorch as smp

    extra: dict[str, Any] = {}
    if decoder_channels is not None:
        extra["decoder_channels"] = tuple(int(c) for c in decoder_channels)
    return _make(smp.Unet, 2**encoder_depth, encoder_name=encoder_name, encoder_weights=None,
                 encoder_depth=encoder_depth, in_channels=in_channels, classes=num_classes,
                 decoder_attention_type=decoder_attention_type, **extra)


def _monai_shape(name: str, *, spatial_dims: int, out_channels: int | None, num_classes: int) -> None:
    """Refuse the MONAI arguments segflow sets itself when they say otherwise: ``spatial_dims`` (these
    networks are registered for 2-D images) and ``out_channels`` (the class count, from the class names)."""
    if spatial_dims != 2:
        raise ValueError(f"{name} is registered for 2-D images (spatial_dims 2), not spatial_dims {spatial_dims}: a "
                         "3-D MONAI network cannot be imported")
    if out_channels is not None and out_channels != num_classes:
        raise ValueError(f"out_channels {out_channels} but {num_classes} class names were given: give {out_channels} "
                         "names to --class-names")


def build_monai_unet(*, in_channels: int = 1, num_classes: int = 2, channels: Sequence[int] = (16, 32, 64, 128, 256),
                     strides: Sequence[int] = (2, 2, 2, 2), num_res_units: int = 0, norm: str = "INSTANCE",
                     dropout: float = 0.0, spatial_dims: int = 2, out_channels: int | None = None,
                     **options: Any) -> nn.Module:
    """MONAI's ``UNet`` (2-D; MONAI's defaults); inputs padded to the product of ``strides``. MONAI's
    other arguments (``kernel_size``, ``up_kernel_size``, ``act``, ``bias``, ``adn_ordering``) pass
    through; ``spatial_dims`` and ``out_channels`` may be given as MONAI takes them, and must agree."""
    from monai.networks.nets import UNet

    _monai_shape("monai:UNet", spatial_dims=spatial_dims, out_channels=out_channels, num_classes=num_classes)
    multiple = math.prod(int(s) for s in strides)  # instance norms need 2 x 2 pixels at the bottleneck
    return _make(UNet, multiple, minimum=2 * multiple, spatial_dims=2, in_channels=in_channels,
                 out_channels=num_classes, channels=tuple(channels), strides=tuple(strides),
                 num_res_units=num_res_units, norm=norm, dropout=dropout, **options)


def build_monai_basic_unet(*, in_channels: int = 1, num_classes: int = 2,
                           features: Sequence[int] = (32, 32, 64, 128, 256, 32), spatial_dims: int = 2,
                           out_channels: int | None = None, **options: Any) -> nn.Module:
    """MONAI's ``BasicUNet`` (2-D, four poolings); inputs padded to 16. Its other arguments (``act``,
    ``norm``, ``bias``, ``dropout``, ``upsample``) pass through."""
    from monai.networks.nets import BasicUNet

    _monai_shape("monai:BasicUNet", spatial_dims=spatial_dims, out_channels=out_channels, num_classes=num_classes)
    return _make(BasicUNet, 16, minimum=32, spatial_dims=2, in_channels=in_channels, out_channels=num_classes,
                 features=tuple(features), **options)


def build_monai_segresnet(*, in_channels: int = 1, num_classes: int = 2, init_filters: int = 8,
                          blocks_down: Sequence[int] = (1, 2, 2, 4), blocks_up: Sequence[int] = (1, 1, 1)) -> nn.Module:
    """MONAI's ``SegResNet`` (2-D); inputs padded to ``2**(len(blocks_down) - 1)``."""
    from monai.networks.nets import SegResNet

    return _make(SegResNet, 2 ** (len(blocks_down) - 1), spatial_dims=2, in_channels=in_channels,
                 out_channels=num_classes, init_filters=init_filters, blocks_down=tuple(blocks_down),
                 blocks_up=tuple(blocks_up))


#: name -> (package that must be importable, builder).
ADAPTERS = {
    "smp:Unet": ("segmentation_models_pytorch", build_smp_unet),
    "monai:UNet": ("monai", build_monai_unet),
    "monai:BasicUNet": ("monai", build_monai_basic_unet),
    "monai:SegResNet": ("monai", build_monai_segresnet),
}


def register_available() -> list[str]:
    """Register the adapters whose package is installed (found without importing it); returns their names."""
    names = []
    for name, (package, builder) in ADAPTERS.items():
        if importlib.util.find_spec(package) is not None:
            register_model(name, builder, kind="semantic", replace=True)
            names.append(name)
    return names


__all__ = ["ADAPTERS", "build_monai_basic_unet", "build_monai_segresnet", "build_monai_unet", "build_smp_unet",
           "register_available"]
