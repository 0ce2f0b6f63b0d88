"""Thin Prefect tasks that segment and evaluate work units on whichever Dask worker runs them.

Each resolves the run context's device on its worker (one GPU per worker where there are GPUs)
and calls one segcore function. Units of tiled groups (large images) go through the block tasks
(:mod:`segcore.run.blocks`) and are finished image by image (:mod:`segcore.run.images`).
Units and blocks are retried (and stopped when they hang) by the flow (:mod:`flows.watch`), not by
Prefect; the other steps retry once. Once every unit is done, the pyramid levels of each label
image are written (:mod:`segcore.pyramid`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from segcore.models.checkpoint import ModelMeta
from segcore.normalise import Stats
from segcore.pyramid import write_label_pyramid
from segcore.run.blocks import detect_block, image_stats, paste_block, segment_block
from segcore.run.images import finish_image
from segcore.run.context import BlockRecord, DetectRecord, ImageRecord, RunContext, UnitRecord
from segcore.run.memory import Faults
from segcore.run.plan import WorkUnit
from segcore.run.units import segment_unit


def _faults() -> Faults:
    """Faults a test injects through ``SEGFLOW_FAULTS`` (JSON of :class:`~segcore.run.memory.Faults`' fields,
    e.g. ``{"hang_units": ["unit-00001"], "hang_s": 600}``); none when it is unset."""
    fields = json.loads(os.environ.get("SEGFLOW_FAULTS") or "{}")
    return Faults(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def _on_worker(ctx: RunContext) -> RunContext:
    """``ctx`` with its device resolved for the Dask worker running this task (LocalCluster names
    workers 0..n-1), or for this process outside Dask, and with the injected faults, if any."""
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        name = None
    return dataclasses.replace(ctx.on_worker(name if isinstance(name, int) else None), faults=_faults())


_OPTS = dict(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
#: Steps the flow watches (flows.watch): it retries them with back-off and stops them when they hang.
_WATCHED = dict(cache_policy=NO_CACHE)


@task(name="segment-unit", task_run_name="segment-{unit.label}", **_WATCHED)
def segment_unit_task(ctx: RunContext, unit: WorkUnit) -> UnitRecord:
    """Segment and evaluate one unit of whole images."""
    return segment_unit(_on_worker(ctx), unit)


@task(name="image-stats", task_run_name="image-stats [{group} image {index}]", **_OPTS)
def image_stats_task(store_path: str, group: str, index: int, meta: ModelMeta) -> Stats | None:
    """Normalisation percentiles of one large image (from a strided sample)."""
    return image_stats(store_path, group, index, meta)


@task(name="segment-block", task_run_name="segment-{unit.label}", **_WATCHED)
def segment_block_task(ctx: RunContext, unit: WorkUnit, *, stats: Stats | None) -> BlockRecord:
    """Blend the model's tiles over one block of a large image (semantic models)."""
    return segment_block(_on_worker(ctx), unit, stats=stats)


@task(name="detect-block", task_run_name="detect-{unit.label}", **_WATCHED)
def detect_block_task(ctx: RunContext, unit: WorkUnit, *, stats: Stats | None) -> DetectRecord:
    """Detect the objects centred in one block of a large image (instance models, first pass)."""
    return detect_block(_on_worker(ctx), unit, stats=stats)


@task(name="paste-block", task_run_name="paste-{unit.label}", **_WATCHED)
def paste_block_task(ctx: RunContext, unit: WorkUnit, *, sources: Sequence[tuple[str, int]],
                     meta: ModelMeta) -> BlockRecord:
    """Write one block's instance ids from the objects of the blocks around it (second pass)."""
    return paste_block(_on_worker(ctx), unit, sources=sources, meta=meta)


@task(name="finish-image", task_run_name="finish-image [{group} image {index}]", **_OPTS)
def finish_image_task(ctx: RunContext, group: str, index: int, *, records: Sequence[BlockRecord],
                      meta: ModelMeta, blocks: Sequence[tuple[str, int]]) -> ImageRecord:
    """Write the Dice, instance and seam rows of one large image from its blocks' records."""
    return finish_image(ctx, group, index, records=records, meta=meta, blocks=blocks)


@task(name="label-pyramid", task_run_name="pyramid [{location}]", **_OPTS)
def label_pyramid_task(location: str, *, overwrite: bool) -> int:
    """Write the pyramid levels of one complete label image (``RUN_DIR/masks.zarr/<group>``); returns
    the number of levels."""
    return write_label_pyramid(location, overwrite=overwrite)
