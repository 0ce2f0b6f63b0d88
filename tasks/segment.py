"""Thin Prefect task that segments and evaluates one work unit on whichever Dask worker runs it."""

from __future__ import annotations

from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from segcore.config import SegmentSpec
from segcore.inference import resolve_device, segment_unit
from segcore.plan import WorkUnit


def _worker_index() -> int | None:
    """Index of the Dask worker running this task (LocalCluster names workers 0..n-1), if any."""
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):
        return None
    return name if isinstance(name, int) else None


@task(name="segment-unit", task_run_name="segment-{unit.name} [{unit.group} images {unit.start}-{unit.stop}]",
      cache_policy=NO_CACHE, retries=1, retry_delay_seconds=2)
def segment_unit_task(spec: SegmentSpec, unit: WorkUnit, *, run_id: str, checkpoint_sha256: str,
                      mask_kind: str, num_threads: int | None) -> dict[str, Any]:
    """Segment one unit; the device is resolved on the worker (one GPU per worker where there are GPUs)."""
    device = resolve_device(spec.device, worker_index=_worker_index())
    return segment_unit(store_path=spec.store, run_dir=spec.out, run_id=run_id, unit=unit,
                        checkpoint=spec.checkpoint, checkpoint_sha256=checkpoint_sha256, mask_kind=mask_kind,
                        batch_size=spec.batch_size, device=device, precision=spec.precision,
                        num_threads=num_threads)
