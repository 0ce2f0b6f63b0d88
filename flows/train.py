"""Training flow: one task trains on a worker and writes the best checkpoint (the last epoch's when
nothing is held out for validation) with its provenance."""

from __future__ import annotations

import shlex
import sys
from typing import Any

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from flows.artifacts import publish_training_artifacts

from flows.execution import torch_threads
from flows.names import train_run_name
from segcore.config import TrainSpec
from segcore.collection.store import open_store
from segcore.training.from_store import no_validation_note
from tasks.progress import relay_from_workers
from tasks.train import train_model


def train_steps(spec: TrainSpec) -> dict[str, Any]:
    """Check the store (fail fast), train, log where the checkpoint is."""
    log = get_run_logger()
    open_store(spec.store)
    command = " ".join(shlex.quote(a) for a in ["segflow", *sys.argv[1:]]) if sys.argv else "segflow train"
    with relay_from_workers():  # the task's per-epoch reports reach this process's progress display
        result = train_model.submit(spec, num_threads=torch_threads(spec.execution), command=command).result()
    publish_training_artifacts(result, run_name=flow_run.get_name() or "train")
    if result.get("normalisation_choice", {}).get("asked") == "auto":
        log.info("train: normalisation auto chose %s: %s", result["normalisation_choice"]["chose"],
                 result["normalisation_choice"]["reason"])
    metric = "F1 at IoU 0.5" if result["kind"] == "instance" else "mean foreground Dice"
    score = result["best_val_score"]
    log.info("train: checkpoint %s (sha256 %s…), %s", result["checkpoint"], result["sha256"][:12],
             no_validation_note(result) or f"best validation {metric} {'n/a' if score is None else f'{score:.4f}'}")
    return result


@flow(name="segflow-train", flow_run_name=train_run_name)
def train_flow(spec: TrainSpec) -> dict[str, Any]:
    """Train a model on a store's labelled images."""
    return train_steps(spec)
