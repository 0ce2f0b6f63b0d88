"""Dask workers SIGKILLed mid-run, three times: the run completes exactly once."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.chaos.conftest import (N_UNITS, check_against_clean, chaos_env, done_units, report, segment_args,
                                  start_segflow, unit_starts, wait_until)

pytestmark = pytest.mark.chaos


def _worker_pids(client) -> dict[str, int]:
    """``{address: pid}`` of the workers connected now (at least one). Not waiting for a killed worker
    to come back: on a loaded machine its restart can outlast the rest of the run, and the next kill
    would never happen."""
    wait_until(lambda: len(client.scheduler_info()["workers"]) >= 1, timeout=120, what="a worker")
    return client.run(os.getpid)


def test_workers_killed_mid_run_lose_and_repeat_nothing(chaos_collection, chaos_cluster, tmp_path):
    from distributed import Client

    address, notes = chaos_cluster
    out = tmp_path / "run"
    proc = start_segflow(*segment_args(chaos_collection, out, "--dask-address", address, "--threads-per-worker", "1"),
                         env=chaos_env(notes, delay_s=0.25), log_to=tmp_path / "segflow.log")
    kills, done_at_kill = 0, []
    with Client(address, timeout=30) as client:
        for threshold in (2, 6, 10):
            wait_until(lambda: done_units(out) >= threshold, timeout=240, what=f"{threshold} units done", proc=proc)
            pids = _worker_pids(client)
            busy = [w for w, tasks in client.processing().items() if tasks and w in pids]
            if proc.poll() is not None or done_units(out) >= N_UNITS:
                break
            os.kill(pids[busy[0] if busy else next(iter(pids))], signal.SIGKILL)
            kills += 1
            done_at_kill.append(done_units(out))
            time.sleep(0.5)
    assert proc.wait(timeout=300) == 0, (tmp_path / "segflow.log").read_text()[-3000:]
    assert kills >= 2  # the run lasted through at least two kills
    starts = unit_starts(notes)
    figures = {"kills": kills, "done_at_kills": done_at_kill, "unit_starts": sum(starts.values()),
               "units_redone": sum(starts.values()) - N_UNITS, **check_against_clean(out, chaos_collection["clean"])}
    assert len(starts) == N_UNITS  # every unit was computed, some more than once
    report("worker-kill", figures)
