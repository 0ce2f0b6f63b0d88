"""Padding inputs to the spatial multiple a network needs, and cropping its outputs back.

One rule for every model and runtime, so that a padded forward pass is the same computation
whether the network pads itself (:class:`PaddedForward`) or a TorchScript/ONNX predictor pads
for an exported graph: pad the end of every spatial axis (bottom and right of an image; also the
back of a volume) up to the next multiple, ``reflect`` (``replicate`` when the padding of some
axis would not be smaller than that axis, which reflect cannot do).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, multiple: int, *, minimum: int = 1,
                    spatial_dims: int = 2) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Pad the last ``spatial_dims`` axes of ``x`` to the next multiples of ``multiple`` that are
    at least ``minimum``; returns ``(padded, original sizes of those axes)``, ``x`` itself when
    nothing needs padding.

    ``spatial_dims=2``: ``(N, C, H, W)`` -> ``((N, C, H', W'), (H, W))``; ``spatial_dims=3``:
    ``(N, C, D, H, W)`` -> ``((N, C, D', H', W'), (D, H, W))``.
    """
    if spatial_dims not in (1, 2, 3) or x.ndim < spatial_dims + 1:
        raise ValueError(f"cannot pad {spatial_dims} spatial axes of a tensor of shape {tuple(x.shape)}")
    sizes = tuple(int(s) for s in x.shape[-spatial_dims:])
    pads = tuple((-max(s, minimum)) % multiple + max(minimum - s, 0) for s in sizes)
    if any(pads):
        mode = "reflect" if all(p < s for p, s in zip(pads, sizes)) else "replicate"
        # F.pad lists (before, after) pairs from the last axis backwards.
        x = F.pad(x, tuple(v for p in reversed(pads) for v in (0, p)), mode=mode)
    return x, sizes


def crop_to(x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
    """The leading ``sizes`` of the last ``len(sizes)`` axes of ``x`` (a view)."""
    return x[(Ellipsis, *(slice(0, s) for s in sizes))]


class PaddedForward:
    """Mixin of a network whose ``forward_unpadded`` needs sizes that are multiples of
    ``input_multiple``: ``forward`` pads its ``spatial_dims`` last axes to it
    (:func:`pad_to_multiple`) and crops the output back, so any ``H x W`` (or ``D x H x W``)
    works. Exports trace ``forward_unpadded`` (see :mod:`segcore.models.export`)."""

    input_multiple: int = 1
    #: Smallest padded side (networks whose instance norms need more than one pixel at the bottleneck).
    input_minimum: int = 1
    #: Number of spatial axes: 2 for ``(N, C, H, W)`` images, 3 for ``(N, C, D, H, W)`` volumes.
    spatial_dims: int = 2

    def forward_unpadded(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - overridden
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        padded, sizes = pad_to_multiple(x, self.input_multiple, minimum=self.input_minimum,
                                        spatial_dims=self.spatial_dims)
        return crop_to(self.forward_unpadded(padded), sizes)


__all__ = ["PaddedForward", "crop_to", "pad_to_multiple"]
