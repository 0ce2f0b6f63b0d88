"""Peak memory of one whole-image work unit as the unit grows: what scales with the images, what with the batches.

A store of 1024 x 1024 synthetic 8-bit images with class ground truth is written with chunks of
16, 32 and 64 images (one chunk is one work unit). For each unit size and batch size, a fresh
child process loads the model, runs one unit by hand (:func:`segcore.run.units.segment_unit`:
read, predict, write the mask chunk, score, Parquet part, done-record) and reports the growth of
its resident memory over the unit: the peak (``ru_maxrss``) minus the resident memory just
before the unit, the model already loaded and run once.

``--code DIR`` runs the children on another checkout of segflow (e.g. an earlier commit in a
``git worktree``), so that two versions are measured side by side in one run.

Not a test: figures go to bench/RESULTS.md.

    .venv/bin/python bench/unit_memory.py                      # units of 16, 32, 64 images, batch 2 and 8
    .venv/bin/python bench/unit_memory.py --code /tmp/segflow-before
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(store: str, ckpt: str, out: str, batch: int) -> None:
    """Run the store's first unit by hand and print one JSON line of figures."""
    import numpy as np

    from segcore.models.predict import load_predictor
    from segcore.run.start import start_run
    from segcore.run.units import segment_unit

    ctx, plan, meta, _ = start_run(store, ckpt, out, batch_size=batch, device="cpu")
    predictor = load_predictor(ckpt, sha256=ctx.checkpoint_sha256, device="cpu")
    predictor.labels(np.zeros((batch, 64, 64, 1), np.uint8), batch_size=batch)  # warm: allocator, thread pool
    unit = plan.units[0]
    before = _rss_mib()
    t = time.perf_counter()
    record = segment_unit(ctx, unit)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"images": unit.n_images, "batch": batch, "before_mib": before, "peak_mib": peak,
                      "growth_mib": peak - before, "seconds": time.perf_counter() - t,
                      "evaluated": record.n_evaluated}))


def make_store(folder: Path, n: int, size: int, per_chunk: int) -> str:
    """The store of ``n`` synthetic images (:func:`workload.make_collection`) with ``per_chunk`` images
    per chunk, i.e. per work unit (written directly: ``segflow ingest`` sizes chunks by pixels)."""
    from segcore.collection.sources import pair_sources, probe_sources
    from segcore.collection.store import chunk_rows, create_store, plan_groups, write_manifest, write_store_chunk
    from workload import make_collection

    if len(list((folder / "images").glob("*.png"))) != n:
        make_collection(folder, n, size)
    store = folder / f"store-{per_chunk}.zarr"
    if not store.exists():
        rows = probe_sources(pair_sources(str(folder / "images"), str(folder / "masks")))
        groups, planned = plan_groups(rows, chunk_pixels=per_chunk * size * size, max_chunk_images=per_chunk)
        create_store(str(store), groups, with_gt=True, mask_kind="class", spec={})
        write_manifest(str(store), [r for c in chunk_rows(planned, groups)
                                    for r in write_store_chunk(str(store), c, threads=2)])
    return str(store)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, nargs="+", default=[16, 32, 64], help="images per unit")
    ap.add_argument("--batches", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--base", type=int, default=8, help="UNet width (depth 4); memory of activations grows with it")
    ap.add_argument("--code", default=str(ROOT), help="segflow checkout the children run (default: this one)")
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "unit_memory"))
    ap.add_argument("--child", nargs=4, metavar=("STORE", "CKPT", "OUT", "BATCH"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        sys.path.insert(0, os.environ.get("SEGFLOW_CODE", str(ROOT)))
        child(*args.child[:3], int(args.child[3]))
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    from workload import make_checkpoint  # bench/workload.py: the benchmarks' UNet (puts the repository on sys.path)

    ckpt = make_checkpoint(work, args.base, 4)
    code = str(Path(args.code).resolve())
    print(f"code: {code}; images {args.size}x{args.size} uint8, 3 classes; UNet base {args.base} depth 4; CPU")
    print("| images per unit | batch | RSS before the unit (MiB) | growth over the unit (MiB) | seconds |")
    print("| ---: | ---: | ---: | ---: | ---: |")
    for n in args.units:
        store = make_store(work, max(args.units), args.size, n)
        for batch in args.batches:
            out = work / f"run-{n}-{batch}"
            subprocess.run(["rm", "-rf", str(out)], check=True)
            env = {**os.environ, "SEGFLOW_CODE": code, "PYTHONPATH": code}
            done = subprocess.run([sys.executable, __file__, "--child", store, ckpt, str(out), str(batch)],
                                  env=env, cwd=code, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"child failed:\n{done.stderr[-3000:]}")
            r = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"| {r['images']} | {r['batch']} | {r['before_mib']:.0f} | {r['growth_mib']:.0f} | "
                  f"{r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
