"""The whole `segflow segment` process tree SIGKILLed mid-run, then the same command again."""

from __future__ import annotations

import pytest

from tests.chaos.conftest import (N_UNITS, check_against_clean, chaos_env, done_units, kill_tree, report,
                                  segment_args, start_segflow, unit_starts, wait_until)

pytestmark = pytest.mark.chaos


def test_flow_killed_and_run_again_completes_exactly_once(chaos_collection, tmp_path):
    out, notes = tmp_path / "run", tmp_path / "worker-notes.log"
    env = chaos_env(notes, delay_s=0.25)
    args = segment_args(chaos_collection, out, "--workers", "2", "--threads-per-worker", "1")
    first = start_segflow(*args, env=env, log_to=tmp_path / "first.log")
    wait_until(lambda: done_units(out) >= 4, timeout=300, what="4 units done", proc=first)
    kill_tree(first)
    done_before = done_units(out)
    assert (out / ".segflow-lease.json").exists()  # left behind by the killed process: taken over below
    started_before = sum(unit_starts(notes).values())
    again = start_segflow(*args, env=env, log_to=tmp_path / "again.log")
    assert again.wait(timeout=300) == 0, (tmp_path / "again.log").read_text()[-3000:]
    assert not (out / ".segflow-lease.json").exists()
    starts = unit_starts(notes)
    figures = {"kills": 1, "done_before_kill": done_before, "units_started_before_kill": started_before,
               "units_started_after": sum(starts.values()) - started_before,
               "units_redone": sum(starts.values()) - N_UNITS, **check_against_clean(out, chaos_collection["clean"])}
    assert figures["units_started_after"] == N_UNITS - done_before  # the re-run skips every finished unit
    report("flow-kill", figures)
