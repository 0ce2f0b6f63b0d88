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
    out, notes, hold = tmp_path / "run", tmp_path / "worker-notes.log", tmp_path / "hold"
    hold.touch()  # the first run's units wait, inside the run directory, until the second has been refused
    env = chaos_env(notes, delay_s=0.0, hold=hold)
    args = segment_args(chaos_collection, out, "--workers", "2", "--threads-per-worker", "1")
    first = start_segflow(*args, env=env, log_to=tmp_path / "first.log")
    try:
        wait_until(lambda: sum(unit_starts(notes).values()) >= 1, timeout=300, what="the first run's first unit",
                   proc=first)
        second = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                                env=env, cwd=REPO, timeout=300)
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert done_units(out) == 0
    finally:
        hold.unlink()
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
