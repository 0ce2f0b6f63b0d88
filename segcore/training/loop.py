"""The training loop every trainer shares.

:func:`fit` runs AdamW (weight decay 1e-4) under a one-cycle learning-rate schedule (or a linear
warm-up then poly or cosine decay, :func:`segcore.training.recipe.lr_factor`) for a number of epochs,
on the CPU or a CUDA device (``bf16``/``fp16`` autocast there, fp16 with a gradient scaler), validates after each epoch, keeps the weights of the best one, stops early when a
wall-clock budget is spent and reports each epoch's history record to a callback. What differs
between model kinds stays with the trainer: what a batch is and how it is augmented
(``batches``), its loss (``loss``), and how an epoch is validated and scored (``validate``,
returning a :class:`Validation`).

:func:`seeded_torch` seeds torch's global generator for a block and restores the caller's state
after, so a trainer that builds its model and calls :func:`fit` inside it is reproducible without
side effects.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping

import numpy as np
import torch
from torch import nn

from segcore.errors import ConfigError, ModelError
from segcore.training.recipe import lr_factor

log = logging.getLogger(__name__)

#: Share of the steps over which the one-cycle schedule warms up to its peak learning rate.
WARMUP_FRACTION = 0.15
#: AdamW's weight decay.
WEIGHT_DECAY = 1e-4


@contextlib.contextmanager
def seeded_torch(seed: int) -> Iterator[None]:
    """Run the block with torch's global CPU generator seeded with ``seed``; the caller's random
    state is restored afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@dataclass(frozen=True)
class Validation:
    """What validating one epoch gave.

    Attributes:
        fields: entries of the epoch's history record, e.g. ``{"val_f1": 0.81}``.
        score: what best-epoch selection maximises: a number, or a tuple compared element by
            element (ties go to the earlier epoch). ``None`` means there was nothing to validate
            on; every such epoch replaces the best, so the last one is kept.
        summary: the validation part of the epoch's log line, e.g. ``"val F1 0.8100"``.
        details: kept with the best epoch (:attr:`FitResult.best`), e.g. every pooled figure.
    """

    fields: Mapping[str, Any]
    score: Any
    summary: str
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FitResult:
    """The outcome of :func:`fit` (the model itself now holds the best weights).

    Attributes:
        history: one record per epoch run (see :func:`fit`).
        best_epoch: 1-based number of the epoch whose weights were kept.
        best: that epoch's :class:`Validation`.
        stopped_early: whether the time budget ended training before ``epochs``.
    """

    history: list[dict]
    best_epoch: int
    best: Validation
    stopped_early: bool


def _beats(candidate: Validation, best: Validation | None) -> bool:
    if best is None or candidate.score is None or best.score is None:
        return True
    return bool(candidate.score > best.score)


def _step(total: torch.Tensor, model: nn.Module, optimiser: torch.optim.Optimizer,
          scaler: torch.amp.GradScaler | None, grad_clip_norm: float | None) -> None:
    """Backward pass and optimiser step (through the gradient scaler when there is one)."""
    if scaler is None:
        total.backward()
        if grad_clip_norm is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
        optimiser.step()
        return
    scaler.scale(total).backward()
    if grad_clip_norm is not None:
        scaler.unscale_(optimiser)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip_norm)
    scaler.step(optimiser)
    scaler.update()


def fit(
    model: nn.Module,
    *,
    epochs: int,
    steps_per_epoch: int,
    batches: Callable[[], Iterable[Any]],
    loss: Callable[[nn.Module, Any], Mapping[str, torch.Tensor]],
    validate: Callable[[nn.Module], Validation],
    lr: float,
    fused: bool | None = None,
    grad_clip_norm: float | None = None,
    record_loss_parts: bool = False,
    time_budget_s: float | None = None,
    progress: Callable[[dict], None] | None = None,
    started: float | None = None,
    schedule: Literal["onecycle", "poly", "cosine"] = "onecycle",
    warmup_fraction: float = WARMUP_FRACTION,
    device: str | torch.device = "cpu",
    precision: Literal["fp32", "bf16", "fp16"] = "fp32",
) -> FitResult:
    """Train ``model`` in place; it ends in eval mode holding the weights of the best epoch.

    Args:
        model: the module to train (its parameters are optimised where they lie).
        epochs: number of epochs (positive).
        steps_per_epoch: optimiser steps per epoch (the schedule spans ``epochs * steps_per_epoch``);
            ``batches`` must yield at most that many batches per call.
        batches: called once per epoch (the model in train mode); yields that epoch's batches,
            in whatever form ``loss`` takes. A trainer's random generator is consumed here, lazily.
        loss: ``(model, batch) -> {name: scalar tensor}``; the optimiser minimises their sum.
        validate: called after each epoch with the model in eval mode (put back in train mode at
            the next epoch); returns that epoch's :class:`Validation`.
        lr: peak learning rate of AdamW under the one-cycle schedule.
        fused: AdamW's ``fused`` option (``None``: torch's default).
        grad_clip_norm: clip the gradients to this global L2 norm before each step (``None``: never).
        record_loss_parts: also record each loss part's epoch mean under ``"losses"``.
        time_budget_s: stop after the epoch during which this many seconds (since ``started``)
            have passed; ``None``: no limit.
        progress: called once per epoch with a copy of that epoch's history record.
        started: ``time.perf_counter()`` value the budget and ``elapsed_s`` count from (default:
            the call of :func:`fit`), so that a trainer's data preparation counts too.
        schedule: ``onecycle`` (torch's OneCycleLR) or a linear warm-up then ``poly``/``cosine``.
        warmup_fraction: share of the steps spent warming up.
        device: where the model lies; ``batches`` and ``loss`` move the data there.
        precision: autocast dtype on CUDA (``fp16`` adds a gradient scaler); the CPU runs fp32.

    Returns:
        A :class:`FitResult`. Each history record is ``{"epoch", "loss" (sum of the parts' epoch
        means), ["losses" (part -> mean),] **validation fields, "lr" (after the epoch), "seconds"
        (the epoch's wall-clock), "elapsed_s" (since ``started``)}``.
    """
    if epochs < 1 or steps_per_epoch < 1:
        raise ConfigError(f"epochs and steps_per_epoch must be positive, got {epochs} and {steps_per_epoch}")
    t0 = time.perf_counter() if started is None else started
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY, fused=fused)
    total_steps = epochs * steps_per_epoch
    if schedule == "onecycle":
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=lr, total_steps=total_steps,
                                                        pct_start=warmup_fraction)
    else:
        warmup = max(1, int(round(total_steps * warmup_fraction)))
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimiser, lambda step: lr_factor(step, total=total_steps, warmup=warmup, kind=schedule))
    device_type = torch.device(device).type
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if device_type == "cuda" else None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype is torch.float16 else None
    history: list[dict] = []
    best: Validation | None = None
    best_epoch, best_state = 0, None
    stopped_early = False
    for epoch in range(1, epochs + 1):
        t_epoch = time.perf_counter()
        model.train()
        parts: dict[str, list[float]] = {}
        for batch in batches():
            with torch.autocast(device_type, dtype=amp_dtype, enabled=amp_dtype is not None):
                loss_parts = loss(model, batch)
                total = sum(loss_parts.values())
            optimiser.zero_grad(set_to_none=True)
            _step(total, model, optimiser, scaler, grad_clip_norm)
            scheduler.step()
            for name, value in loss_parts.items():
                parts.setdefault(name, []).append(float(value.detach()))
            if not all(np.isfinite(values[-1]) for values in parts.values()):
                raise ModelError(
                    f"training diverged in epoch {epoch}: the loss is {sum(v[-1] for v in parts.values())}, so the "
                    f"weights are lost; nothing is saved. Lower the learning rate (--lr, {lr:g} now) or check "
                    "that the normalisation gives finite values")
        model.eval()
        validation = validate(model)
        now = time.perf_counter()
        means = {name: float(np.mean(values)) for name, values in parts.items()}
        record = {
            "epoch": epoch,
            "loss": float(sum(means.values())),
            **({"losses": means} if record_loss_parts else {}),
            **validation.fields,
            "lr": float(optimiser.param_groups[0]["lr"]),
            "seconds": now - t_epoch,
            "elapsed_s": now - t0,
        }
        stop = time_budget_s is not None and now - t0 >= time_budget_s and epoch < epochs
        if stop:  # said in the epoch's own record (and its progress line), not only in a warning
            record["time_budget_spent"] = True
        history.append(record)
        log.info("epoch %d/%d: loss %.4f, %s (%.1f s)", epoch, epochs, record["loss"], validation.summary,
                 record["seconds"])
        if _beats(validation, best):
            best, best_epoch, best_state = validation, epoch, copy.deepcopy(model.state_dict())
        if progress is not None:
            progress(dict(record))
        if stop:
            stopped_early = True
            log.warning("time budget of %.0f s spent after epoch %d of %d; stopping early",
                        time_budget_s, epoch, epochs)
            break

    model.load_state_dict(best_state)
    model.eval()
    return FitResult(history=history, best_epoch=best_epoch, best=best, stopped_early=stopped_early)


__all__ = ["FitResult", "Validation", "WARMUP_FRACTION", "WEIGHT_DECAY", "fit", "seeded_torch"]
