"""Thin Prefect task that trains one model on a worker and saves its checkpoint."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from segcore.checkpoint import save_checkpoint
from segcore.fileio import file_sha256
from segcore.config import TrainSpec
from segcore.store import read_labelled
from segcore.training import train_semantic


@task(name="train-model", task_run_name="train-{spec.model} [{spec.store}]", cache_policy=NO_CACHE)
def train_model(spec: TrainSpec, *, num_threads: int | None, command: str) -> dict[str, Any]:
    """Train on every labelled image of ``spec.store``; returns the checkpoint path, sha256 and history."""
    log = get_run_logger()
    if num_threads:
        torch.set_num_threads(num_threads)
    images, labels, ids = read_labelled(spec.store)
    names = spec.class_names or ("background",) + tuple(f"class_{k}" for k in range(1, int(labels.max()) + 1))

    def progress(rec: dict) -> None:
        dice = ", ".join(f"{k} {v:.3f}" for k, v in rec["val_dice"].items())
        log.info("epoch %d/%d: loss %.4f, val Dice %s (%.1f s)", rec["epoch"], spec.epochs, rec["loss"], dice,
                 rec["seconds"])

    model, meta, history = train_semantic(
        images, labels.astype(np.int64), class_names=names, arch_kwargs={"base": spec.base, "depth": spec.depth},
        normalisation=spec.normalisation, epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr,
        val_fraction=spec.val_fraction, seed=spec.seed, progress=progress, time_budget_s=spec.time_budget_s,
    )
    provenance = dict(meta.provenance, command=command, store=spec.store, images=len(ids))
    meta = meta.model_copy(update={"provenance": provenance})
    path = save_checkpoint(spec.out, model, meta)
    return {"checkpoint": str(path), "sha256": file_sha256(path), "history": history,
            "val_dice_mean_fg": provenance.get("val_dice_mean_fg")}
