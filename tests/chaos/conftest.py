"""Chaos fixtures: a store of 300 small images (19 work units of 16), its clean run, `segflow`
subprocesses whose Dask workers load :mod:`tests.chaos.slow_worker`, an external Dask cluster, and
the checks every chaos test makes of a run directory against the clean run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from segcore import fsio
from segcore.models import create_model
from segcore.models.checkpoint import ModelMeta, save_checkpoint
from segcore.normalise import Normalisation
from segcore.run.results import open_run
from segcore.run.rundir import label_arrays, masks_path
from segcore.synthetic import CLASS_NAMES, generate_collection
from tests.external_cluster import external_cluster

REPO = Path(__file__).resolve().parents[2]
PRELOAD = str(Path(__file__).with_name("slow_worker.py"))
N_IMAGES, CHUNK = 300, 16
N_UNITS = -(-N_IMAGES // CHUNK)  # 19
QUIET_KEYS = ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "DASK_LOGGING__DISTRIBUTED")


@pytest.fixture(autouse=True)
def _harness(prefect_harness):
    yield


def chaos_env(log: Path, *, delay_s: float, hold: Path | None = None) -> dict[str, str]:
    """Environment of a `segflow` or `dask worker` process whose workers write slowly and log their units
    (and, with ``hold``, start no unit's work while that file exists)."""
    env = {k: v for k, v in os.environ.items() if k not in QUIET_KEYS}
    env.update(PYTHONPATH=str(REPO), PREFECT_SERVER_ANALYTICS_ENABLED="false", OMP_NUM_THREADS="1",
               DASK_DISTRIBUTED__WORKER__PRELOAD=f'["{PRELOAD}"]', SEGFLOW_CHAOS_LOG=str(log),
               SEGFLOW_CHAOS_WRITE_DELAY_S=str(delay_s))
    if hold is not None:
        env["SEGFLOW_CHAOS_HOLD"] = str(hold)
    return env


def start_segflow(*args: str, env: dict[str, str], log_to: Path) -> subprocess.Popen:
    """``segflow ARGS`` in a session of its own (so the whole process tree can be killed at once)."""
    out = open(log_to, "w")
    return subprocess.Popen([sys.executable, "-m", "flows.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                            env=env, cwd=REPO, start_new_session=True)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the process group of ``proc`` (the CLI, its Dask cluster, its workers)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def done_units(run_dir: Path) -> int:
    units = run_dir / "units"
    return len([p for p in units.glob("unit-*.json")]) if units.exists() else 0


def wait_until(check, *, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def unit_starts(log: Path) -> Counter:
    """How often each unit was started, from the workers' notes."""
    if not log.exists():
        return Counter()
    return Counter(line.split()[2] for line in log.read_text().splitlines() if line.split()[1:2] == ["start"])


@pytest.fixture(scope="session")
def chaos_collection(tmp_path_factory) -> dict:
    """300 synthetic 32x32 images with masks ingested into a store of 19 chunks (16 images each, the
    last 12), a 3-class UNet checkpoint, and a clean run of it (no kills)."""
    from flows.pipeline import ingest_flow, segment_flow, with_runner
    from segcore.config import ExecutionSpec, IngestSpec, SegmentSpec

    root = tmp_path_factory.mktemp("chaos")
    generate_collection(root / "col", n_images=N_IMAGES, size=32, seed=3)
    torch.manual_seed(0)
    model = create_model("unet", in_channels=1, num_classes=3, base=4, depth=2)
    meta = ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2}, class_names=CLASS_NAMES, in_channels=1,
                     normalisation=Normalisation(mode="range", scale=255.0))
    ckpt = str(save_checkpoint(root / "model.safetensors", model, meta))
    store = str(root / "store.zarr")
    local = ExecutionSpec(n_workers=2, threads_per_worker=1)
    with_runner(ingest_flow, local)(IngestSpec(images=str(root / "col" / "images"), masks=str(root / "col" / "masks"),
                                               store=store, max_chunk_images=CHUNK))
    clean = root / "clean"
    summary = with_runner(segment_flow, local)(SegmentSpec(store=store, checkpoint=ckpt, out=str(clean),
                                                            batch_size=8, execution=local))
    assert summary["units"] == N_UNITS and summary["units_failed"] == 0
    return {"root": root, "store": store, "checkpoint": ckpt, "clean": clean,
            "images": str(root / "col" / "images"), "masks": str(root / "col" / "masks")}


def segment_args(col: dict, out: Path, *extra: str) -> list[str]:
    return ["segment", "--store", col["store"], "--checkpoint", col["checkpoint"], "--out", str(out),
            "--batch-size", "8", *extra]


def _masks(run_dir: Path) -> dict[str, np.ndarray]:
    return {name: arr[...] for name, arr in label_arrays(masks_path(str(run_dir))).items()}


def check_against_clean(run_dir: Path, clean: Path, *, units: int = N_UNITS, same_chunking: bool = True) -> dict:
    """Every check of a chaos test; returns the figures. Asserts: every visible Parquet file reads,
    no temporary file is listed by a reader, the masks equal the clean run's bit for bit, and the
    Dice table holds each (image, class) row of the clean run exactly once, with equal values
    (``same_chunking=False``: but for the ``unit`` column, for a store ingested with another chunk
    size than the clean run's, whose units are other chunks)."""
    visible = fsio.list_files(str(run_dir))
    assert not [f for f in visible if f.endswith(".tmp")]
    for f in visible:
        if f.endswith(".parquet"):
            pq.read_table(f)  # a half-written part would not read
    leftovers = [p for p in run_dir.rglob("*.tmp")]
    assert all(p.name.startswith(".") for p in leftovers)  # hidden: dataset readers skip them
    got, want = _masks(run_dir), _masks(clean)
    assert sorted(got) == sorted(want)
    bitwise = all(np.array_equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    dice, ref = open_run(str(run_dir)).dice_table(), open_run(str(clean)).dice_table()
    keys = Counter(zip(dice.column("image_id").to_pylist(), dice.column("class_id").to_pylist()))
    ref_keys = set(zip(ref.column("image_id").to_pylist(), ref.column("class_id").to_pylist()))
    duplicated = sum(n - 1 for n in keys.values())
    lost = len(ref_keys - set(keys))
    cols = [c for c in ref.column_names if c != "run_id" and (same_chunking or c != "unit")]
    order = [("image_id", "ascending"), ("class_id", "ascending")]
    same_values = dice.select(cols).sort_by(order).equals(ref.select(cols).sort_by(order))
    figures = {"rows": dice.num_rows, "clean_rows": ref.num_rows, "duplicated": duplicated, "lost": lost,
               "masks_bitwise_equal": bitwise, "dice_values_equal": same_values, "done_units": done_units(run_dir),
               "temp_files_left_hidden": len(leftovers)}
    assert bitwise and duplicated == 0 and lost == 0 and same_values, figures
    assert dice.num_rows == ref.num_rows == N_IMAGES * len(CLASS_NAMES)
    assert figures["done_units"] == units
    return figures


def report(name: str, figures: dict) -> None:
    """The figures of a chaos test, on stdout (``pytest -s`` shows them)."""
    print(f"\nchaos {name}: " + ", ".join(f"{k}={v}" for k, v in figures.items()))


@pytest.fixture
def chaos_cluster(tmp_path):
    """An external `dask scheduler` and two `dask worker` processes (each under a nanny that restarts
    it when it dies), with the slow-write preload; yields ``(address, log of the workers' notes)``."""
    notes = tmp_path / "worker-notes.log"
    # A unit may be on several of the workers killed in a test: let it be retried more than the default 3 times.
    env = dict(chaos_env(notes, delay_s=0.25), DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="20")
    with external_cluster(tmp_path, env=env, name="chaos") as address:
        yield address, notes
