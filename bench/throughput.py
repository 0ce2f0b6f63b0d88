"""Throughput of `segflow segment` relative to a bare forward loop, in one process run.

Both sides use the same checkpoint and the same ingested Zarr store:

- bare:     for every chunk: read it from Zarr, normalise, forward in batches through the same
            prediction seam as the pipeline (``Predictor.logits``, inference mode), nothing else;
- pipeline: ``segflow segment`` end to end (Prefect flow, Dask LocalCluster of worker processes,
            model load per worker, mask writes, Dice against ground truth, Parquet parts, summary).

The bare loop runs once before the pipeline and once after it, and the ratio is taken against the
mean of the two, so that a shared machine slowing down or speeding up during the ~17-minute
measurement weighs on both sides alike (both bare figures are printed).

Prints images/s of each and the ratio pipeline/bare. Not a test: figures go to bench/RESULTS.md.

    .venv/bin/python bench/throughput.py --images 2000 --size 256

On a GPU both sides run on ``--device`` (``cuda`` or ``cuda:N``) with the autocast ``--precision``
of the pipeline (bf16 unless given); the bare loop then warms up on one batch and waits for the
device before it stops its clock. ``--json`` writes the figures (and the wall-clock windows of the
bare loops and the pipeline) to a file; ``--prepare-only`` makes the collection, the store and the
checkpoint and stops (``bench/gpu_check.sh`` times that apart from the measurement). ``--compile``
runs both sides through ``torch.compile`` (the bare loop compiles on a warm-up batch outside its
clock; the pipeline's steady state after its first unit is printed too).

    python bench/throughput.py --device cuda --precision bf16 --images 1000 --size 512 --jobs 16
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

from workload import ensure_store, make_checkpoint, make_collection, segflow  # noqa: F401  (bench/workload.py:
#                    collection, store, UNet; puts the repository on sys.path; make_collection for the tests)
from segcore.collection.store import open_store
from segcore.models.checkpoint import load_checkpoint
from segcore.models.predict import PRECISIONS, TorchPredictor, resolve_device
from segcore.run.plan import make_plan


def bare_loop(store_path: str, checkpoint: str, batch_size: int, device: str = "cpu",
              precision: str = "bf16", compile: bool = False) -> tuple[int, float]:
    model, meta = load_checkpoint(checkpoint, device=device)
    predictor = TorchPredictor(model, meta, device=device, precision=precision, compile=compile)
    store = open_store(store_path)
    root = zarr.open_group(store_path, mode="r")
    units = make_plan(store, None).units
    cuda = device.startswith("cuda")
    if cuda or compile:  # CUDA context, kernels, allocator and compilation warmed up outside the clock
        with torch.inference_mode():
            first = units[0]
            predictor.logits(predictor.prepare(root[f"images/{first.group}"][first.start:first.start + batch_size]))
        if cuda:
            torch.cuda.synchronize(device)
    n = 0
    t0 = time.perf_counter()
    with torch.inference_mode():
        for unit in units:
            images = root[f"images/{unit.group}"][unit.start:unit.stop]
            for s in range(0, len(images), batch_size):
                predictor.logits(predictor.prepare(images[s:s + batch_size]))
            n += len(images)
    if cuda:
        torch.cuda.synchronize(device)
    return n, time.perf_counter() - t0


def pick_device(device: str) -> tuple[str, str]:
    """``(device of the bare loop, --device of segflow segment)`` for ``--device``.

    ``cuda:N`` narrows ``CUDA_VISIBLE_DEVICES`` to GPU ``N`` before CUDA starts in this process (the
    pipeline's worker processes inherit it), so that both sides run on that GPU as ``cuda:0``.
    """
    if device == "cpu":
        return "cpu", "cpu"
    if device.startswith("cuda:"):
        index = int(device.split(":", 1)[1])
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        os.environ["CUDA_VISIBLE_DEVICES"] = visible.split(",")[index] if visible else str(index)
    resolve_device("cuda")  # a ConfigError that says what to do when torch sees no CUDA device
    return "cuda:0", "cuda"


def gpu_name(device: str) -> str | None:
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else None


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
    ap.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N: where both sides run")
    ap.add_argument("--precision", choices=PRECISIONS,
                    help="autocast dtype on CUDA for both sides (default: the pipeline's, bf16); the CPU runs fp32")
    ap.add_argument("--jobs", type=int, default=1, help="processes that generate the collection (default 1)")
    ap.add_argument("--prepare-only", action="store_true",
                    help="make the collection, the store and the checkpoint, then stop")
    ap.add_argument("--json", help="also write the figures to this JSON file")
    ap.add_argument("--compile", action="store_true",
                    help="both sides through torch.compile (the bare loop compiles on a warm-up batch outside its "
                         "clock; for the pipeline, the steady state after its first unit is printed too)")
    args = ap.parse_args()
    if args.device not in ("cpu", "cuda") and not (args.device.startswith("cuda:") and args.device[5:].isdigit()):
        ap.error(f"--device must be cpu, cuda or cuda:N, got {args.device!r}")
    figures: dict = {"device": args.device, "images": args.images, "base": args.base, "depth": args.depth,
                     "precision": "fp32" if args.device == "cpu" else args.precision or "bf16",
                     "size": args.size, "batch_size": args.batch_size, "torch": torch.__version__}

    work = Path(args.workdir)
    store = ensure_store(work, args.images, args.size, jobs=args.jobs, timings=figures)
    checkpoint = args.checkpoint or make_checkpoint(work, args.base, args.depth)
    figures["checkpoint"] = Path(checkpoint).name
    if args.prepare_only:
        write_figures(args.json, figures)
        return

    bare_device, pipeline_device = pick_device(args.device)
    precision = {"precision": args.precision} if args.precision else {}
    precision.update({"compile": True} if args.compile else {})
    figures["gpu"] = gpu_name(bare_device)
    windows = figures["windows"] = {}
    w0 = time.time()
    n, bare_s = bare_loop(str(store), checkpoint, args.batch_size, bare_device, **precision)
    w1 = time.time()
    windows["bare_before"] = [w1 - bare_s, w1]
    windows["bare_before_with_warmup"] = [w0, w1]
    print(f"bare model(x) loop, before: {n} images in {bare_s:.1f} s = {n / bare_s:.2f} images/s "
          f"(torch threads {torch.get_num_threads()})")

    run_dir = work / "run"
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = ["segment", "--store", str(store), "--checkpoint", checkpoint, "--out", str(run_dir),
           "--batch-size", str(args.batch_size), "--device", pipeline_device]
    if args.precision:
        cmd += ["--precision", args.precision]
    if args.compile:
        cmd += ["--compile"]
    if args.workers:
        cmd += ["--workers", str(args.workers)]
    t = time.perf_counter()
    w0 = time.time()
    rc = segflow(cmd)
    pipe_s = time.perf_counter() - t
    windows["pipeline"] = [w0, time.time()]
    assert rc == 0, "segment failed"
    summary = json.loads((run_dir / "summary.json").read_text())
    units = [json.loads(p.read_text()) for p in (run_dir / "units").glob("*.json")]  # the units' done-records
    assert sum(u["n_images"] for u in units) == n
    pipe_ips = n / pipe_s
    n_after, bare_after_s = bare_loop(str(store), checkpoint, args.batch_size, bare_device, **precision)
    w1 = time.time()
    windows["bare_after"] = [w1 - bare_after_s, w1]
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
    if args.compile and len(units) > 1:  # the first unit of each worker compiles the model
        first_end = min(u["timing"]["finished"] for u in units)
        later = [u for u in units if u["timing"]["started"] >= first_end]
        rest_s = max(u["timing"]["finished"] for u in later) - first_end if later else float("nan")
        n_rest = sum(u["n_images"] for u in later)
        print(f"  steady state after the first unit (compilation excluded): {n_rest} images in {rest_s:.1f} s "
              f"= {n_rest / rest_s:.2f} images/s; RATIO {(n_rest / rest_s) / bare_ips:.3f}")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"checkpoint {Path(checkpoint).name}, batch {args.batch_size}")
    print(f"RATIO pipeline/bare (end to end) = {pipe_ips / bare_ips:.3f}")
    print(f"RATIO pipeline/bare (steady state) = {(n / steady_s) / bare_ips:.3f}")
    windows["pipeline_steady"] = [min(u["timing"]["started"] for u in units),
                                  max(u["timing"]["finished"] for u in units)]
    figures.update(bare_before_ips=n / bare_s, bare_after_ips=n / bare_after_s, bare_ips=bare_ips,
                   pipeline_ips=pipe_ips, pipeline_s=pipe_s, steady_ips=n / steady_s, startup_s=pipe_s - steady_s,
                   units=summary["units"], predict_s=sum(u["timing"]["predict_s"] for u in units),
                   ratio_end_to_end=pipe_ips / bare_ips, ratio_steady=(n / steady_s) / bare_ips,
                   torch_threads=torch.get_num_threads(),
                   pipeline_devices=sorted({u["timing"]["device"] for u in units}))
    write_figures(args.json, figures)


def write_figures(path: str | None, figures: dict) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
