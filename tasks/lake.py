"""Thin Prefect task that appends a run's new table parts to the data lake."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from segcore.lake.publish import publish_run


@task(name="publish-lake", task_run_name="publish-lake [{lake}]", cache_policy=NO_CACHE, retries=2,
      retry_delay_seconds=5)
def publish_lake_task(lake: str, *, run_dir: str) -> dict[str, int]:
    """Append the run directory's unpublished Dice/instance/manifest parts to ``lake``; files per table."""
    return publish_run(lake, run_dir=run_dir)
