"""bench/peers.py does the same work every way: on a tiny collection (70 images of 32x32, two units,
a UNet of base 4), the bare loop, plain Dask, Ray Data (when installed: the ``bench`` extra) and
``segflow segment`` write bit-identical masks and identical Dice rows; and the comparisons that say
so do see a difference."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from segcore.collection.store import open_store
from segcore.run.plan import make_plan

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import peers  # noqa: E402 - bench/peers.py
import workload  # noqa: E402 - bench/workload.py

N_IMAGES, SIZE = 70, 32  # two units: 64 + 6 images (at most 64 images per chunk)
THREADS = 2  # torch threads of every row


@pytest.fixture(scope="module")
def setup(tmp_path_factory, prefect_harness) -> dict:
    """The store, the checkpoint, the plan, and ``segflow segment``'s row (the reference)."""
    work = tmp_path_factory.mktemp("peers")
    store = str(workload.ensure_store(work, N_IMAGES, SIZE))
    checkpoint = workload.make_checkpoint(work, 4, 2)
    units = make_plan(open_store(store), None).units
    reference = peers.run_segflow(store, checkpoint, work / "segflow", batch_size=8, threads=THREADS)
    return {"work": work, "store": store, "checkpoint": checkpoint, "units": units, "reference": reference}


def _job(setup: dict, name: str) -> peers.Job:
    return peers.peer_job(setup["work"], name, store=setup["store"], checkpoint=setup["checkpoint"], batch_size=8,
                          threads=THREADS)


def test_segflow_reference_wrote_every_mask_and_dice_row(setup) -> None:
    ref = setup["reference"]
    assert len(setup["units"]) == 2
    assert ref.images == N_IMAGES
    assert ref.dice.num_rows == N_IMAGES * 3  # every image has a mask; three classes
    labels = ref.masks["g000"][:]
    assert labels.shape == (N_IMAGES, SIZE, SIZE)
    assert set(np.unique(labels)) == {0, 1, 2}  # written, and every class somewhere (0 is the fill value)


@pytest.mark.parametrize("peer", ["bare", "dask", "ray"])
def test_each_peer_writes_what_segflow_writes(setup, peer: str) -> None:
    if peer == "ray" and importlib.util.find_spec("ray") is None:
        pytest.skip("ray is not installed (the bench extra: pip install -c constraints.txt -e '.[bench]')")
    job, units = _job(setup, peer), setup["units"]
    threads = torch.get_num_threads()
    try:
        row = {"bare": lambda: peers.run_bare(job, units), "dask": lambda: peers.run_dask(job, units),
               "ray": lambda: peers.run_ray(job, units)}[peer]()
    finally:
        torch.set_num_threads(threads)  # the bare loop sets this process's
    assert row.images == N_IMAGES
    assert peers.check_identical([setup["reference"], row], setup["reference"]) == [
        f"{peer} vs segflow: masks identical, Dice rows identical ({N_IMAGES * 3} rows)"]


def test_the_comparisons_see_a_flipped_pixel_and_a_changed_dice() -> None:
    a = {"g": np.zeros((3, 2, 2), np.uint8)}
    b = {"g": a["g"].copy()}
    assert peers.mask_difference(a, b) is None
    b["g"][2, 1, 0] = 1
    assert peers.mask_difference(a, b) == "g: 1 pixels in 1 images (first image 2)"
    assert peers.mask_difference(a, {"h": a["g"]}) == "groups ['h'] instead of ['g']"
    t = pa.table({"run_id": ["x", "x"], "image_id": ["i1", "i0"], "class_id": [0, 0], "dice": [0.5, 1.0]})
    u = pa.table({"run_id": ["y", "y"], "image_id": ["i0", "i1"], "class_id": [0, 0], "dice": [1.0, 0.5]})
    assert peers.dice_difference(t, u) is None  # run ids and row order aside
    u = u.set_column(3, "dice", pa.array([1.0, 0.25]))
    assert peers.dice_difference(t, u) == "columns ['dice'] differ"
    assert peers.dice_difference(t, u.slice(0, 1)) == "1 rows instead of 2"


def test_a_run_puts_each_row_in_a_process_of_its_own_twice(setup, capsys) -> None:
    """The script as a user runs it: each row in a child process that reports its figures, in the given
    order and then in reverse; the parent reads every run's outputs back from disk and compares them."""
    threads = torch.get_num_threads()
    try:
        rc = peers.main(["--images", str(N_IMAGES), "--size", str(SIZE), "--checkpoint", setup["checkpoint"],
                         "--threads", str(THREADS), "--workdir", str(setup["work"]), "--peers", "bare,segflow"])
    finally:
        torch.set_num_threads(threads)  # the script sets this process's
    printed = capsys.readouterr().out
    assert rc == 0
    runs = [line.split(":")[0] for line in printed.splitlines() if f": {N_IMAGES} images in " in line]
    assert runs == ["bare", "segflow", "segflow-2", "bare-2"]
    assert "each row in a process of its own, each row twice" in printed
    for name in ("bare", "segflow-2", "bare-2"):
        assert f"{name} vs segflow: masks identical, Dice rows identical ({N_IMAGES * 3} rows)" in printed
    assert "bare, both runs: " in printed and "segflow, both runs: " in printed
    assert "RATIO segflow/bare = " in printed
    assert sorted(p.name for p in (setup["work"] / "peers").glob("*.json")) == [
        "bare-2.json", "bare.json", "segflow-2.json", "segflow.json"]


def test_a_failing_row_stops_the_run_with_its_name(setup) -> None:
    with pytest.raises(SystemExit, match="the bare row failed"):
        peers.main(["--images", str(N_IMAGES), "--size", str(SIZE),
                    "--checkpoint", str(setup["work"] / "missing.safetensors"), "--threads", str(THREADS),
                    "--workdir", str(setup["work"]), "--peers", "bare", "--once"])
