"""How per-pixel class labels follow from a semantic model's raw output (the model meta's ``output``).

Segflow's own networks give one logit per class and the label is their argmax. Models from
elsewhere (bioimage.io packages) may give one probability channel, or need postprocessing first:
:class:`OutputRule` records that, and :func:`class_scores` turns the raw ``(N, C, H, W)`` output into
``(N, K, H, W)`` class scores whose argmax is the label, so that every consumer of logits (whole
images, blended tiles, TTA) stays as it is. After the argmax, :attr:`OutputRule.largest_region`
may keep only each image's largest connected foreground region (:func:`keep_largest_region`).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict
from scipy import ndimage

from segcore.normalise import Step, apply_steps


class OutputRule(BaseModel):
    """``rule="argmax"``: one channel per class, background first; the label is the channel of the
    largest value (after ``steps``). ``rule="threshold"``: one channel; after ``steps`` (e.g. a
    sigmoid), foreground (class 1) where the value is greater than ``threshold``.

    ``largest_region``: after that, keep only the largest connected region of foreground (every
    class but background, taken together) of each whole image, the rest becoming background
    (:func:`keep_largest_region`); for one object per image, such as an organ. ``segflow train``
    turns it on when it raises the validation Dice. Blocks of a tiled image are labelled without it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rule: Literal["argmax", "threshold"] = "argmax"
    threshold: float = 0.5
    steps: tuple[Step, ...] = ()
    largest_region: bool = False


def class_scores(out: torch.Tensor, rule: OutputRule) -> torch.Tensor:
    """Raw ``(N, C, H, W)`` model output -> ``(N, K, H, W)`` scores whose argmax over ``K`` is the label.

    ``argmax``: ``out`` after ``rule.steps`` (``K = C``). ``threshold``: ``C`` must be 1; the scores
    are ``[threshold, value]`` per pixel (``K = 2``), so argmax gives 1 exactly where the value
    exceeds the threshold (a tie goes to background).
    """
    if rule.steps:
        out = apply_steps(out.to(torch.float32), rule.steps)
    if rule.rule == "argmax":
        return out
    if out.shape[1] != 1:
        raise ValueError(f"a threshold output rule needs a one-channel output, got {out.shape[1]} channels")
    return torch.cat([torch.full_like(out, rule.threshold), out], dim=1)


def keep_largest_region(labels: np.ndarray) -> np.ndarray:
    """``(N, H, W)`` class labels with, in each image, only the largest connected foreground region
    kept (labels > 0 together; pixels joined by their edges); other foreground pixels become 0. A tie
    keeps the region met first in raster order. Returns a new array; images without foreground are
    unchanged."""
    out = np.array(labels, copy=True)
    for image in out:
        regions, n = ndimage.label(image > 0)
        if n > 1:
            sizes = np.bincount(regions.ravel())
            sizes[0] = 0
            image[(regions != int(np.argmax(sizes))) & (regions > 0)] = 0
    return out


__all__ = ["OutputRule", "class_scores", "keep_largest_region"]
