"""Thin Prefect task that trains one model on a worker and saves its checkpoint."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from segcore.config import TrainSpec
from segcore.training.from_store import epoch_line, train_from_store
from segcore.models.predict import resolve_device
from tasks.progress import report


@task(name="train-model", task_run_name="train-{spec.model} [{spec.store}]", cache_policy=NO_CACHE)
def train_model(spec: TrainSpec, *, num_threads: int | None, command: str) -> dict[str, Any]:
    """Train on every labelled image of ``spec.store``; returns the checkpoint path, sha256, history,
    kind and best validation score (:class:`~segcore.training.from_store.TrainResult` as a dict)."""
    log = get_run_logger()
    if num_threads:
        torch.set_num_threads(num_threads)

    def on_epoch(rec: dict) -> None:  # a refit's records say so, with the refit's own epoch count
        total = rec.get("epochs", spec.epochs)
        message = epoch_line(rec, epochs=total)
        log.info("%s", message)
        report(rec.get("stage", "train"), rec["epoch"], total, message)

    result = train_from_store(
        store=spec.store, out=spec.out, model=spec.model, class_names=spec.class_names, arch_kwargs=spec.arch_kwargs,
        epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr, val_fraction=spec.val_fraction,
        crop_size=spec.crop_size, seed=spec.seed, time_budget_s=spec.time_budget_s,
        normalisation=spec.normalisation, command=command, on_epoch=on_epoch, init=spec.init, val_split=spec.val_split,
        group_pattern=spec.group_pattern, patch_size=spec.patch_size, schedule=spec.schedule,
        largest_region=spec.largest_region, min_epoch_patches=spec.min_epoch_patches, refit=spec.refit,
        device=resolve_device(spec.device), precision=spec.precision, overwrite=spec.overwrite)
    return dataclasses.asdict(result)
