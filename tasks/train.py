"""Thin Prefect task that trains one model on a worker and saves its checkpoint."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from segcore.models.checkpoint import save_checkpoint
from segcore.config import TrainSpec, train_defaults
from segcore.errors import ConfigError
from segcore.fsio import file_sha256
from segcore.collection.store import open_store, read_labelled
from segcore.training.semantic import train_semantic
from segcore.training.instance import train_instance
from tasks.progress import report


@task(name="train-model", task_run_name="train-{spec.model} [{spec.store}]", cache_policy=NO_CACHE)
def train_model(spec: TrainSpec, *, num_threads: int | None, command: str) -> dict[str, Any]:
    """Train on every labelled image of ``spec.store``; returns the checkpoint path, sha256 and history."""
    log = get_run_logger()
    if num_threads:
        torch.set_num_threads(num_threads)
    opts = train_defaults(spec.kind)
    opts.update({k: v for k, v in (("batch_size", spec.batch_size), ("lr", spec.lr)) if v is not None})
    opts["arch_kwargs"] = {**opts["arch_kwargs"], **(spec.arch_kwargs or {})}
    mask_kind = open_store(spec.store).mask_kind
    images, labels, ids = read_labelled(spec.store)

    def progress(rec: dict) -> None:
        scores = ", ".join(f"{k} {v:.3f}" for k, v in rec.items()
                           if k.startswith("val_") and isinstance(v, float))
        log.info("epoch %d/%d: loss %.4f, %s (%.1f s)", rec["epoch"], spec.epochs, rec["loss"], scores,
                 rec["seconds"])
        report("train", rec["epoch"], spec.epochs, f"loss {rec['loss']:.4f}, {scores}".rstrip(", "))

    common = dict(normalisation=spec.normalisation, epochs=spec.epochs, batch_size=opts["batch_size"],
                  lr=opts["lr"], val_fraction=spec.val_fraction, seed=spec.seed, progress=progress,
                  time_budget_s=spec.time_budget_s, arch_kwargs=opts["arch_kwargs"])
    if spec.kind == "instance":
        if mask_kind != "instance":
            raise ConfigError(f"{spec.model} learns from instance labels; ingest {spec.store} with --mask-kind instance")
        names = spec.class_names or ("background", "object")
        model, meta, history = train_instance(images, labels.astype(np.int64), arch=spec.model, class_names=names,
                                              crop_size=spec.crop_size, **common)
    else:
        if mask_kind == "instance":
            labels = (labels > 0).astype(labels.dtype)
        names = spec.class_names or ("background",) + tuple(f"class_{k}" for k in range(1, int(labels.max()) + 1))
        model, meta, history = train_semantic(images, labels.astype(np.int64), class_names=names, **common)
    provenance = dict(meta.provenance, command=command, store=spec.store, images=len(ids))
    meta = meta.model_copy(update={"provenance": provenance})
    path = save_checkpoint(spec.out, model, meta)
    best = ((provenance.get("val_scores") or {}).get("f1") if spec.kind == "instance"
            else provenance.get("val_dice_mean_fg"))
    return {"checkpoint": str(path), "sha256": file_sha256(path), "history": history, "kind": spec.kind,
            "best_val_score": best}
