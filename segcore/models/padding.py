"""Padding inputs to the spatial multiple a network needs, and cropping its outputs back.

One rule for every model and runtime, so that a padded forward pass is the same computation
whether the network pads itself (:class:`PaddedForward`) or a TorchScript/ONNX predictor pads
for an exported graph: pad bottom and right up to the next multiple, ``reflect`` (``replicate``
when the padding would not be smaller than the input, which reflect cannot do).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """``(N, C, H, W)`` -> ``((N, C, H', W'), (H, W))`` with ``H'``, ``W'`` the next multiples of
    ``multiple``; returns ``x`` itself when nothing needs padding."""
    h, w = int(x.shape[-2]), int(x.shape[-1])
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph or pw:
        mode = "reflect" if ph < h and pw < w else "replicate"
        x = F.pad(x, (0, pw, 0, ph), mode=mode)
    return x, (h, w)


class PaddedForward:
    """Mixin of a network whose ``forward_unpadded`` needs sizes that are multiples of
    ``input_multiple``: ``forward`` pads to it (:func:`pad_to_multiple`) and crops the output back,
    so any ``H x W`` works. Exports trace ``forward_unpadded`` (see :mod:`segcore.models.export`)."""

    input_multiple: int = 1

    def forward_unpadded(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded, (h, w) = pad_to_multiple(x, self.input_multiple)
        return self.forward_unpadded(padded)[..., :h, :w]


__all__ = ["PaddedForward", "pad_to_multiple"]
