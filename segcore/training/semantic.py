"""Supervised training of a semantic UNet from in-memory arrays (no orchestration here).

:func:`train_semantic` takes ``(N, H, W, C)`` raw images and ``(N, H, W)`` class maps, holds out
a seeded validation split, and trains with cross-entropy + soft Dice (foreground classes) under
seeded flip / rot90 augmentation, in the loop of :func:`segcore.training.loop.fit`. Inputs go
through :func:`segcore.normalise.normalise_batch`, the very function inference uses. After each
epoch the validation split is segmented through the prediction seam
(:class:`segcore.models.predict.TorchPredictor`, fp32, argmax of the logits) and its Dice per class
measured (:mod:`segcore.metrics.dice`); the weights of the epoch with the best mean foreground Dice
are returned, with a :class:`~segcore.models.checkpoint.ModelMeta` that describes them. With
``val_fraction`` 0 nothing is held out: every image is trained on, no epoch is scored, and the last
epoch's weights are returned.

Same inputs, same seed and same number of torch threads give the same weights.

:func:`fit_semantic_arrays` is that recipe without its 2-D parts (patch sampling, augmentation,
the architecture): :func:`train_semantic` and :func:`segcore.training.volumes.train_volumes` (3-D
volumes, a volumetric architecture) each call it with their own.

The ``DEMO_*`` constants are the settings ``segflow demo`` uses with the synthetic collection of
:mod:`segcore.synthetic`; they were chosen to reach a held-out mean foreground Dice well above
0.90 in about a minute of training on 2 CPU cores (see :data:`DEMO_EPOCHS`).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from functools import partial
from types import MappingProxyType
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from segcore.errors import ConfigError
from segcore.models import MODEL_KINDS, create_model, spatial_dims_of
from segcore.models.checkpoint import INPUT_AXES, ModelMeta
from segcore.models.predict import TorchPredictor
from segcore.normalise import Normalisation, normalise_batch
from segcore.normalise_fit import describe, fit_normalisation
from segcore.training.inputs import as_nhwc, check_semantic_inputs, seeded_split
from segcore.training.loop import FitResult, Validation, fit, seeded_torch
from segcore.training.recipe import PatchSampler, SplitKind, augment, split_indices
from segcore.training.settings import AUGMENTATIONS, Recipe
from segcore.training.validation import (classes_present, decide_largest_region, foreground_mean, no_validation,
                                        pooled_dice, refit_on_all)

log = logging.getLogger(__name__)

#: Side length (pixels) of the demo's synthetic images.
DEMO_IMAGE_SIZE = 128
#: Number of synthetic images the demo generates (training part and held-out part together).
DEMO_N_IMAGES = 360
#: Of those, how many the demo trains on (the rest are held out for segmentation and Dice).
DEMO_N_TRAIN = 240
#: UNet width and depth for the demo (``in_channels``/``num_classes`` come from the data).
DEMO_ARCH_KWARGS: Mapping[str, Any] = MappingProxyType({"base": 16, "depth": 3})
#: Measured on 2 idle CPU cores (torch 2 threads, 204 training + 36 validation images of
#: 128 x 128): about 5 s per epoch, 50 s in all, held-out mean foreground Dice about 0.98.
DEMO_EPOCHS = 10
DEMO_BATCH_SIZE = 8
DEMO_LR = 3e-3
#: 8-bit synthetic images: divide by 255.
DEMO_NORMALISATION = Normalisation(mode="range", scale=255.0)
#: Training stops after the epoch that passes this many seconds.
DEMO_TIME_BUDGET_S = 120.0


def segmentation_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy + (1 - mean soft Dice of the foreground classes), over the whole batch.

    Args:
        logits: ``(B, K, H, W)`` (or ``(B, K, D, H, W)``) float scores.
        target: ``(B, H, W)`` (or ``(B, D, H, W)``) int64 labels in ``[0, K)``; class 0 is background.
    """
    ce = F.cross_entropy(logits, target)
    probs = logits.softmax(dim=1)[:, 1:]
    onehot = F.one_hot(target, logits.shape[1]).movedim(-1, 1)[:, 1:].to(probs.dtype)
    dims = (0, *range(2, logits.ndim))
    inter = (probs * onehot).sum(dim=dims)
    total = probs.sum(dim=dims) + onehot.sum(dim=dims)
    soft_dice = (2 * inter + 1.0) / (total + 1.0)
    return ce + (1.0 - soft_dice.mean())


#: Draws one training batch on the CPU: ``(rng, size) -> (x (B, C, *patch) float32, y (B, *patch) int64)``.
BatchDraw = Callable[[np.random.Generator, int], tuple[torch.Tensor, torch.Tensor]]


def train_semantic(
    images: np.ndarray,
    masks: np.ndarray,
    *,
    class_names: Sequence[str],
    arch_kwargs: Mapping[str, Any],
    normalisation: Normalisation,
    epochs: int,
    batch_size: int = 16,
    lr: float = 3e-3,
    val_fraction: float = 0.15,
    seed: int = 0,
    progress: Callable[[dict], None] | None = None,
    time_budget_s: float | None = None,
    init: nn.Module | None = None,
    ids: Sequence[str] | None = None,
    val_split: SplitKind = "random",
    group_pattern: str | None = None,
    recipe: Recipe = Recipe(),
) -> tuple[nn.Module, ModelMeta, list[dict]]:
    """Train a semantic UNet; returns ``(model, meta, history)``.

    Args:
        images: ``(N, H, W, C)`` raw images of any numeric dtype (``(N, H, W)`` means C = 1).
        masks: ``(N, H, W)`` integer class labels in ``[0, len(class_names))``.
        class_names: class names, background first; their number is the model's output count.
        arch_kwargs: UNet options such as ``{"base": 16, "depth": 3}`` (copied, never changed);
            ``in_channels`` and ``num_classes`` follow from the data and must not be given.
        normalisation: how raw values become model inputs; an unfitted ``zscore``/``ct`` scheme is
            fitted on the training split (:func:`segcore.normalise_fit.fit_normalisation`). The
            fitted scheme is stored in the returned meta.
        epochs: number of passes over the training split (each ``n_train`` patches).
        batch_size: patches per optimiser step.
        lr: peak learning rate of AdamW.
        val_fraction: fraction of the images held out for validation, in [0, 1); any fraction above
            0 holds out at least one image. 0 holds out none: every image is trained on, the last
            epoch is kept, the history has no ``val_*`` entries and the provenance records
            ``n_val`` 0, ``best_epoch``/``val_dice``/``val_dice_mean_fg`` ``None``, ``val_split``
            ``None`` (no split is made, whatever ``val_split`` asks) and ``largest_region`` ``auto``
            stays off (nothing to decide by); ``recipe.refit`` is then refused.
        seed: seeds the split, the weight initialisation, the sampling and the augmentation.
        progress: called once per epoch with that epoch's history record.
        time_budget_s: stop after the epoch during which this many seconds have passed.
        init: a UNet to start from (fine-tuning; trained in place), built with ``arch_kwargs``,
            ``in_channels`` of the images and ``len(class_names)`` classes; ``None``: random weights.
        ids: image ids (default ``img_0``, ``img_1``, ...); the ``tail`` and ``group`` splits use them.
        val_split: ``random``, ``tail`` (the last ids in natural order) or ``group`` (whole groups of
            ``group_pattern``), see :func:`segcore.training.recipe.split_indices`.
        group_pattern: regular expression naming an image's group in its id (``group`` split).
        recipe: patch size, foreground share, augmentation, schedule, device and precision.

    Returns:
        The model in eval mode with the weights of the best epoch (highest mean foreground
        validation Dice, pooled over the validation images; with ``recipe.refit``, the model trained
        again on every image for that many epochs, :func:`segcore.training.validation.refit_on_all`,
        whose record the provenance keeps under ``refit``; with ``val_fraction`` 0, the last epoch),
        its :class:`ModelMeta` (``provenance`` records the run) and the history: one record per
        epoch run, ``{"epoch", "loss", "val_dice" (name -> pooled Dice), "val_dice_mean_fg", "lr",
        "seconds", "elapsed_s"}`` (seconds are wall-clock; no ``val_*`` entries with
        ``val_fraction`` 0).
    """
    full = recipe.augmentation == "full"

    def draws(x_train: torch.Tensor, y_train: torch.Tensor, train_masks: np.ndarray) -> BatchDraw:
        sampler = PatchSampler(train_masks, patch=recipe.patch_size, num_classes=len(class_names),
                               fg_fraction=recipe.fg_fraction)

        def draw(rng: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = sampler.crop(x_train, y_train, sampler.batch(rng, size))
            return augment(x, y, rng, full=full)

        return draw

    return fit_semantic_arrays(
        as_nhwc(images), masks, arch="unet", draws=draws, class_names=class_names, arch_kwargs=arch_kwargs,
        normalisation=normalisation, epochs=epochs, batch_size=batch_size, lr=lr, val_fraction=val_fraction,
        seed=seed, progress=progress, time_budget_s=time_budget_s, init=init, ids=ids, val_split=val_split,
        group_pattern=group_pattern, recipe=recipe,
        provenance={"trainer": "segcore.training.semantic.train_semantic",
                    "augmentation": AUGMENTATIONS[recipe.augmentation]},
    )


def fit_semantic_arrays(
    images: np.ndarray,
    masks: np.ndarray,
    *,
    arch: str,
    draws: Callable[[torch.Tensor, torch.Tensor, np.ndarray], BatchDraw],
    provenance: Mapping[str, Any],
    class_names: Sequence[str],
    arch_kwargs: Mapping[str, Any],
    normalisation: Normalisation,
    epochs: int,
    batch_size: int,
    lr: float,
    val_fraction: float,
    seed: int,
    progress: Callable[[dict], None] | None,
    time_budget_s: float | None,
    init: nn.Module | None,
    ids: Sequence[str] | None,
    val_split: SplitKind,
    group_pattern: str | None,
    recipe: Recipe,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> tuple[nn.Module, ModelMeta, list[dict]]:
    """What :func:`train_semantic` (images) and :func:`segcore.training.volumes.train_volumes`
    (volumes) share: validation of the arguments, the split, the normalisation (fitted on the
    training split; a volume's statistics are its own), the model (registered semantic ``arch``,
    seeded), :func:`segcore.training.loop.fit` with :func:`segmentation_loss`, validation through
    :class:`~segcore.models.predict.TorchPredictor` (pooled Dice per class, best epoch kept; none
    with ``val_fraction`` 0, :func:`~segcore.training.validation.no_validation`: last epoch kept), the
    meta (``input_axes`` ``bcyx`` or ``bczyx`` by the architecture's ``spatial_dims``) and the
    provenance. Returns ``(model, meta, history)`` as :func:`train_semantic` does.

    Args:
        images: channel-last raw ``(N, H, W, C)`` images, or ``(N, D, H, W, C)`` volumes for a
            volumetric ``arch`` (:func:`segcore.models.spatial_dims_of`).
        masks: ``(N, H, W)`` or ``(N, D, H, W)`` integer class labels.
        arch: a registered semantic architecture whose spatial dimensionality is that of ``images``.
        draws: ``(x_train (N, C, *S) normalised float32, y_train (N, *S) int64, train masks
            (N, *S) as given) -> draw``: the patch sampling and augmentation of the trainer; the
            split's generator (seeded with ``seed``) is passed to each call of ``draw``.
        provenance: entries the trainer adds to the record (at least ``trainer`` and ``augmentation``).
        memory_format: layout of the model's weights and of the batches while training (e.g.
            ``torch.channels_last_3d``, faster for 3-D convolutions on the CPU); values are unchanged.
        Other arguments: see :func:`train_semantic` (``recipe.patch_size`` and
            ``recipe.augmentation`` matter only to ``draws``).
    """
    masks = np.asarray(masks)
    arch_kwargs = dict(arch_kwargs)
    class_names = tuple(class_names)
    if MODEL_KINDS.get(arch) != "semantic":
        names = sorted(k for k, v in MODEL_KINDS.items() if v == "semantic")
        raise ConfigError(f"{arch!r} is not a registered semantic model; choose one of {', '.join(names)}")
    dims = spatial_dims_of(arch)
    noun = "image" if dims == 2 else "volume"
    if images.ndim != dims + 2:
        layout = "(N, H, W, C) images" if dims == 2 else "(N, D, H, W, C) volumes"
        raise ConfigError(f"model {arch!r} trains on {layout}, got an array of shape {images.shape}")
    n_train, n_val = check_semantic_inputs(
        images, masks, class_names=class_names, arch_kwargs=arch_kwargs, epochs=epochs, batch_size=batch_size,
        lr=lr, val_fraction=val_fraction, time_budget_s=time_budget_s, refit=recipe.refit, noun=noun,
    )
    if dims != 2 and recipe.largest_region == "on":  # before training, not after it
        raise ConfigError("keeping the largest foreground region applies to 2-D models only")
    prefix = "img" if dims == 2 else "vol"
    ids = [f"{prefix}_{i}" for i in range(images.shape[0])] if ids is None else list(ids)
    if len(ids) != images.shape[0]:
        raise ConfigError(f"{len(ids)} ids for {images.shape[0]} {noun}s; give one id per {noun}")
    num_classes, in_channels = len(class_names), images.shape[-1]
    device = torch.device(recipe.device)
    t0 = time.perf_counter()

    if not n_val:  # nothing held out: no split to make, whichever kind was asked
        log.info("no validation (val_fraction 0): training on all %d %s(s), the last epoch is kept", n_train, noun)
        val_split, group_pattern = None, None
    if val_split in ("random", None):
        rng, train_idx, val_idx = seeded_split(images.shape[0], n_val, seed)
    else:
        rng = np.random.default_rng(seed)
        train_idx, val_idx = split_indices(ids, n_val=n_val, rng=rng, how=val_split, group_pattern=group_pattern)
    n_train = len(train_idx)
    # Fitted per pixel: a volume enters as the image of its stacked slices.
    width = images.shape[-2]
    normalisation = fit_normalisation(normalisation, images[train_idx].reshape(n_train, -1, width, in_channels),
                                      masks[train_idx].reshape(n_train, -1, width))
    log.info("normalisation: %s", describe(normalisation))
    x_train = normalise_batch(images[train_idx], normalisation)
    y_train = torch.from_numpy(masks[train_idx].astype(np.int64))
    x_val, y_val = images[val_idx], masks[val_idx]
    present = classes_present(y_val, num_classes)  # the mean leaves out classes absent from the validation images
    absent = [name for name, here in zip(class_names[1:], present[1:]) if not here]
    if n_val and absent:
        log.warning("class(es) %s have no pixel in the %d validation image(s): left out of the validation mean "
                    "(their Dice says nothing of the model)", ", ".join(absent), n_val)
    unseen = [name for name, here in zip(class_names[1:], classes_present(masks[train_idx], num_classes)[1:])
              if not here]
    if unseen:
        log.warning("%d of the %d foreground class(es) have no pixel in the training images (%s): the model cannot "
                    "learn them; labels such as 0/255 masks make a class of every value up to the largest (give "
                    "masks of labels 0..K, or --class-names)", len(unseen), num_classes - 1,
                    ", ".join(unseen[:5]) + (", ..." if len(unseen) > 5 else ""))
    meta = ModelMeta(arch=arch, arch_kwargs=arch_kwargs, class_names=class_names, in_channels=in_channels,
                     normalisation=normalisation, input_axes=INPUT_AXES[dims])
    def batches_of(draw: BatchDraw, n_images: int) -> tuple[int, Callable[[], Iterator[Any]]]:
        """``(steps per epoch, batches)`` for an epoch of ``n_images`` images (at least
        ``recipe.min_epoch_patches`` patches) drawn by ``draw``."""
        per_epoch = max(n_images, recipe.min_epoch_patches)  # patches drawn per epoch
        steps = math.ceil(per_epoch / batch_size)

        def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            for step in range(steps):
                x, y = draw(rng, min(batch_size, per_epoch - step * batch_size))
                x = x.contiguous(memory_format=memory_format)
                if device.type == "cuda":
                    x, y = x.pin_memory(), y.pin_memory()
                yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

        return steps, batches

    def loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        x, y = batch
        return {"loss": segmentation_loss(model(x).float(), y)}

    def validate(model: nn.Module) -> Validation:
        if not n_val:
            return no_validation(model)
        predictor = TorchPredictor(model, meta, device=str(device), precision="fp32")
        pred = predictor.labels(x_val, batch_size=max(batch_size, 32) if dims == 2 else 1)
        per_class = pooled_dice(pred, y_val, num_classes)
        scores = {"val_dice": {name: float(d) for name, d in zip(class_names, per_class)},
                  "val_dice_mean_fg": foreground_mean(per_class, present)}
        summary = ", ".join(f"{name} {d:.3f}" + ("" if here else " (absent)")
                            for name, d, here in zip(class_names[1:], per_class[1:], present[1:]))
        return Validation(fields=scores, score=scores["val_dice_mean_fg"], details=scores,
                          summary=f"val mean foreground Dice {scores['val_dice_mean_fg']:.4f} ({summary})")

    def train(model: nn.Module | None, draw: BatchDraw, n_images: int, n_epochs: int,
              check: Callable[[nn.Module], Validation], report: Callable[[dict], None] | None
              ) -> tuple[nn.Module, FitResult]:
        """``model`` (``None``: a new one, seeded) trained on ``n_images`` drawn by ``draw``."""
        with seeded_torch(seed):  # the weights; the loop itself draws nothing from torch's generator
            if model is None:
                model = create_model(arch, in_channels=in_channels, num_classes=num_classes, **arch_kwargs)
            model = model.to(device, memory_format=memory_format)
            steps, batches = batches_of(draw, n_images)
            return model, fit(model, epochs=n_epochs, steps_per_epoch=steps, batches=batches, loss=loss,
                              validate=check, lr=lr, time_budget_s=time_budget_s, progress=report, started=t0,
                              schedule=recipe.schedule, warmup_fraction=recipe.warmup_fraction, device=device,
                              precision=recipe.precision)

    start = copy.deepcopy(init) if init is not None and recipe.refit else None  # the refit starts there too
    model, result = train(init, draws(x_train, y_train, masks[train_idx]), n_train, epochs, validate, progress)
    meta, largest = decide_largest_region(model, meta, recipe.largest_region,
                                          result.best.details.get("val_dice_mean_fg"), x_val=x_val, y_val=y_val,
                                          device=device, batch_size=batch_size, dims=dims)
    refit = None
    if recipe.refit:
        model, refit = refit_on_all(
            model, result, lambda report: train(start, draws(normalise_batch(images, normalisation),
                                                             torch.from_numpy(masks.astype(np.int64)), masks),
                                                images.shape[0], result.best_epoch,
                                                partial(no_validation, summary="refit on every image"), report),
            n_images=images.shape[0], progress=progress,
            spent=result.stopped_early or (time_budget_s is not None and time.perf_counter() - t0 >= time_budget_s))
    record = {
        "epochs": int(epochs),
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
        "time_budget_s": time_budget_s,
        "seed": int(seed),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "loss": "cross_entropy + soft_dice(foreground)",
        "recipe": recipe.model_dump(mode="json"),
        **provenance,
        "normalisation": describe(normalisation),
        "val_fraction": float(val_fraction),
        "val_split": val_split,
        "group_pattern": group_pattern,
        "val_ids": [ids[i] for i in val_idx],
        "n_train": int(n_train),
        "n_val": int(len(val_idx)),
        # Nothing held out: no best epoch and no figures; the weights are the last epoch's (epochs_run).
        "best_epoch": result.best_epoch if n_val else None,
        "val_dice": result.best.details.get("val_dice"),
        "val_dice_mean_fg": result.best.details.get("val_dice_mean_fg"),
        "val_absent": absent if n_val else None,  # classes without a pixel in the validation images: not in the mean
        "largest_region": largest,
        **({} if refit is None else {"refit": refit}),
        "seconds": round(time.perf_counter() - t0, 3),
        "torch_version": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    return model.cpu().eval(), meta.model_copy(update={"provenance": record}), result.history


__all__ = [
    "BatchDraw",
    "DEMO_ARCH_KWARGS",
    "DEMO_BATCH_SIZE",
    "DEMO_EPOCHS",
    "DEMO_IMAGE_SIZE",
    "DEMO_LR",
    "DEMO_NORMALISATION",
    "DEMO_N_IMAGES",
    "DEMO_N_TRAIN",
    "DEMO_TIME_BUDGET_S",
    "Recipe",
    "fit_semantic_arrays",
    "segmentation_loss",
    "train_semantic",
]
