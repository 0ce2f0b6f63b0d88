"""A plugin distribution as another package would ship one: its metadata (the ``.dist-info``
beside this file, on the test path through pytest's ``pythonpath``) names this module's
``TINY_CONV`` under the ``segflow.models`` entry points."""

from __future__ import annotations

from torch import nn


def build_tiny_conv(*, in_channels: int = 1, num_classes: int = 2, width: int = 4) -> nn.Module:
    """Two 3x3 convolutions: ``(N, in_channels, H, W)`` -> ``(N, num_classes, H, W)`` logits, any H, W."""
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(),
                         nn.Conv2d(width, num_classes, 3, padding=1))


TINY_CONV = (build_tiny_conv, "semantic")
