"""`segflow run` SIGKILLed during its ingest, then the same command again."""

from __future__ import annotations

import pytest

from tests.chaos.conftest import (chaos_env, check_against_clean, kill_tree, report, start_segflow, wait_until)

pytestmark = pytest.mark.chaos


def test_run_killed_during_ingest_and_run_again(chaos_collection, tmp_path):
    store, out = tmp_path / "store.zarr", tmp_path / "run"
    env = chaos_env(tmp_path / "worker-notes.log", delay_s=0.0)
    args = ["run", "--images", chaos_collection["images"], "--masks", chaos_collection["masks"], "--store", str(store),
            "--checkpoint", chaos_collection["checkpoint"], "--out", str(out), "--batch-size", "8",
            "--workers", "2", "--threads-per-worker", "1"]
    first = start_segflow(*args, env=env, log_to=tmp_path / "first.log")
    wait_until(lambda: (store / "images").exists(), timeout=300, what="the store being written", proc=first)
    kill_tree(first)
    assert not (store / "manifest.parquet").exists() or not out.exists()
    again = start_segflow(*args, env=env, log_to=tmp_path / "again.log")
    assert again.wait(timeout=300) == 0, (tmp_path / "again.log").read_text()[-3000:]
    n_units = len(list((out / "units").glob("unit-*.json")))
    report("ingest-kill", {"kills": 1, **check_against_clean(out, chaos_collection["clean"], units=n_units,
                                                                      same_chunking=False)})
