"""The work of one unit as a user would write it without segflow (bench/peers.py runs it three ways).

For one Zarr chunk of the ingested store: read the image chunk, normalise and forward in batches
through the same prediction seam as segflow (:class:`~segcore.models.predict.TorchPredictor`:
``labels`` = ``prepare`` + ``logits`` + argmax, inference mode), write the mask chunk to a Zarr
array, count TP/FP/FN per image and class against the ground-truth chunk and make the Dice rows
with segflow's own evaluation functions (:func:`~segcore.run.evaluate.count_against_gt`,
:func:`~segcore.run.evaluate.dice_rows`), and write them as one Parquet part. The model, the
manifest and the open arrays are loaded once per process (:func:`worker_state`).

This module is imported by the Dask worker and the Ray actor processes, so it must be importable
there: bench/peers.py puts the repository and bench/ on their ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import zarr

from segcore.collection.store import open_store, read_manifest
from segcore.models.checkpoint import load_checkpoint
from segcore.models.predict import TorchPredictor
from segcore.run.evaluate import count_against_gt, dice_rows, ground_truth_state
from segcore.run.tables import write_part


@dataclass(frozen=True)
class Job:
    """What every unit of one peer's run needs (small, frozen, picklable).

    ``masks``: a Zarr group with one ``(N, H, W)`` uint8 array per store group, chunked like the
    store (:func:`create_mask_arrays`); ``dice``: the directory of the Parquet parts (one per unit);
    ``threads``: torch threads of the process that runs the units.
    """

    store: str
    checkpoint: str
    checkpoint_sha256: str
    masks: str
    dice: str
    batch_size: int = 8
    threads: int = 1


@dataclass
class WorkerState:
    """A process's model, manifest rows (by group, in index order) and open arrays."""

    predictor: TorchPredictor
    mask_kind: str
    rows: dict[str, list[dict[str, Any]]]
    images: dict[str, zarr.Array]
    gt: dict[str, zarr.Array]
    masks: dict[str, zarr.Array]


@lru_cache(maxsize=2)
def worker_state(job: Job) -> WorkerState:
    """The state of ``job`` in this process, built once (the model cached per worker)."""
    torch.set_num_threads(job.threads)
    model, meta = load_checkpoint(job.checkpoint)
    info = open_store(job.store)
    rows: dict[str, list[dict[str, Any]]] = {}
    for r in sorted(read_manifest(job.store).to_pylist(), key=lambda r: (r["group"], r["index"])):
        rows.setdefault(r["group"], []).append(r)
    root, masks = zarr.open_group(job.store, mode="r"), zarr.open_group(job.masks, mode="r+")
    names = [g.name for g in info.groups]
    return WorkerState(predictor=TorchPredictor(model, meta, device="cpu"), mask_kind=info.mask_kind, rows=rows,
                       images={g: root[f"images/{g}"] for g in names},
                       gt={g: root[f"gt/{g}"] for g in names} if info.has_gt else {},
                       masks={g: masks[g] for g in names})


def segment_chunk(job: Job, group: str, start: int, stop: int, name: str) -> tuple[int, float, float]:
    """Segment and score images ``[start, stop)`` of store group ``group`` (one chunk); writes
    ``job.masks/<group>[start:stop]`` and ``job.dice/<name>.parquet``. Returns ``(images, started,
    finished)`` with Unix times in seconds."""
    started = time.time()
    state = worker_state(job)
    meta = state.predictor.meta
    images = state.images[group][start:stop]
    labels = state.predictor.labels(images, batch_size=job.batch_size)
    state.masks[group][start:stop] = labels
    rows = state.rows[group][start:stop]
    usable = [i for i, r in enumerate(rows) if ground_truth_state(r)[0]]
    counts = {}
    if usable:
        gt = state.gt[group][start:stop][usable]
        counts = dict(zip((rows[i]["image_id"] for i in usable),
                          count_against_gt(labels[usable], gt, mask_kind=state.mask_kind, meta=meta)))
    table = dice_rows(rows, counts, meta=meta, checkpoint_sha256=job.checkpoint_sha256, unit=name)
    write_part(table, job.dice, f"{name}.parquet")
    return stop - start, started, time.time()


def create_mask_arrays(job: Job) -> None:
    """The empty (0-filled) uint8 mask arrays of ``job.masks``: one per store group, ``(N, H, W)``,
    chunked like the store's (one chunk per unit), Zarr's default codecs as segflow's mask arrays."""
    root = zarr.open_group(job.masks, mode="w")
    for g in open_store(job.store).groups:
        root.create_array(g.name, shape=(g.count, g.height, g.width), chunks=g.chunk_shape, dtype="uint8",
                          fill_value=0)


class ChunkSegmenter:
    """A Ray Data callable class: the model loaded once per actor; each batch is some units (``group``,
    ``start``, ``stop``, ``name`` columns) and gives back their ``images``, ``started``, ``finished``."""

    def __init__(self, job: Job) -> None:
        self.job = job
        worker_state(job)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        done = [segment_chunk(self.job, str(g), int(s), int(e), str(n))
                for g, s, e, n in zip(batch["group"], batch["start"], batch["stop"], batch["name"])]
        return {"name": np.asarray(batch["name"]), "images": np.asarray([d[0] for d in done]),
                "started": np.asarray([d[1] for d in done]), "finished": np.asarray([d[2] for d in done]),
                "pid": np.full(len(done), os.getpid())}
