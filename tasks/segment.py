"""Thin Prefect tasks that segment and evaluate work units on whichever Dask worker runs them.

Each calls one segcore function; the device is resolved on the worker (one GPU per worker where
there are GPUs). Units of tiled groups (large images) go through the block tasks of
:mod:`segcore.run.blocks`.
"""

from __future__ import annotations

from typing import Any, Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from segcore.run import blocks as tiled
from segcore.models.checkpoint import ModelMeta
from segcore.config import SegmentSpec
from segcore.run.units import resolve_device, segment_unit
from segcore.run.plan import WorkUnit


def _worker_index() -> int | None:
    """Index of the Dask worker running this task (LocalCluster names workers 0..n-1), if any."""
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return None
    return name if isinstance(name, int) else None


def _device(spec: SegmentSpec) -> str:
    return resolve_device(spec.device, worker_index=_worker_index())


_OPTS = dict(cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)


@task(name="segment-unit", task_run_name="segment-{unit.label}", **_OPTS)
def segment_unit_task(spec: SegmentSpec, unit: WorkUnit, *, run_id: str, checkpoint_sha256: str,
                      mask_kind: str, num_threads: int | None) -> dict[str, Any]:
    """Segment and evaluate one unit of whole images."""
    return segment_unit(store_path=spec.store, run_dir=spec.out, run_id=run_id, unit=unit,
                        checkpoint=spec.checkpoint, checkpoint_sha256=checkpoint_sha256, mask_kind=mask_kind,
                        batch_size=spec.batch_size, device=_device(spec), precision=spec.precision,
                        num_threads=num_threads)


@task(name="image-stats", task_run_name="image-stats [{group} image {index}]", **_OPTS)
def image_stats_task(store_path: str, group: str, index: int, meta: ModelMeta) -> Any:
    """Normalisation percentiles of one large image (from a strided sample)."""
    return tiled.image_stats(store_path, group, index, meta)


@task(name="segment-block", task_run_name="segment-{unit.label}", **_OPTS)
def segment_block_task(spec: SegmentSpec, unit: WorkUnit, *, tiling: tiled.Tiling, stats: Any, checkpoint_sha256: str,
                       mask_kind: str, num_threads: int | None) -> dict[str, Any]:
    """Blend the model's tiles over one block of a large image (semantic models)."""
    return tiled.segment_block(store_path=spec.store, run_dir=spec.out, unit=unit, checkpoint=spec.checkpoint,
                               checkpoint_sha256=checkpoint_sha256, mask_kind=mask_kind, tiling=tiling, stats=stats,
                               batch_size=spec.batch_size, device=_device(spec), precision=spec.precision,
                               num_threads=num_threads)


@task(name="detect-block", task_run_name="detect-{unit.label}", **_OPTS)
def detect_block_task(spec: SegmentSpec, unit: WorkUnit, *, tiling: tiled.Tiling, stats: Any, checkpoint_sha256: str,
                      num_threads: int | None) -> dict[str, Any]:
    """Detect the objects centred in one block of a large image (instance models, first pass)."""
    return tiled.detect_block(store_path=spec.store, run_dir=spec.out, unit=unit, checkpoint=spec.checkpoint,
                              checkpoint_sha256=checkpoint_sha256, tiling=tiling, stats=stats, device=_device(spec),
                              num_threads=num_threads)


@task(name="paste-block", task_run_name="paste-{unit.label}", **_OPTS)
def paste_block_task(spec: SegmentSpec, unit: WorkUnit, *, sources: Sequence[tuple[str, int]], checkpoint_sha256: str,
                     mask_kind: str, meta: ModelMeta) -> dict[str, Any]:
    """Write one block's instance ids from the objects of the blocks around it (second pass)."""
    return tiled.paste_block(store_path=spec.store, run_dir=spec.out, unit=unit, sources=sources,
                             checkpoint_sha256=checkpoint_sha256, mask_kind=mask_kind, meta=meta)


@task(name="finish-image", task_run_name="finish-image [{group} image {index}]", **_OPTS)
def finish_image_task(spec: SegmentSpec, group: str, index: int, *, run_id: str, records: list[dict[str, Any]],
                      meta: ModelMeta, checkpoint_sha256: str, mask_kind: str, tiling: tiled.Tiling,
                      blocks: list[tuple[str, int]]) -> dict[str, Any]:
    """Write the Dice, instance and seam rows of one large image from its blocks' records."""
    return tiled.finish_image(store_path=spec.store, run_dir=spec.out, run_id=run_id, group=group, index=index,
                              records=records, meta=meta, checkpoint_sha256=checkpoint_sha256, mask_kind=mask_kind,
                              tiling=tiling, blocks=blocks)
