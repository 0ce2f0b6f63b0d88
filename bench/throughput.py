"""Throughput of `segflow segment` relative to a bare forward loop, in one process run.

Both sides use the same checkpoint and the same ingested Zarr store:

- bare:     for every chunk: read it from Zarr, normalise, forward in batches through the same
            prediction seam as the pipeline (``Predictor.logits``, inference mode), nothing else;
- pipeline: ``segflow segment`` end to end (Prefect flow, Dask LocalCluster of worker processes,
            model load per worker, mask writes, Dice against ground truth, Parquet parts, summary).

The bare loop runs once before the pipeline and once after it, and the ratio is taken against the
mean of the two, so that a shared machine slowing down or speeding up during the ~10-minute
measurement weighs on both sides alike (both bare figures are printed).

Prints images/s of each and the ratio pipeline/bare. Not a test: figures go to bench/RESULTS.md.

    .venv/bin/python bench/throughput.py --images 2000 --size 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

import torch
import zarr

from workload import ensure_store, make_checkpoint, segflow  # bench/workload.py: collection, store, UNet; puts
                                                              # the repository on sys.path
from segcore.collection.store import open_store
from segcore.models.checkpoint import load_checkpoint
from segcore.models.predict import TorchPredictor
from segcore.run.plan import make_plan


def bare_loop(store_path: str, checkpoint: str, batch_size: int) -> tuple[int, float]:
    model, meta = load_checkpoint(checkpoint)
    predictor = TorchPredictor(model, meta, device="cpu")
    store = open_store(store_path)
    root = zarr.open_group(store_path, mode="r")
    n = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for unit in make_plan(store, None).units:
            images = root[f"images/{unit.group}"][unit.start:unit.stop]
            for s in range(0, len(images), batch_size):
                predictor.logits(predictor.prepare(images[s:s + batch_size]))
            n += len(images)
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=2000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--workers", type=int, default=None, help="local cluster workers for the pipeline")
    ap.add_argument("--checkpoint", help="checkpoint to use (default: an untrained UNet of --base/--depth)")
    ap.add_argument("--base", type=int, default=32, help="UNet width (default 32, the reference UNet)")
    ap.add_argument("--depth", type=int, default=4, help="UNet depth (default 4)")
    ap.add_argument("--workdir", default=str(Path(__file__).resolve().parent / "out"))
    args = ap.parse_args()

    work = Path(args.workdir)
    store = ensure_store(work, args.images, args.size)
    checkpoint = args.checkpoint or make_checkpoint(work, args.base, args.depth)

    n, bare_s = bare_loop(str(store), checkpoint, args.batch_size)
    print(f"bare model(x) loop, before: {n} images in {bare_s:.1f} s = {n / bare_s:.2f} images/s "
          f"(torch threads {torch.get_num_threads()})")

    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = ["segment", "--store", str(store), "--checkpoint", checkpoint, "--out", str(run_dir),
           "--batch-size", str(args.batch_size)]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    t = time.perf_counter()
    rc = segflow(cmd)
    pipe_s = time.perf_counter() - t
    assert rc == 0, "segment failed"
    summary = json.loads((run_dir / "summary.json").read_text())
    units = [json.loads(p.read_text()) for p in (run_dir / "units").glob("*.json")]  # the units' done-records
    assert sum(u["n_images"] for u in units) == n
    pipe_ips = n / pipe_s
    n_after, bare_after_s = bare_loop(str(store), checkpoint, args.batch_size)
    assert n_after == n
    print(f"bare model(x) loop, after: {n} images in {bare_after_s:.1f} s = {n / bare_after_s:.2f} images/s")
    bare_ips = n / ((bare_s + bare_after_s) / 2)
    print(f"bare loop, mean of the two: {bare_ips:.2f} images/s")
    print(f"segflow segment (end to end): {n} images in {pipe_s:.1f} s = {pipe_ips:.2f} images/s "
          f"({summary['units']} units)")
    print(f"  inside units: predict {sum(u['timing']['predict_s'] for u in units):.1f} s, "
          f"unit total {sum(u['timing']['total_s'] for u in units):.1f} s")
    steady_s = max(u["timing"]["finished"] for u in units) - min(u["timing"]["started"] for u in units)
    print(f"  steady state (first unit start to last unit end): {steady_s:.1f} s = {n / steady_s:.2f} images/s; "
          f"fixed start-up/teardown {pipe_s - steady_s:.1f} s")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"checkpoint {Path(checkpoint).name}, batch {args.batch_size}")
    print(f"RATIO pipeline/bare (end to end) = {pipe_ips / bare_ips:.3f}")
    print(f"RATIO pipeline/bare (steady state) = {(n / steady_s) / bare_ips:.3f}")


if __name__ == "__main__":
    main()
