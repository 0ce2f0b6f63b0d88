"""Two `segflow segment` into one run directory at once: the second refuses, naming the first."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.chaos.conftest import (N_UNITS, REPO, check_against_clean, chaos_env, done_units, report, segment_args,
                                  start_segflow, unit_starts, wait_until)

pytestmark = pytest.mark.chaos


def test_a_second_writer_refuses_and_the_first_completes(chaos_collection, tmp_path):
    out, notes = tmp_path / "run", tmp_path / "worker-notes.log"
    env = chaos_env(notes, delay_s=3.0)  # slow enough that the second command (cluster start included) meets it
    args = segment_args(chaos_collection, out, "--workers", "2", "--threads-per-worker", "1")
    first = start_segflow(*args, env=env, log_to=tmp_path / "first.log")
    wait_until(lambda: done_units(out) >= 1, timeout=300, what="the first run's first unit", proc=first)
    second = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, env=env,
                            cwd=REPO, timeout=300)
    assert first.poll() is None, "the first run ended before the second started: make the units slower"
    assert second.returncode == 2
    line = second.stderr.strip().splitlines()[-1]
    assert line.startswith(f"segflow: error: run directory {out} is being written by pid {first.pid} on host "
                           f"{socket.gethostname()} since "), second.stderr
    assert line.endswith("or use another --out")
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    starts = unit_starts(notes)
    assert sum(starts.values()) == N_UNITS  # every unit computed once: the second did none
    report("one-writer", {"second_exit": second.returncode, "unit_starts": sum(starts.values()),
                          **check_against_clean(out, chaos_collection["clean"])})
