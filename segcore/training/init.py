"""Fine-tuning: start training from a runnable torch model instead of random weights.

:func:`load_init` reads a torch-runtime model record (a segflow checkpoint, or a model imported
with ``segflow model import``), checks it fits the training run (architecture, input channels) and,
when the run's classes differ from the parent's, replaces the class-specific head with a freshly
initialised one (seeded): the UNet's final 1x1 (or 1x1x1) convolution; Mask R-CNN's box predictor (class
scores and per-class box deltas) and mask predictor. Everything else keeps the parent's weights.
The returned provenance names the parent by its content hash.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import nn

from segcore.errors import ConfigError, a_model
from segcore.models.checkpoint import ModelMeta, load_checkpoint
from segcore.models.record import model_sha256, read_model_meta

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InitModel:
    """A parent model ready to be trained further.

    Attributes:
        model: the module (train it in place), its head replaced if the classes changed.
        parent: the parent's metadata (architecture, options, normalisation, classes).
        provenance: ``{"path", "sha256", "arch", "class_names", "head_replaced"}`` for the child's record.
    """

    model: nn.Module
    parent: ModelMeta
    provenance: dict[str, Any]


def replace_head(model: nn.Module, *, arch: str, num_classes: int) -> None:
    """Give ``model`` a new, randomly initialised (torch's global generator) head of ``num_classes``
    outputs, background included: the UNet's 1x1 (1x1x1 for ``unet3d``) ``head``; Mask R-CNN's box
    and mask predictors."""
    if hasattr(model, "head") and isinstance(model.head, (nn.Conv2d, nn.Conv3d)):
        old = model.head
        model.head = type(old)(old.in_channels, num_classes, kernel_size=1)
        model.num_classes = num_classes
        return
    detector = getattr(model, "detector", None)
    if detector is not None and hasattr(detector, "roi_heads"):
        from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
        from torchvision.models.detection.mask_rcnn import MaskRCNNPredictor

        heads = detector.roi_heads
        heads.box_predictor = FastRCNNPredictor(heads.box_predictor.cls_score.in_features, num_classes)
        mask = heads.mask_predictor
        heads.mask_predictor = MaskRCNNPredictor(mask.conv5_mask.in_channels, mask.conv5_mask.out_channels, num_classes)
        model.num_classes = num_classes
        return
    raise ConfigError(f"segflow cannot replace the class head of architecture {arch!r}; fine-tune it with the "
                      "parent's classes (leave out --class-names)")


def load_init(path: str | os.PathLike[str], *, arch: str, in_channels: int, class_names: Sequence[str] | None,
              seed: int) -> InitModel:
    """The torch model of record ``path`` to train further with ``class_names`` (``None``: the parent's).

    Raises :class:`ConfigError` when the record is not a torch model (TorchScript/ONNX graphs are
    not trained), names another architecture than ``arch`` or takes another number of channels.
    """
    meta = read_model_meta(path)
    if meta.runtime != "torch":
        raise ConfigError(f"--init {os.fspath(path)!r} is {a_model(meta.runtime)}; fine-tuning starts from a torch "
                          "model (a segflow checkpoint or a state dict imported with 'segflow model import')")
    if meta.arch != arch:
        raise ConfigError(f"--init {os.fspath(path)!r} is a {meta.arch!r} model; pass --model {meta.arch}")
    if meta.in_channels != in_channels:
        raise ConfigError(f"--init {os.fspath(path)!r} takes {meta.in_channels} channel(s) but the images have "
                          f"{in_channels}")
    model, meta = load_checkpoint(path)
    names = tuple(class_names) if class_names is not None else meta.class_names
    replaced = names != meta.class_names
    if replaced:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            replace_head(model, arch=arch, num_classes=len(names))
        if len(names) == len(meta.class_names):  # perhaps a rename: the trained head is not kept, so say so
            log.warning("fine-tuning %s: class names %s differ from the parent's %s, so its class head is replaced "
                        "by a new one and what it learnt is not kept; give the parent's names (or leave "
                        "--class-names out) to keep it", path, ", ".join(names), ", ".join(meta.class_names))
        else:
            log.info("fine-tuning %s: classes %s replace %s (new head)", path, names, meta.class_names)
    provenance = {"path": os.fspath(path), "sha256": model_sha256(path), "arch": meta.arch,
                  "class_names": list(meta.class_names), "head_replaced": replaced}
    return InitModel(model=model.train(), parent=meta, provenance=provenance)


__all__ = ["InitModel", "load_init", "replace_head"]
