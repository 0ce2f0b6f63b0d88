"""Dask workers SIGKILLed while a Parquet part (or a done-record) is being written."""

from __future__ import annotations

import os
import signal
import time

import pytest

from tests.chaos.conftest import (N_UNITS, check_against_clean, chaos_env, report, segment_args,
                                  start_segflow, unit_starts, wait_until)

pytestmark = pytest.mark.chaos


def _part_being_written(out) -> bool:
    return any((out / "dice").glob("run_id=*/.unit-*.parquet.*.tmp"))


def test_workers_killed_mid_write_leave_no_visible_half_file(chaos_collection, chaos_cluster, tmp_path):
    from distributed import Client

    address, notes = chaos_cluster
    out = tmp_path / "run"
    proc = start_segflow(*segment_args(chaos_collection, out, "--dask-address", address, "--threads-per-worker", "1"),
                         env=chaos_env(notes, delay_s=0.25), log_to=tmp_path / "segflow.log")
    kills = 0
    with Client(address, timeout=30) as client:
        for _ in range(2):
            wait_until(lambda: len(client.scheduler_info()["workers"]) == 2, timeout=120, what="two workers")
            pids = client.run(os.getpid)
            wait_until(lambda: _part_being_written(out), timeout=240, what="a Parquet part being written", proc=proc)
            for pid in pids.values():  # the writer is one of them
                os.kill(pid, signal.SIGKILL)
                kills += 1
            time.sleep(1.0)
    assert proc.wait(timeout=300) == 0, (tmp_path / "segflow.log").read_text()[-3000:]
    starts = unit_starts(notes)
    figures = {"worker_kills": kills, "units_redone": sum(starts.values()) - N_UNITS,
               **check_against_clean(out, chaos_collection["clean"])}
    assert figures["temp_files_left_hidden"] >= 1  # the kills did land mid-write
    report("kill-mid-write", figures)
