"""Thin Prefect task that appends a run's new table parts to the data lake."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from segcore.lake import publish
from segcore.plan import plan_units
from segcore.rundir import read_run_info
from segcore.store import open_store, read_manifest


@task(name="publish-lake", task_run_name="publish-lake [{lake}]", cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=5)
def publish_lake_task(lake: str, *, run_dir: str, store: str) -> dict[str, int]:
    """Append the run directory's unpublished Dice/instance/manifest parts to ``lake``; files per table."""
    units = {u.name: u.group for u in plan_units(open_store(store))}
    return publish(lake, run_dir=run_dir, run_info=read_run_info(run_dir), manifest=read_manifest(store),
                   unit_groups=units)
