"""The task that scores whole volumes of a finished run (see :mod:`segcore.run.volumes`)."""

from __future__ import annotations

from typing import Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE

from segcore.run.volumes import Volume, score_volumes


@task(name="score-volumes", task_run_name="score-volumes [{part}]", cache_policy=NO_CACHE, retries=1,
      retry_delay_seconds=2)
def score_volumes_task(run_dir: str, volumes: Sequence[Volume], *, part: str) -> int:
    """3-D Dice, IoU, HD95 and ASSD of ``volumes``, written as part ``part`` of the run's volume table;
    returns the rows written."""
    return score_volumes(run_dir, volumes, part=part)
