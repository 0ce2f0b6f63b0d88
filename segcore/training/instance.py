"""Supervised training of a Mask R-CNN instance segmenter from instance label images.

:func:`train_instance` takes ``(N, H, W, C)`` raw images and ``(N, H, W)`` instance label images
(0 = background, any positive ids), holds out a seeded validation split and trains under seeded
flip / rot90 augmentation (and, optionally, random crops of a larger image). The augmentation
moves image and labels alike; the training targets (boxes, classes, masks) are then derived from
the augmented labels by :func:`segcore.models.instances.targets_from_instance_labels`, so they always
match the image. Inputs go through :func:`segcore.normalise.normalise_batch`, the function
inference uses.

The loop itself (AdamW, one-cycle schedule, best epoch, time budget) is
:func:`segcore.training.loop.fit`. After each epoch the validation split is segmented through the
prediction seam (:class:`segcore.models.predict.TorchPredictor`, fp32) and scored by
:func:`~segcore.training.instance_scores.prediction_scores` (F1 at IoU 0.5, COCO AP, panoptic
quality, foreground Dice); the weights of the epoch with the highest validation F1 (then AP) are
returned with a :class:`~segcore.models.checkpoint.ModelMeta` that describes them.

Two training-only sampling settings of the detector, the RPN proposals per image and the box-head
samples per image, can be lowered (``proposals_per_image``, ``rois_per_image``): the mask head
runs on every positive box sample, and on a CPU it dominates a training step. They leave the
inference-time behaviour of the model untouched (it is the one its checkpoint rebuilds).

Same inputs, same seed and same number of torch threads give the same weights; the global torch
random state is left as it was.

The ``DEMO_INSTANCE_*`` constants are the settings a demo uses with
:func:`segcore.synthetic.generate_instance_collection` (measured figures at :data:`DEMO_INSTANCE_EPOCHS`).
"""

from __future__ import annotations

import logging
import math
import time
from types import MappingProxyType
from typing import Any, Callable, Iterator, Literal, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from segcore.errors import ConfigError
from segcore.models import MODEL_KINDS, create_model
from segcore.models.checkpoint import ModelMeta
from segcore.models.instances import targets_from_instance_labels
from segcore.models.predict import TorchPredictor
from segcore.normalise import Normalisation, normalise_batch
from segcore.normalise_fit import fit_normalisation
from segcore.training.inputs import RESERVED_ARCH_KEYS, as_nhwc, seeded_split
from segcore.training.instance_scores import VAL_KEYS, evaluate_instances, pooled_instance_scores, prediction_scores
from segcore.training.loop import Validation, fit, seeded_torch

log = logging.getLogger(__name__)

#: Demo settings (synthetic nuclei of :func:`segcore.synthetic.make_instance_sample`).
DEMO_INSTANCE_ARCH = "maskrcnn_r18"
#: Detections scoring 0.7 or less are dropped by the model itself (also in inference), and so is a
#: detection whose mask higher-scoring ones already hold more than half of.
DEMO_INSTANCE_ARCH_KWARGS: Mapping[str, Any] = MappingProxyType({"score_threshold": 0.7, "overlap_threshold": 0.5})
DEMO_INSTANCE_IMAGE_SIZE = 128
#: Images generated (training part and held-out part together) and, of those, trained on.
DEMO_INSTANCE_N_IMAGES = 240
DEMO_INSTANCE_N_TRAIN = 180
DEMO_INSTANCE_EPOCHS = 6
DEMO_INSTANCE_BATCH_SIZE = 4
DEMO_INSTANCE_LR = 1e-3
DEMO_INSTANCE_NORMALISATION = Normalisation(mode="range", scale=255.0)
#: Training stops after the epoch that passes this many seconds.
DEMO_INSTANCE_TIME_BUDGET_S = 480.0

#: Default training-only sampling: RPN proposals kept per image, box-head samples per image.
DEFAULT_PROPOSALS_PER_IMAGE = 500
DEFAULT_ROIS_PER_IMAGE = 64
#: Gradients are clipped to this global L2 norm.
GRAD_CLIP_NORM = 10.0

def _positive_int(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")


def _check_inputs(images: np.ndarray, labels: np.ndarray, *, arch: str, class_names: Sequence[str],
                  arch_kwargs: Mapping[str, Any], epochs: int, batch_size: int, lr: float, val_fraction: float,
                  crop_size: int | None, instance_classes: Sequence[Mapping[int, int]] | None,
                  time_budget_s: float | None) -> tuple[int, int]:
    """Validate the arguments of :func:`train_instance`; returns ``(n_train, n_val)``."""
    if MODEL_KINDS.get(arch) != "instance":
        names = sorted(k for k, v in MODEL_KINDS.items() if v == "instance")
        raise ConfigError(f"arch {arch!r} is not an instance segmenter; use one of {names}")
    n, height, width = images.shape[:3]
    if labels.shape != images.shape[:3]:
        raise ConfigError(f"labels must be (N, H, W) matching images {images.shape[:3]}, got {labels.shape}; "
                          "give one instance label image per image, same height and width")
    if labels.dtype.kind not in "iu":
        raise ConfigError(f"labels must hold integer instance ids, got dtype {labels.dtype}")
    if labels.size and int(labels.min()) < 0:
        raise ConfigError("labels must not hold negative ids; use 0 for background")
    if len(class_names) < 2:
        raise ConfigError(f"class_names needs background plus at least one class, got {tuple(class_names)}")
    if instance_classes is not None:
        if len(instance_classes) != n:
            raise ConfigError(f"instance_classes needs one id -> class mapping per image ({n}), "
                              f"got {len(instance_classes)}")
        for i, mapping in enumerate(instance_classes):
            missing = sorted(set(np.unique(labels[i]).tolist()) - {0} - {int(k) for k in mapping})
            if missing:
                raise ConfigError(f"instance_classes[{i}] has no class for instance id(s) {missing[:10]}; "
                                  "map every id of the image to a class")
        used = {int(c) for mapping in instance_classes for c in mapping.values()}
        if used and (min(used) < 1 or max(used) >= len(class_names)):
            raise ConfigError(f"instance classes must lie in [1, {len(class_names)}) for class_names "
                              f"{tuple(class_names)}, got {sorted(used)}")
    clash = sorted(set(arch_kwargs) & set(RESERVED_ARCH_KEYS))
    if clash:
        raise ConfigError(f"arch_kwargs must not set {clash}: they follow from the images and class_names")
    _positive_int("epochs", epochs)
    _positive_int("batch_size", batch_size)
    _positive_int("crop_size", crop_size, allow_none=True)
    if crop_size is not None and crop_size > min(height, width):
        raise ConfigError(f"crop_size {crop_size} exceeds the images ({height} x {width}); "
                          "give a smaller crop_size or None to train on whole images")
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be a positive number, got {lr!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"val_fraction must lie in [0, 1) (0 = no validation), got {val_fraction!r}")
    if time_budget_s is not None and not time_budget_s > 0:
        raise ConfigError(f"time_budget_s must be > 0 seconds or None (no limit), got {time_budget_s!r}")
    n_val = max(1, int(round(n * val_fraction))) if val_fraction > 0 else 0
    if n - n_val < 1:
        raise ConfigError(f"{n} image(s) leave none for training after a validation split of {val_fraction}; "
                          "give more images or lower val_fraction (0 trains on all and keeps the last epoch)")
    return n - n_val, n_val


def augment_instance_sample(image: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator, *,
                            crop_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A random crop (optional), rot90 and flip of one sample, applied alike to image and labels.

    Args:
        image: ``(C, H, W)`` float tensor.
        labels: ``(H, W)`` integer instance ids.
        rng: the random source (the result is a pure function of its state).
        crop_size: side of a random square window (``<= H, W``); ``None`` keeps the whole image.

    Returns ``(image, labels)``; rotations by 90 or 270 degrees only when the result is square.
    """
    if crop_size is not None:
        y0 = int(rng.integers(0, labels.shape[0] - crop_size + 1))
        x0 = int(rng.integers(0, labels.shape[1] - crop_size + 1))
        image = image[:, y0:y0 + crop_size, x0:x0 + crop_size]
        labels = labels[y0:y0 + crop_size, x0:x0 + crop_size]
    square = labels.shape[0] == labels.shape[1]
    k = int(rng.integers(0, 4)) if square else 2 * int(rng.integers(0, 2))
    flip = bool(rng.integers(0, 2))
    image, labels = torch.rot90(image, k, dims=(-2, -1)), torch.rot90(labels, k, dims=(-2, -1))
    if flip:
        image, labels = image.flip(-1), labels.flip(-1)
    return image.contiguous(), labels.contiguous()


def _set_training_sampling(model: nn.Module, *, proposals_per_image: int | None,
                           rois_per_image: int | None) -> dict[str, int]:
    """Lower the detector's training-only sampling (inference settings stay); returns what is used."""
    detector = model.detector  # type: ignore[attr-defined]
    rpn, sampler = detector.rpn, detector.roi_heads.fg_bg_sampler
    if proposals_per_image is not None:
        # torchvision keeps these per mode in private dicts; only the "training" entries change.
        rpn._pre_nms_top_n["training"] = int(proposals_per_image)
        rpn._post_nms_top_n["training"] = int(proposals_per_image)
    if rois_per_image is not None:
        sampler.batch_size_per_image = int(rois_per_image)
    return {"proposals_per_image": int(rpn._post_nms_top_n["training"]),
            "rois_per_image": int(sampler.batch_size_per_image)}


def train_instance(
    images: np.ndarray,
    labels: np.ndarray,
    *,
    arch: str = "maskrcnn_r18",
    arch_kwargs: Mapping[str, Any] = MappingProxyType({}),
    class_names: Sequence[str] = ("background", "object"),
    normalisation: Normalisation,
    epochs: int,
    batch_size: int = 4,
    lr: float = 1e-3,
    val_fraction: float = 0.15,
    seed: int = 0,
    crop_size: int | None = None,
    instance_classes: Sequence[Mapping[int, int]] | None = None,
    proposals_per_image: int | None = DEFAULT_PROPOSALS_PER_IMAGE,
    rois_per_image: int | None = DEFAULT_ROIS_PER_IMAGE,
    progress: Callable[[dict], None] | None = None,
    time_budget_s: float | None = None,
    init: nn.Module | None = None,
    device: str = "cpu",
    precision: Literal["fp32", "bf16", "fp16"] = "fp32",
    schedule: Literal["onecycle", "poly", "cosine"] = "onecycle",
) -> tuple[nn.Module, ModelMeta, list[dict]]:
    """Train a Mask R-CNN instance segmenter; returns ``(model, meta, history)``.

    Args:
        images: ``(N, H, W, C)`` raw images of any numeric dtype (``(N, H, W)`` means C = 1).
        labels: ``(N, H, W)`` integer instance ids, 0 = background (gaps in the ids allowed).
        arch: a registered instance architecture (``"maskrcnn_r18"`` or ``"maskrcnn"``).
        arch_kwargs: builder options (copied, never changed); ``in_channels`` and ``num_classes``
            follow from the data and must not be given.
        class_names: class names, background first.
        normalisation: how raw values become model inputs (applied to whole images, before any
            crop; stored in the returned meta).
        epochs: passes over the training split (with ``crop_size``: ``ceil(H * W / crop_size**2)``
            crops per image and epoch, about one pass over the pixels).
        batch_size: samples per optimiser step.
        lr: peak learning rate of AdamW (weight decay 1e-4) under a one-cycle schedule;
            gradients are clipped to :data:`GRAD_CLIP_NORM`.
        val_fraction: fraction of the images held out (seeded) for validation, in [0, 1); 0 trains
            on every image and keeps the last epoch (the ``val_*`` entries are then ``None``).
        seed: seeds the split, the weights, the shuffling, the crops and flips, and the detector's
            own sampling.
        crop_size: train on random ``crop_size`` squares (validation uses whole images).
        instance_classes: per image, instance id -> class id (``1..len(class_names)-1``);
            ``None`` makes every object class 1.
        proposals_per_image, rois_per_image: training-only detector sampling (see the module
            docstring); ``None`` keeps the architecture's own (2000 and 512 in torchvision).
        progress: called once per epoch with that epoch's history record.
        time_budget_s: stop after the epoch during which this many seconds have passed.
        init: a model of ``arch`` to start from (fine-tuning; trained in place), built with
            ``arch_kwargs``, the images' channels and ``len(class_names)`` classes; ``None``: random.
        device: where to train (``cpu``, ``cuda``, ``cuda:N``; resolved, not ``auto``); the returned
            model is on the CPU.
        precision: autocast dtype on CUDA (fp16 adds a gradient scaler); the CPU runs fp32.
        schedule: the learning-rate schedule (:func:`segcore.training.recipe.lr_factor`).

    Returns:
        The model in eval mode with the weights of the best epoch (highest validation F1, ties to
        the earlier), its :class:`ModelMeta` (``provenance`` records the run) and the history: one
        record per epoch run, ``{"epoch", "loss", "losses" (component name -> mean), "val_f1",
        "val_precision", "val_recall", "val_ap", "val_pq", "val_dice_fg", "lr", "seconds",
        "elapsed_s"}`` (seconds are wall-clock).
    """
    images = as_nhwc(images)
    labels = np.asarray(labels)
    arch_kwargs, class_names = dict(arch_kwargs), tuple(class_names)
    n_train, n_val = _check_inputs(
        images, labels, arch=arch, class_names=class_names, arch_kwargs=arch_kwargs, epochs=epochs,
        batch_size=batch_size, lr=lr, val_fraction=val_fraction, crop_size=crop_size,
        instance_classes=instance_classes, time_budget_s=time_budget_s)
    _positive_int("proposals_per_image", proposals_per_image, allow_none=True)
    _positive_int("rois_per_image", rois_per_image, allow_none=True)
    in_channels = images.shape[-1]
    t0 = time.perf_counter()

    rng, train_idx, val_idx = seeded_split(images.shape[0], n_val, seed)
    normalisation = fit_normalisation(normalisation, images[train_idx], labels[train_idx])  # zscore/ct only
    x_train = normalise_batch(images[train_idx], normalisation)
    y_train = torch.from_numpy(labels[train_idx].astype(np.int64))
    classes_train = [None if instance_classes is None else dict(instance_classes[i]) for i in train_idx]
    height, width = labels.shape[1:]
    per_image = 1 if crop_size is None else math.ceil(height * width / crop_size**2)
    samples = np.repeat(np.arange(n_train), per_image)

    meta = ModelMeta(arch=arch, arch_kwargs=arch_kwargs, class_names=class_names, in_channels=in_channels,
                     normalisation=normalisation)
    x_val, y_val = images[val_idx], labels[val_idx]

    def batches() -> Iterator[tuple[torch.Tensor, list[dict[str, torch.Tensor]]]]:
        perm = samples[rng.permutation(samples.size)]
        for start in range(0, perm.size, batch_size):
            chosen = perm[start:start + batch_size].tolist()
            views = [augment_instance_sample(x_train[i], y_train[i], rng, crop_size=crop_size) for i in chosen]
            targets = [targets_from_instance_labels(v[1], classes_train[i]) for v, i in zip(views, chosen)]
            yield (torch.stack([v[0] for v in views]).to(device, non_blocking=True),
                   [{k: t.to(device, non_blocking=True) for k, t in target.items()} for target in targets])

    def loss(model: nn.Module, batch: tuple[torch.Tensor, list[dict[str, torch.Tensor]]]) -> dict[str, torch.Tensor]:
        return model(*batch)

    def validate(model: nn.Module) -> Validation:
        if not n_val:
            return Validation(fields={f"val_{k}": None for k in VAL_KEYS}, score=None, summary="val F1 -")
        predictor = TorchPredictor(model, meta, device=str(next(model.parameters()).device), precision="fp32")
        scores = prediction_scores(predictor.instances(x_val, batch_size=batch_size), y_val)
        return Validation(fields={f"val_{k}": scores[k] for k in VAL_KEYS},
                          score=(scores["f1"], np.nan_to_num(scores["ap"], nan=0.0)),
                          summary=f"val F1 {scores['f1']:.4f}", details=dict(scores))

    with seeded_torch(seed):  # weights, and torchvision's box / anchor sampling during training
        model = (init if init is not None
                 else create_model(arch, in_channels=in_channels, num_classes=len(class_names), **arch_kwargs))
        sampling = _set_training_sampling(model, proposals_per_image=proposals_per_image,
                                          rois_per_image=rois_per_image)
        model = model.to(device)
        result = fit(model, epochs=epochs, steps_per_epoch=math.ceil(samples.size / batch_size), batches=batches,
                     loss=loss, validate=validate, lr=lr, fused=True, grad_clip_norm=GRAD_CLIP_NORM,
                     record_loss_parts=True, time_budget_s=time_budget_s, progress=progress, started=t0,
                     schedule=schedule, device=device, precision=precision)
    model = model.cpu()

    provenance = {
        "trainer": "segcore.training.instance.train_instance",
        "epochs": int(epochs),
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "time_budget_s": time_budget_s,
        "seed": int(seed),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "optimiser": f"AdamW(weight_decay=1e-4), {schedule}",
        "device": str(device),
        "precision": precision if str(device).startswith("cuda") else "fp32",
        "grad_clip_norm": GRAD_CLIP_NORM,
        "loss": "Mask R-CNN (classifier + box + mask + objectness + rpn box)",
        "augmentation": "flip, rot90" + (f", random {crop_size} px crops" if crop_size else ""),
        "crop_size": crop_size,
        "crops_per_image": per_image if crop_size else None,
        **sampling,
        "val_fraction": float(val_fraction),
        "val_split": "random" if n_val else None,
        "n_train": int(n_train),
        "n_val": int(n_val),
        "best_epoch": result.best_epoch,
        "val_scores": dict(result.best.details),
        "seconds": round(time.perf_counter() - t0, 3),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    return model, meta.model_copy(update={"provenance": provenance}), result.history


__all__ = [
    "DEFAULT_PROPOSALS_PER_IMAGE",
    "DEFAULT_ROIS_PER_IMAGE",
    "DEMO_INSTANCE_ARCH",
    "DEMO_INSTANCE_ARCH_KWARGS",
    "DEMO_INSTANCE_BATCH_SIZE",
    "DEMO_INSTANCE_EPOCHS",
    "DEMO_INSTANCE_IMAGE_SIZE",
    "DEMO_INSTANCE_LR",
    "DEMO_INSTANCE_NORMALISATION",
    "DEMO_INSTANCE_N_IMAGES",
    "DEMO_INSTANCE_N_TRAIN",
    "DEMO_INSTANCE_TIME_BUDGET_S",
    "GRAD_CLIP_NORM",
    "augment_instance_sample",
    "evaluate_instances",
    "pooled_instance_scores",
    "train_instance",
]
