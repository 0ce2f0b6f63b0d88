"""Batched inference and on-the-fly evaluation of one work unit.

:func:`segment_unit` is the per-unit function every worker runs (and that anyone can run by hand
on one unit): read the unit's image chunk, predict in batches, write the mask chunk, compute
Dice against the ground-truth chunk while the mask is still in memory, write one Parquet part,
mark the unit done. The model is loaded once per process (:func:`load_model_cached`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from functools import lru_cache
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
import zarr

from segcore.models.checkpoint import ModelMeta, load_checkpoint
from segcore.errors import ConfigError
from segcore.metrics.instance import instance_scores
from segcore.models.instances import InstancePrediction, predict_instances
from segcore.metrics.dice import confusion_counts, dice_from_counts
from segcore.normalise import Normalisation, normalise_batch
from segcore.run.plan import WorkUnit
from segcore.run.rundir import dice_dir, instances_path, mark_unit_done, masks_path, table_dir
from segcore.collection.store import read_manifest
from segcore.run.tables import dice_table, instance_metrics_table, instance_table, write_part

log = logging.getLogger(__name__)

_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
_model_lock = threading.Lock()


def resolve_device(device: str, *, worker_index: int | None = None) -> str:
    """``auto`` -> ``cuda:<i>`` when CUDA is present (``i`` = worker index modulo GPUs), else ``cpu``."""
    if device == "cpu":
        return "cpu"
    if device not in ("auto", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    if not torch.cuda.is_available():
        if device == "auto":
            return "cpu"
        raise ConfigError(f"device {device!r} asked for, but torch sees no CUDA device; use --device cpu or auto")
    if device.startswith("cuda:"):
        return device
    return f"cuda:{(worker_index or 0) % torch.cuda.device_count()}"


@lru_cache(maxsize=4)
def _cached(checkpoint: str, sha256: str, device: str) -> tuple[torch.nn.Module, ModelMeta]:
    log.info("loading %s on %s", checkpoint, device)
    return load_checkpoint(checkpoint, device=device)


def load_model_cached(checkpoint: str, *, sha256: str, device: str) -> tuple[torch.nn.Module, ModelMeta]:
    """The model of ``checkpoint`` on ``device``, loaded once per process (keyed by content hash)."""
    with _model_lock:
        return _cached(str(checkpoint), sha256, device)


def model_logits(model: torch.nn.Module, x: torch.Tensor, *, device: str = "cpu", precision: str = "bf16"
                 ) -> torch.Tensor:
    """``model(x)`` for a normalised CPU batch: on CUDA with a pinned, non-blocking copy and autocast
    to ``precision`` (bf16/fp16; fp32 disables autocast); on the CPU in fp32. Call it under
    ``torch.inference_mode()``; the logits stay on ``device``."""
    if not device.startswith("cuda"):
        return model(x)
    x = x.pin_memory().to(device, non_blocking=True)
    amp = torch.autocast("cuda", dtype=_AUTOCAST[precision]) if precision in _AUTOCAST else contextlib.nullcontext()
    with amp:
        return model(x)


def predict_labels(model: torch.nn.Module, images: np.ndarray, *, normalisation: Normalisation,
                   device: str = "cpu", precision: str = "bf16", batch_size: int | None = None) -> np.ndarray:
    """Predict ``(N, H, W)`` class labels for ``(N, H, W, C)`` raw images (argmax of the logits).

    Labels are uint8, or uint16 for models with more than 256 classes. Runs ``batch_size``
    images per forward pass (default: all at once) under ``torch.inference_mode()``; on CUDA with
    pinned-memory, non-blocking copies and autocast to ``precision`` (bf16/fp16; fp32 disables
    autocast). CPU runs in fp32. The model's train/eval mode is the caller's choice.
    """
    step = batch_size or max(1, len(images))
    out: np.ndarray | None = None
    with torch.inference_mode():
        for s in range(0, len(images), step):
            logits = model_logits(model, normalise_batch(images[s:s + step], normalisation), device=device,
                                  precision=precision)
            if out is None:
                dtype = np.uint8 if logits.shape[1] <= 256 else np.uint16
                out = np.empty(images.shape[:3], dtype=dtype)
            out[s:s + step] = logits.argmax(dim=1).to("cpu").numpy()
    return out if out is not None else np.empty(images.shape[:3], dtype=np.uint8)


def _gt_to_classes(gt: np.ndarray, *, mask_kind: str) -> np.ndarray:
    """Ground truth as class labels: instance ids become foreground (1), class maps stay."""
    if mask_kind == "instance":
        return (gt > 0).astype(np.int64)
    return gt.astype(np.int64, copy=False)


def predict_instance_batches(model: torch.nn.Module, images: np.ndarray, *, normalisation: Normalisation,
                             device: str = "cpu", batch_size: int | None = None) -> list[InstancePrediction]:
    """Run an instance model over ``(N, H, W, C)`` raw images; one :class:`InstancePrediction` per image.

    Instance models run in fp32 (detection post-processing is not autocast-safe); masks are
    pasted one box at a time, so memory does not grow with the number of detections.
    """
    step = batch_size or max(1, len(images))
    out: list[InstancePrediction] = []
    for s in range(0, len(images), step):
        x = normalise_batch(images[s:s + step], normalisation).to(device)
        out.extend(predict_instances(model, x))
    return out


def _unit_rows(store_path: str, unit: WorkUnit) -> list[dict[str, Any]]:
    manifest = read_manifest(store_path)
    rows = manifest.filter(pc.and_(pc.equal(manifest["group"], unit.group),
                                   pc.and_(pc.greater_equal(manifest["index"], unit.start),
                                           pc.less(manifest["index"], unit.stop)))).sort_by("index").to_pylist()
    if [r["index"] for r in rows] != list(range(unit.start, unit.stop)):
        raise ConfigError(f"{unit.label}: the store manifest does not list every image of the unit; re-ingest")
    return rows


def segment_unit(*, store_path: str, run_dir: str, run_id: str, unit: WorkUnit, checkpoint: str,
                 checkpoint_sha256: str, mask_kind: str, batch_size: int = 8, device: str = "cpu",
                 precision: str = "bf16", num_threads: int | None = None) -> dict[str, Any]:
    """Segment and evaluate one work unit; returns a small record (counts and timings, no arrays).

    Writes ``masks.zarr/<group>[start:stop]`` (exactly one chunk of class labels) and
    ``dice/run_id=<id>/<unit>.parquet`` (one row per image with ground truth and class; error rows
    for images that could not be evaluated). Instance models also write
    ``instances.zarr/<group>[start:stop]`` (uint32 instance ids), ``instances/run_id=<id>/<unit>.parquet``
    (one row per predicted instance) and, when the ground truth is instance labels,
    ``instance_metrics/run_id=<id>/<unit>.parquet`` (one row per evaluated image). The unit's done
    marker is written last.
    """
    t0 = time.perf_counter()
    started = time.time()
    if num_threads:
        torch.set_num_threads(num_threads)
    model, meta = load_model_cached(checkpoint, sha256=checkpoint_sha256, device=device)
    root = zarr.open_group(store_path, mode="r")
    images = root[f"images/{unit.group}"][unit.start:unit.stop]
    t_read = time.perf_counter()

    instance_preds: list[InstancePrediction] | None = None
    if meta.kind == "instance":
        instance_preds = predict_instance_batches(model, images, normalisation=meta.normalisation, device=device,
                                                  batch_size=batch_size)
        preds = np.stack([p.classes for p in instance_preds]) if instance_preds else np.zeros(images.shape[:3], np.uint8)
    else:
        preds = predict_labels(model, images, normalisation=meta.normalisation, device=device, precision=precision,
                               batch_size=batch_size)
    t_pred = time.perf_counter()
    zarr.open_group(masks_path(run_dir), mode="r+")[unit.group][unit.start:unit.stop] = preds

    rows = _unit_rows(store_path, unit)
    evaluated, errors = [], []
    for r in rows:
        if r["status"] != "ok":
            errors.append((r["image_id"], r["error"] or "image could not be decoded"))
        elif r["mask_status"] == "ok":
            evaluated.append(r["index"] - unit.start)
        elif r["mask_status"] == "error":
            errors.append((r["image_id"], f"ground truth unusable: {r['mask_error']}"))
    c = meta.num_classes
    tp = fp = fn = np.zeros((0, c), dtype=np.int64)
    ids: list[str] = []
    keep: list[int] = []
    gt_raw = root[f"gt/{unit.group}"][unit.start:unit.stop][evaluated] if evaluated else None
    if evaluated:
        gt = _gt_to_classes(gt_raw, mask_kind=mask_kind)
        bad = {i for i, g in enumerate(gt) if int(g.max(initial=0)) >= c}
        for i in sorted(bad):
            errors.append((rows[evaluated[i]]["image_id"],
                           f"ground truth has label {int(gt[i].max())} but the model has {c} classes "
                           f"({', '.join(meta.class_names)}); check --mask-kind or the checkpoint"))
        keep = [i for i in range(len(evaluated)) if i not in bad]
        ids = [rows[evaluated[i]]["image_id"] for i in keep]
        tp, fp, fn = confusion_counts(preds[[evaluated[i] for i in keep]], gt[keep], c)
    dice, empty = dice_from_counts(tp, fp, fn)
    table = dice_table(image_ids=ids, class_names=meta.class_names, tp=tp, fp=fp, fn=fn, dice=dice,
                       empty_gt=empty, model=meta.arch, checkpoint_sha256=checkpoint_sha256, unit=unit.name,
                       errors=errors)
    write_part(table, dice_dir(run_dir, run_id), f"{unit.name}.parquet")
    record_extra: dict[str, Any] = {}
    if instance_preds is not None:
        common = {"model": meta.arch, "checkpoint_sha256": checkpoint_sha256, "unit": unit.name}
        zarr.open_group(instances_path(run_dir), mode="r+")[unit.group][unit.start:unit.stop] = (
            np.stack([p.labels for p in instance_preds]))
        write_part(instance_table([(r["image_id"], p.records) for r, p in zip(rows, instance_preds)
                                   if r["status"] == "ok"], class_names=meta.class_names, **common),
                   table_dir(run_dir, "instances", run_id), f"{unit.name}.parquet")
        record_extra["instances"] = sum(len(p.records) for p, r in zip(instance_preds, rows) if r["status"] == "ok")
        if mask_kind == "instance" and keep:
            scores = []
            for i in keep:
                pred = instance_preds[evaluated[i]]
                scores.append((rows[evaluated[i]]["image_id"],
                               instance_scores(pred.labels, gt_raw[i],
                                               scores={rec["instance_id"]: rec["score"] for rec in pred.records})))
            write_part(instance_metrics_table(scores, **common), table_dir(run_dir, "instance_metrics", run_id),
                       f"{unit.name}.parquet")
    t_end = time.perf_counter()
    record = {
        "unit": unit.name,
        "group": unit.group,
        "start": unit.start,
        "stop": unit.stop,
        "n_images": unit.n_images,
        "n_evaluated": len(ids),
        "n_errors": len(errors),
        "dice_rows": table.num_rows,
        **record_extra,
        "device": device,
        "pid": os.getpid(),
        "read_s": round(t_read - t0, 4),
        "predict_s": round(t_pred - t_read, 4),
        "total_s": round(t_end - t0, 4),
        "started": started,
        "finished": time.time(),
    }
    mark_unit_done(run_dir, record)
    return record
