"""`segflow ingest` of 2,000 files SIGKILLed (with its whole process group) once about half its
chunks are written, then run again: it resumes without --overwrite, decodes only the chunks that
were not written, and the store equals one ingested without interruption.

The files of the chunks written before the kill are overwritten with zeros of the same size and
modification stamp before the re-run: had the re-run read them, its store would differ."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flows.pipeline import ingest_flow, with_runner
from segcore.collection.imageio import write_png
from segcore.collection.resume import DONE_DIR, RECORD_DIR, done_chunks
from segcore.config import ExecutionSpec, IngestSpec
from tests.segcore.collection.serial import ingest_serially
from tests.segcore.collection.test_ingest_resume import _scramble_files_of_written_chunks, assert_same_store

REPO = Path(__file__).resolve().parents[2]
N_FILES = 2_000
# 16x16 images: 4,194,304 // 256 = 16,384 per chunk, capped at 64 -> ceil(2000 / 64) = 32 chunks
N_CHUNKS = 32
ONE_WORKER = ExecutionSpec(n_workers=1, threads_per_worker=1)


@pytest.fixture
def many(tmp_path) -> Path:
    """2,000 images of 16x16 (their files are scrambled by the test)."""
    root = tmp_path / "many"
    rng = np.random.default_rng(5)
    for i in range(N_FILES):
        write_png(root / "images" / f"im-{i:04d}.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
    return root / "images"


def _kill_midway(images: Path, store: Path) -> int:
    """Start `segflow ingest` in a process group of its own; SIGKILL the group once half the chunks are
    marked written. Returns how many chunks were marked then."""
    env = dict(os.environ, PYTHONPATH=str(REPO), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "ingest", "--images", str(images), "--store",
                             str(store), "--workers", "1", "--threads-per-worker", "1"], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    done = store / RECORD_DIR / DONE_DIR
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if done.is_dir() and sum(1 for p in done.iterdir() if not p.name.startswith(".")) >= N_CHUNKS // 2:
                break
            time.sleep(0.005)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL, "the ingest finished (or failed) before half its chunks were written"
    return len(done_chunks(str(store)))


def test_an_ingest_killed_midway_resumes_and_decodes_only_the_rest(many, tmp_path):
    clean = IngestSpec(images=str(many), store=str(tmp_path / "clean.zarr"))
    ingest_serially(clean)
    store = tmp_path / "s.zarr"
    kept = _kill_midway(many, store)
    assert 0 < kept < N_CHUNKS
    files_kept = _scramble_files_of_written_chunks(str(store))
    result = with_runner(ingest_flow, ONE_WORKER)(IngestSpec(images=str(many), store=str(store)))
    assert (result["resumed"], result["chunks"]) == (kept, N_CHUNKS - kept)
    assert (result["decoded"], result["hashed"], result["images"]) == (N_FILES - files_kept, 0, N_FILES)
    assert_same_store(str(store), clean.store)
    sys.stderr.write(f"\ningest of {N_FILES} files in {N_CHUNKS} chunks killed with {kept} written "
                     f"({files_kept} files); the re-run decoded {result['decoded']} files in {result['chunks']} "
                     "chunks\n")

