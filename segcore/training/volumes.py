"""Supervised training of a volumetric semantic model from in-memory volumes (no orchestration here).

:func:`train_volumes` is :func:`segcore.training.semantic.train_semantic` for 3-D data: raw
``(N, D, H, W, C)`` volumes and ``(N, D, H, W)`` class maps, any registered semantic architecture
whose builder says ``spatial_dims = 3`` (``unet3d`` by default). Both run
:func:`segcore.training.semantic.fit_semantic_arrays`: the same argument checks, seeded
validation split, normalisation (:func:`segcore.normalise.normalise_batch`, statistics per
volume), cross-entropy + soft Dice (:func:`~segcore.training.semantic.segmentation_loss`), loop
(:func:`segcore.training.loop.fit`), validation through the prediction seam (whole validation
volumes; Dice per class pooled over their voxels) and best-epoch weights (``val_fraction`` 0: no
validation, every volume trained on, the last epoch's weights; so one labelled volume can train a
model). What is 3-D here is the
batch: random patches of ``patch_size`` voxels (the recipe's ``fg_fraction`` of each batch centred
on a foreground voxel, :class:`~segcore.training.recipe.PatchSampler`), each flipped at random
along z, y and x (:func:`~segcore.training.recipe.flip_axes`). Weights and batches are kept
channels-last-3d while training (about 1.5x faster 3-D convolutions on the CPU).

The returned :class:`~segcore.models.checkpoint.ModelMeta` has ``input_axes="bczyx"``
(``meta.spatial_dims == 3``); :func:`segcore.models.checkpoint.save_checkpoint` writes it as
it writes a 2-D model, and :func:`~segcore.models.checkpoint.load_checkpoint` /
:func:`~segcore.models.predict.open_predictor` give it back, labelling ``(N, D, H, W, C)`` volumes.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from segcore.errors import ConfigError
from segcore.models.checkpoint import ModelMeta
from segcore.normalise import Normalisation
from segcore.training.inputs import as_ndhwc
from segcore.training.recipe import PatchSampler, SplitKind, flip_axes
from segcore.training.semantic import BatchDraw, fit_semantic_arrays
from segcore.training.settings import Recipe

log = logging.getLogger(__name__)

#: Default training patch ``(D, H, W)`` in voxels; a volume side no larger is taken whole.
DEFAULT_VOLUME_PATCH: tuple[int, int, int] = (32, 64, 64)
#: The augmentation of volume training (recorded in the provenance).
VOLUME_AUGMENTATION = "flip along z, y and x (p 0.5 each)"


def _patch_sides(patch_size: int | Sequence[int]) -> tuple[int, int, int]:
    sides = (patch_size,) * 3 if isinstance(patch_size, (int, np.integer)) else tuple(patch_size)
    if len(sides) != 3 or any(int(s) != s or s < 1 for s in sides):
        raise ConfigError(f"patch_size must be a positive integer or (D, H, W) positive integers, got {patch_size!r}")
    return int(sides[0]), int(sides[1]), int(sides[2])


def train_volumes(
    volumes: np.ndarray,
    masks: np.ndarray,
    *,
    class_names: Sequence[str],
    arch_kwargs: Mapping[str, Any],
    normalisation: Normalisation,
    epochs: int,
    arch: str = "unet3d",
    patch_size: int | Sequence[int] = DEFAULT_VOLUME_PATCH,
    batch_size: int = 2,
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
    """Train a volumetric semantic model; returns ``(model, meta, history)``.

    Args:
        volumes: ``(N, D, H, W, C)`` raw volumes of any numeric dtype (``(N, D, H, W)`` means C = 1).
        masks: ``(N, D, H, W)`` integer class labels in ``[0, len(class_names))``.
        class_names: class names, background first; their number is the model's output count.
        arch_kwargs: options of ``arch`` such as ``{"base": 8, "depth": 3}`` (copied, never
            changed); ``in_channels`` and ``num_classes`` follow from the data and must not be given.
        normalisation: how raw values become model inputs (``percentile``: per volume and channel;
            ``zscore``/``ct`` are fitted on the training volumes' voxels).
        epochs: number of passes over the training split (each ``n_train`` patches).
        arch: a registered semantic architecture with ``spatial_dims = 3`` (default ``unet3d``).
        patch_size: training patch in voxels, ``(D, H, W)`` or one side for all three axes.
        batch_size: patches per optimiser step.
        lr, val_fraction, seed, progress, time_budget_s, init, ids, val_split, group_pattern: as
            in :func:`segcore.training.semantic.train_semantic`, per volume (default ids ``vol_0``,
            ``vol_1``, ...); ``val_fraction`` 0 trains on every volume (one is enough) without
            validation and keeps the last epoch.
        recipe: foreground share, schedule, warm-up, device and precision; its ``patch_size`` and
            ``augmentation`` (2-D settings) are not used: ``patch_size`` above and flips along the
            three axes are.

    Returns:
        The model in eval mode with the weights of the best epoch (highest mean foreground Dice
        pooled over the validation volumes; the last epoch with ``val_fraction`` 0), its
        :class:`ModelMeta` (``input_axes="bczyx"``, ``provenance`` records the run, ``patch_size``
        and ``augmentation`` included) and the history (one record per epoch, as
        :func:`~segcore.training.semantic.train_semantic`'s).
    """
    patch = _patch_sides(patch_size)

    def draws(x_train: torch.Tensor, y_train: torch.Tensor, train_masks: np.ndarray) -> BatchDraw:
        sampler = PatchSampler(train_masks, patch=patch, num_classes=len(class_names), fg_fraction=recipe.fg_fraction)
        log.info("training patches of %s voxels from volumes of %s", "x".join(map(str, sampler.patch)),
                 "x".join(map(str, sampler.size)))

        def draw(rng: np.random.Generator, size: int) -> tuple[torch.Tensor, torch.Tensor]:
            x, y = sampler.crop(x_train, y_train, sampler.batch(rng, size))
            return flip_axes(x, y, rng)

        return draw

    used = recipe.model_dump(mode="json", exclude={"patch_size", "augmentation"})
    return fit_semantic_arrays(
        as_ndhwc(volumes), masks, arch=arch, draws=draws, class_names=class_names, arch_kwargs=arch_kwargs,
        normalisation=normalisation, epochs=epochs, batch_size=batch_size, lr=lr, val_fraction=val_fraction,
        seed=seed, progress=progress, time_budget_s=time_budget_s, init=init, ids=ids, val_split=val_split,
        group_pattern=group_pattern, recipe=recipe, memory_format=torch.channels_last_3d,
        provenance={"trainer": "segcore.training.volumes.train_volumes", "recipe": used,
                    "patch_size": list(patch), "augmentation": VOLUME_AUGMENTATION},
    )


__all__ = ["DEFAULT_VOLUME_PATCH", "VOLUME_AUGMENTATION", "train_volumes"]
