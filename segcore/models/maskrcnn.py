"""Mask R-CNN instance segmenters (torchvision) behind segflow's keyword-only builders.

Two registered architectures, both built from scratch (no weights are ever downloaded:
``weights=None``, ``weights_backbone=None``, every backbone layer trainable, plain
``BatchNorm2d``):

- ``"maskrcnn"``: torchvision's ``maskrcnn_resnet50_fpn`` (ResNet-50 FPN);
- ``"maskrcnn_r18"``: a lighter ResNet-18 FPN backbone for CPUs, with anchors sized for small
  objects (nuclei of about 10-30 px).

Both return an :class:`InstanceSegmenter`, which takes segflow's ``(N, C, H, W)`` float batches.

Conventions:

- **Normalisation**: segflow normalises inputs itself (:mod:`segcore.normalise`), so
  torchvision's internal transform is given ``image_mean=0`` and ``image_std=1`` (an identity).
- **Resizing**: with ``min_size=max_size=None`` (default) images keep their input size (only
  zero padding to a multiple of 32, which torchvision removes again). With both given,
  torchvision's rule applies: the short side is scaled to ``min_size`` unless the long side would
  exceed ``max_size``; boxes and masks come back in input pixel coordinates either way.
- **Masks**: the internal transform never pastes masks. :meth:`InstanceSegmenter.detect` returns
  them in ROI form, ``(K, 1, 28, 28)`` probabilities over each (input-space) box, so that
  :func:`segcore.models.instances.instances_to_labels` can paste them one box at a time; ``forward`` in
  eval mode pastes them full-size with torchvision's ``paste_masks_in_image`` to keep
  torchvision's output contract.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
from torch import Tensor, nn
from torchvision.models.detection import MaskRCNN, maskrcnn_resnet50_fpn
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes

from segcore.errors import ConfigError
from segcore.models.instances import check_overlap_threshold

log = logging.getLogger(__name__)

#: Anchor sizes (px, one per FPN level: strides 4, 8, 16, 32, 64) of the ResNet-18 variant.
SMALL_OBJECT_ANCHORS: tuple[int, ...] = (8, 16, 32, 64, 128)
_ASPECT_RATIOS = (0.5, 1.0, 2.0)
_FPN_LEVELS = 5
_MAX_CLASSES = 256  # class maps are uint8


class InputTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform (identity normalisation unless ``image_mean``/``image_std``
    are given) with two changes: an optional no-resize mode (``keep_size``) and a ``postprocess`` that maps boxes back to input coordinates but leaves
    masks in ROI form ``(K, 1, M, M)`` instead of pasting them full-size."""

    def __init__(self, *, keep_size: bool, min_size: int, max_size: int,
                 image_mean: Sequence[float] = (0.0, 0.0, 0.0), image_std: Sequence[float] = (1.0, 1.0, 1.0)) -> None:
        super().__init__(min_size=min_size, max_size=max_size, image_mean=list(image_mean), image_std=list(image_std))
        self.keep_size = keep_size

    def resize(self, image: Tensor, target: dict[str, Tensor] | None = None
               ) -> tuple[Tensor, dict[str, Tensor] | None]:
        if self.keep_size:
            return image, target
        return super().resize(image, target)

    def postprocess(self, result: list[dict[str, Tensor]], image_shapes: list[tuple[int, int]],
                    original_image_sizes: list[tuple[int, int]]) -> list[dict[str, Tensor]]:
        if self.training:
            return result
        for pred, im_s, o_im_s in zip(result, image_shapes, original_image_sizes):
            pred["boxes"] = resize_boxes(pred["boxes"], im_s, o_im_s)
        return result


class InstanceSegmenter(nn.Module):
    """A torchvision Mask R-CNN that takes segflow batches.

    ``forward(x)`` with ``x`` a normalised float ``(N, in_channels, H, W)`` tensor (a 1-channel
    input is repeated to 3 channels):

    - eval mode: torchvision's ``list[dict]``, one per image: ``boxes (K, 4) float32`` (x0, y0,
      x1, y1 in input pixels), ``labels (K,) int64`` (1..num_classes-1), ``scores (K,) float32``
      (descending), ``masks (K, 1, H, W) float32`` probabilities pasted full-size;
    - train mode: ``forward(x, targets)`` with one dict per image (``boxes (K, 4) float32``,
      ``labels (K,) int64``, ``masks (K, H, W) uint8``; see
      :func:`segcore.models.instances.targets_from_instance_labels`) returns the loss dict
      (``loss_classifier``, ``loss_box_reg``, ``loss_mask``, ``loss_objectness``,
      ``loss_rpn_box_reg``; scalar tensors).

    For large images use :meth:`detect` (masks in ROI form) with
    :func:`segcore.models.instances.predict_instances` instead of the full-size pasted masks.
    """

    def __init__(self, detector: MaskRCNN, *, in_channels: int, num_classes: int, mask_threshold: float,
                 overlap_threshold: float | None = None) -> None:
        super().__init__()
        if not isinstance(detector.transform, InputTransform):
            raise ConfigError("InstanceSegmenter needs a detector whose transform is segcore's InputTransform; "
                              "build it with create_model('maskrcnn' or 'maskrcnn_r18', ...)")
        self.detector = detector
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.mask_threshold = mask_threshold
        self.overlap_threshold = overlap_threshold

    @property
    def score_threshold(self) -> float:
        """Detections scoring at or below this never leave the model (torchvision keeps ``score > t``)."""
        return float(self.detector.roi_heads.score_thresh)

    def _images(self, x: Tensor) -> list[Tensor]:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ConfigError(f"expected a (N, {self.in_channels}, H, W) batch, got shape {tuple(x.shape)}; "
                              "normalise images with segcore.normalise.normalise_batch")
        if not x.is_floating_point():
            raise ConfigError(f"expected a float batch (normalised), got dtype {x.dtype}")
        if self.in_channels == 1:
            x = x.expand(-1, 3, -1, -1)
        return list(x.unbind(0))

    def detect(self, x: Tensor) -> list[dict[str, Tensor]]:
        """Eval-mode detections with masks in ROI form.

        Returns one dict per image: ``boxes (K, 4) float32`` in input pixels, ``labels (K,)
        int64``, ``scores (K,) float32`` (descending, all above :attr:`score_threshold`) and
        ``masks (K, 1, 28, 28) float32`` probabilities over each box (paste them with
        :func:`segcore.models.instances.instances_to_labels`).
        """
        if self.training:
            raise ConfigError("detect() needs eval mode; call model.eval() first")
        return self.detector(self._images(x))

    def forward(self, x: Tensor, targets: list[dict[str, Tensor]] | None = None
                ) -> dict[str, Tensor] | list[dict[str, Tensor]]:
        if self.training:
            if targets is None or len(targets) != x.shape[0]:
                raise ConfigError("train mode needs one target dict per image: forward(x, targets); build them "
                                  "with segcore.models.instances.targets_from_instance_labels")
            return self.detector(self._images(x), targets)
        height, width = x.shape[-2:]
        detections = self.detect(x)
        for det in detections:
            det["masks"] = paste_masks_in_image(det["masks"], det["boxes"], (int(height), int(width)))
        return detections


def check_detector_args(*, in_channels: int, num_classes: int, min_size: int | None, max_size: int | None,
                  box_detections_per_img: int, score_threshold: float, mask_threshold: float,
                  proposals_per_img: int = 1000, overlap_threshold: float | None = None) -> None:
    check_overlap_threshold(overlap_threshold)
    if in_channels not in (1, 3):
        raise ConfigError(f"Mask R-CNN needs in_channels 1 or 3, got {in_channels}")
    if not 2 <= num_classes <= _MAX_CLASSES:
        raise ConfigError(f"Mask R-CNN needs 2 <= num_classes <= {_MAX_CLASSES} (background included), "
                          f"got {num_classes}")
    if (min_size is None) != (max_size is None):
        raise ConfigError("give both min_size and max_size, or neither to keep the input size")
    if min_size is not None and not 0 < min_size <= max_size:  # type: ignore[operator]
        raise ConfigError(f"need 0 < min_size <= max_size, got min_size={min_size}, max_size={max_size}")
    if box_detections_per_img < 1:
        raise ConfigError(f"box_detections_per_img must be >= 1, got {box_detections_per_img}")
    if proposals_per_img < 1:
        raise ConfigError(f"proposals_per_img must be >= 1, got {proposals_per_img}")
    for name, value in (("score_threshold", score_threshold), ("mask_threshold", mask_threshold)):
        if not 0.0 <= value < 1.0:
            raise ConfigError(f"{name} is a probability in [0, 1), got {value}")


def _anchor_generator(anchor_sizes: Sequence[int]) -> AnchorGenerator:
    sizes = tuple(int(s) for s in anchor_sizes)
    if len(sizes) != _FPN_LEVELS or any(s <= 0 for s in sizes):
        raise ConfigError(f"anchor_sizes needs {_FPN_LEVELS} positive sizes in px (one per FPN level, "
                          f"strides 4..64), got {tuple(anchor_sizes)}")
    return AnchorGenerator(sizes=tuple((s,) for s in sizes), aspect_ratios=(_ASPECT_RATIOS,) * _FPN_LEVELS)


def wrap_detector(detector: MaskRCNN, *, in_channels: int, num_classes: int, min_size: int | None,
                  max_size: int | None, mask_threshold: float, cls: type[InstanceSegmenter] = InstanceSegmenter,
                  image_mean: Sequence[float] = (0.0, 0.0, 0.0), image_std: Sequence[float] = (1.0, 1.0, 1.0),
                  overlap_threshold: float | None = None) -> InstanceSegmenter:
    """``detector`` with segcore's :class:`InputTransform` (no resizing when ``min_size`` is None;
    normalisation by ``image_mean``/``image_std``, identity by default) inside a ``cls``, which
    pastes its detections with ``overlap_threshold`` (see
    :func:`segcore.models.instances.instances_to_labels`)."""
    keep = min_size is None
    detector.transform = InputTransform(keep_size=keep, min_size=800 if keep else min_size,  # type: ignore[arg-type]
                                        max_size=1333 if keep else max_size,  # type: ignore[arg-type]
                                        image_mean=image_mean, image_std=image_std)
    return cls(detector, in_channels=in_channels, num_classes=num_classes, mask_threshold=mask_threshold,
               overlap_threshold=overlap_threshold)


def build_maskrcnn(*, in_channels: int = 1, num_classes: int = 2, min_size: int | None = None,
                   max_size: int | None = None, box_detections_per_img: int = 100,
                   anchor_sizes: Sequence[int] | None = None, score_threshold: float = 0.05,
                   mask_threshold: float = 0.5, proposals_per_img: int = 1000,
                   overlap_threshold: float | None = None) -> InstanceSegmenter:
    """Mask R-CNN with a ResNet-50 FPN backbone (torchvision's ``maskrcnn_resnet50_fpn``), untrained.

    ``num_classes`` includes the background. ``anchor_sizes`` (px, one per FPN level) defaults
    to torchvision's ``(32, 64, 128, 256, 512)``. ``score_threshold`` is the floor on detection
    scores (kept: ``score > score_threshold``); ``mask_threshold`` is the default probability
    above which a mask pixel is foreground. ``overlap_threshold`` (``None``: keep every detection,
    as torchvision does) drops a detection when higher-scoring ones already hold more than that
    share of its mask (:func:`segcore.models.instances.instances_to_labels`).
    ``box_detections_per_img`` caps the detections and ``proposals_per_img`` the region proposals
    (before and after their NMS) per image at inference; neither changes the weights, so a
    checkpoint can be rebuilt with larger caps for images holding more objects. See the module
    docstring for resizing.
    """
    check_detector_args(in_channels=in_channels, num_classes=num_classes, min_size=min_size, max_size=max_size,
                  box_detections_per_img=box_detections_per_img, score_threshold=score_threshold,
                  mask_threshold=mask_threshold, proposals_per_img=proposals_per_img,
                  overlap_threshold=overlap_threshold)
    extra: dict[str, Any] = {"rpn_pre_nms_top_n_test": proposals_per_img, "rpn_post_nms_top_n_test": proposals_per_img}
    if anchor_sizes is not None:
        extra["rpn_anchor_generator"] = _anchor_generator(anchor_sizes)
    detector = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=num_classes,
                                     box_detections_per_img=box_detections_per_img,
                                     box_score_thresh=score_threshold, **extra)
    return wrap_detector(detector, in_channels=in_channels, num_classes=num_classes, min_size=min_size,
                 max_size=max_size, mask_threshold=mask_threshold, overlap_threshold=overlap_threshold)


def build_maskrcnn_r18(*, in_channels: int = 1, num_classes: int = 2, min_size: int | None = None,
                       max_size: int | None = None, box_detections_per_img: int = 100,
                       anchor_sizes: Sequence[int] = SMALL_OBJECT_ANCHORS, score_threshold: float = 0.05,
                       mask_threshold: float = 0.5, proposals_per_img: int = 1000,
                       overlap_threshold: float | None = None) -> InstanceSegmenter:
    """Mask R-CNN with a ResNet-18 FPN backbone (all layers trainable), untrained; lighter on CPUs.

    Same arguments as :func:`build_maskrcnn`; ``anchor_sizes`` defaults to
    :data:`SMALL_OBJECT_ANCHORS` ``(8, 16, 32, 64, 128)`` px, suited to objects of about 10-30 px.
    """
    check_detector_args(in_channels=in_channels, num_classes=num_classes, min_size=min_size, max_size=max_size,
                  box_detections_per_img=box_detections_per_img, score_threshold=score_threshold,
                  mask_threshold=mask_threshold, proposals_per_img=proposals_per_img,
                  overlap_threshold=overlap_threshold)
    backbone = resnet_fpn_backbone(backbone_name="resnet18", weights=None, norm_layer=nn.BatchNorm2d,
                                   trainable_layers=5)
    detector = MaskRCNN(backbone, num_classes=num_classes, rpn_anchor_generator=_anchor_generator(anchor_sizes),
                        box_detections_per_img=box_detections_per_img, box_score_thresh=score_threshold,
                        rpn_pre_nms_top_n_test=proposals_per_img, rpn_post_nms_top_n_test=proposals_per_img)
    return wrap_detector(detector, in_channels=in_channels, num_classes=num_classes, min_size=min_size,
                 max_size=max_size, mask_threshold=mask_threshold, overlap_threshold=overlap_threshold)


__all__ = ["SMALL_OBJECT_ANCHORS", "InputTransform", "InstanceSegmenter", "build_maskrcnn", "build_maskrcnn_r18",
           "check_detector_args", "wrap_detector"]
