"""torchvision's Mask R-CNN builders, with state dicts keyed exactly as torchvision distributes them.

- ``torchvision:maskrcnn_resnet50_fpn`` and ``torchvision:maskrcnn_resnet50_fpn_v2``: the models
  of ``torchvision.models.detection`` (built with ``weights=None``; nothing is downloaded), so the
  file of ``torch.save(model.state_dict(), path)`` (torchvision's own weights files included)
  loads strictly. Inside a :class:`TorchvisionMaskRCNN`, an
  :class:`~segcore.models.maskrcnn.InstanceSegmenter` whose ``state_dict`` is the detector's.

Inputs as torchvision takes them: RGB floats in 0..1 (the normalisation of such a model is
``range`` with scale 255, :data:`TORCHVISION_NORMALISATION`), normalised inside the model by
ImageNet's mean and std; images resized as torchvision does (short side to ``min_size``, long
side at most ``max_size``; ``min_size=None`` keeps the input size). A 1-channel input is
repeated to 3 channels. Boxes, labels, scores and masks are torchvision's; masks stay in ROI form
until :func:`segcore.models.instances.instances_to_labels` pastes them, pixel for pixel as
torchvision's ``paste_masks_in_image`` does.

A weights file of the first version holds no ``num_batches_tracked`` buffers (its backbone used
``FrozenBatchNorm2d``); they are filled with zeros on loading (eval mode never reads them).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn
from torchvision.models.detection import (MaskRCNN_ResNet50_FPN_Weights, maskrcnn_resnet50_fpn,
                                          maskrcnn_resnet50_fpn_v2)

from segcore.models.maskrcnn import InstanceSegmenter, check_detector_args, wrap_detector
from segcore.normalise import IMAGENET_MEAN, IMAGENET_STD, Normalisation

#: torchvision's 91 COCO category names, background first ("N/A" for ids COCO does not use).
COCO_CATEGORIES: tuple[str, ...] = tuple(MaskRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"])
#: Inputs of torchvision's detection models: 0..1 floats (they normalise inside).
TORCHVISION_NORMALISATION = Normalisation(mode="range", scale=255.0)


class TorchvisionMaskRCNN(InstanceSegmenter):
    """An :class:`InstanceSegmenter` whose state dict is its torchvision detector's (no ``detector.`` prefix)."""

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        return self.detector.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        state = dict(state_dict)
        for name, module in self.detector.named_modules():
            key = f"{name}.num_batches_tracked"
            if isinstance(module, nn.BatchNorm2d) and key not in state and f"{name}.running_mean" in state:
                state[key] = torch.tensor(0, dtype=torch.long)
        return self.detector.load_state_dict(state, strict=strict, assign=assign)


def _build(factory: Any, *, in_channels: int, num_classes: int, min_size: int | None, max_size: int | None,
           box_detections_per_img: int, score_threshold: float, mask_threshold: float,
           proposals_per_img: int, overlap_threshold: float | None) -> TorchvisionMaskRCNN:
    check_detector_args(in_channels=in_channels, num_classes=num_classes, min_size=min_size, max_size=max_size,
                        box_detections_per_img=box_detections_per_img, score_threshold=score_threshold,
                        mask_threshold=mask_threshold, proposals_per_img=proposals_per_img,
                        overlap_threshold=overlap_threshold)
    detector = factory(weights=None, weights_backbone=None, num_classes=num_classes,
                       box_detections_per_img=box_detections_per_img, box_score_thresh=score_threshold,
                       rpn_pre_nms_top_n_test=proposals_per_img, rpn_post_nms_top_n_test=proposals_per_img)
    model = wrap_detector(detector, in_channels=in_channels, num_classes=num_classes, min_size=min_size,
                          max_size=max_size, mask_threshold=mask_threshold, cls=TorchvisionMaskRCNN,
                          image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, overlap_threshold=overlap_threshold)
    return model  # type: ignore[return-value]


def build_torchvision_maskrcnn(*, in_channels: int = 3, num_classes: int = 91, min_size: int | None = 800,
                               max_size: int | None = 1333, box_detections_per_img: int = 100,
                               score_threshold: float = 0.05, mask_threshold: float = 0.5,
                               proposals_per_img: int = 1000,
                               overlap_threshold: float | None = None) -> TorchvisionMaskRCNN:
    """torchvision's ``maskrcnn_resnet50_fpn`` with its defaults (91 COCO classes, resizing to
    800/1333, score floor 0.05, 100 detections, 1000 proposals, every detection kept); the
    arguments mean what they mean for :func:`segcore.models.maskrcnn.build_maskrcnn`."""
    return _build(maskrcnn_resnet50_fpn, in_channels=in_channels, num_classes=num_classes, min_size=min_size,
                  max_size=max_size, box_detections_per_img=box_detections_per_img, score_threshold=score_threshold,
                  mask_threshold=mask_threshold, proposals_per_img=proposals_per_img,
                  overlap_threshold=overlap_threshold)


def build_torchvision_maskrcnn_v2(*, in_channels: int = 3, num_classes: int = 91, min_size: int | None = 800,
                                  max_size: int | None = 1333, box_detections_per_img: int = 100,
                                  score_threshold: float = 0.05, mask_threshold: float = 0.5,
                                  proposals_per_img: int = 1000,
                                  overlap_threshold: float | None = None) -> TorchvisionMaskRCNN:
    """torchvision's ``maskrcnn_resnet50_fpn_v2``; arguments as :func:`build_torchvision_maskrcnn`."""
    return _build(maskrcnn_resnet50_fpn_v2, in_channels=in_channels, num_classes=num_classes, min_size=min_size,
                  max_size=max_size, box_detections_per_img=box_detections_per_img, score_threshold=score_threshold,
                  mask_threshold=mask_threshold, proposals_per_img=proposals_per_img,
                  overlap_threshold=overlap_threshold)


build_torchvision_maskrcnn.normalisation = TORCHVISION_NORMALISATION  # type: ignore[attr-defined]
build_torchvision_maskrcnn_v2.normalisation = TORCHVISION_NORMALISATION  # type: ignore[attr-defined]

__all__ = ["COCO_CATEGORIES", "IMAGENET_MEAN", "IMAGENET_STD", "TORCHVISION_NORMALISATION",
           "TorchvisionMaskRCNN", "build_torchvision_maskrcnn", "build_torchvision_maskrcnn_v2"]
