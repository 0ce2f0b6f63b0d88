"""The same work four ways, in one run of this script: a bare loop, plain Dask, Ray Data and `segflow segment`.

The work, for every unit of the run plan (one Zarr chunk of the ingested store,
:func:`segcore.run.plan.make_plan`): read the image chunk, normalise, forward in batches through
:class:`~segcore.models.predict.TorchPredictor` (so the forward pass is identical), argmax, write
the mask chunk to a Zarr array, Dice per image and class against the ground-truth chunk with
segflow's evaluation functions, one Parquet part (bench/peer_work.py holds it, as a user would
write it without segflow). It runs:

- bare:    a plain loop over the units;
- dask:    ``client.map`` over a ``distributed.LocalCluster`` of 1 worker process with 1 task
           thread (as segflow's local cluster), the model cached per worker; Dask's own settings
           unless ``--dask-tuned`` (then segflow's local-cluster settings, flows/execution.py);
- ray:     Ray Data, ``map_batches`` with an actor class (the model loaded once per actor), one
           actor holding every CPU, one unit per batch (needs the ``bench`` extra: ray[data]);
- segflow: ``segflow segment --device cpu`` end to end (Prefect, its Dask cluster, done-records,
           summary, artifacts).

The rows run in the order of ``--peers`` (the bare loop first), then again in reverse
(``--once``: one pass), and each row's images/s are taken over both its runs: a machine that grows
slower or faster during the run (shared machines do, by several per cent in a quarter of an hour)
then weighs on every row alike. Each run is a new Python process of its own (``--one-process``: all
in this one), so that no row inherits what an earlier one left behind: environment variables,
thread pools, allocator state. Every row's torch uses the same number of threads (``--threads``, default
all cores, as segflow's single local worker does). Images/s are end to end (cluster start, model
load and shutdown included, and the import of Ray for its row and of Prefect for segflow's; torch,
zarr, Dask and segcore are imported before the clock starts); *steady* is first unit start to last
unit end. Afterwards every row's masks and Dice rows are compared with segflow's: they must be
equal, bit for bit.

    .venv/bin/python bench/peers.py --images 1000 --size 256
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

os.environ["RAY_USAGE_STATS_ENABLED"] = "0"  # Ray offline: no usage reports, asked or not

import dask  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402
import zarr  # noqa: E402

from workload import ROOT, ensure_store, make_checkpoint, segflow  # noqa: E402 - first: puts the repository on sys.path
from peer_work import ChunkSegmenter, Job, create_mask_arrays, segment_chunk, worker_state  # noqa: E402

from flows.execution import QUIET_HOUSEKEEPING  # noqa: E402
from segcore.collection.store import open_store  # noqa: E402
from segcore.models.record import model_sha256  # noqa: E402
from segcore.run.plan import WorkUnit, make_plan  # noqa: E402
from segcore.run.rundir import dice_dir, label_arrays, masks_path  # noqa: E402
from segcore.run.tables import read_dice  # noqa: E402

BENCH = Path(__file__).resolve().parent
PEERS = ("bare", "dask", "ray", "segflow")
#: Dask's own values of the settings segflow's local clusters change (read before any cluster starts).
_MALLOC = "distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_"
PLAIN_DASK = {k: dask.config.get(k, None) for k in (_MALLOC, *QUIET_HOUSEKEEPING)}
TUNED_DASK = {_MALLOC: None, **QUIET_HOUSEKEEPING}


@dataclass(frozen=True)
class Row:
    """One way of doing the work: its images, seconds (end to end, steady) and what it wrote."""

    name: str
    images: int
    seconds: float
    steady: float
    masks: dict[str, zarr.Array]
    dice: pa.Table


@contextmanager
def worker_paths() -> Iterator[None]:
    """The repository and bench/ on ``PYTHONPATH`` inside, so that the Dask and Ray worker processes
    started there import the same segcore and bench/peer_work.py as this process; on leaving, this
    process's environment as it was. (Dask's nannies export their pre-spawn variables, among them
    ``MALLOC_TRIM_THRESHOLD_=65536``, into the environment of the process that starts them and leave
    them there: every process started later, the next rows' workers included, would inherit them.)"""
    before = dict(os.environ)
    have = [p for p in (before.get("PYTHONPATH") or "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join(dict.fromkeys([str(ROOT), str(BENCH), *have]))
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(before)


def steady(done: Sequence[tuple[int, float, float]]) -> float:
    """First unit start to last unit end, of ``(images, started, finished)`` records."""
    return max(d[2] for d in done) - min(d[1] for d in done)


def peer_job(out: Path, name: str, *, store: str, checkpoint: str, batch_size: int, threads: int) -> Job:
    """A fresh output directory ``out/name`` (masks.zarr, dice/run_id=<name>/) and the job writing there."""
    shutil.rmtree(out / name, ignore_errors=True)
    return Job(store=store, checkpoint=checkpoint, checkpoint_sha256=model_sha256(checkpoint),
               masks=str(out / name / "masks.zarr"), dice=dice_dir(str(out / name), name),
               batch_size=batch_size, threads=threads)


def finish(name: str, job: Job, seconds: float, done: Sequence[tuple[int, float, float]]) -> Row:
    masks = dict(zarr.open_group(job.masks, mode="r").arrays())
    return Row(name, sum(d[0] for d in done), seconds, steady(done), masks, read_dice(Path(job.dice).parent))


def run_bare(job: Job, units: Sequence[WorkUnit], name: str = "bare") -> Row:
    """The units one after the other in this process (model loaded anew)."""
    worker_state.cache_clear()
    t0 = time.perf_counter()
    create_mask_arrays(job)
    done = [segment_chunk(job, u.group, u.start, u.stop, u.name) for u in units]
    return finish(name, job, time.perf_counter() - t0, done)


def run_dask(job: Job, units: Sequence[WorkUnit], *, tuned: bool = False, name: str = "dask") -> Row:
    """``client.map`` of the units over a new LocalCluster of one worker process, one task thread."""
    import distributed

    t0 = time.perf_counter()
    with worker_paths(), dask.config.set(TUNED_DASK if tuned else PLAIN_DASK), \
            distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                     dashboard_address=":0") as cluster, distributed.Client(cluster) as client:
        create_mask_arrays(job)
        futures = client.map(segment_chunk, [job] * len(units), [u.group for u in units], [u.start for u in units],
                             [u.stop for u in units], [u.name for u in units], pure=False)
        done = client.gather(futures)
    return finish(name, job, time.perf_counter() - t0, done)


def run_ray(job: Job, units: Sequence[WorkUnit], name: str = "ray") -> Row:
    """Ray Data over the units: ``map_batches`` with :class:`ChunkSegmenter`, one actor, every CPU."""
    import logging

    import ray

    t0 = time.perf_counter()
    with worker_paths():  # a new local Ray instance on the loopback address, no dashboard, no usage reports
        ray.init(address="local", num_cpus=job.threads, include_dashboard=False, logging_level=logging.WARNING,
                 log_to_driver=False, object_store_memory=256 * 2**20, _node_ip_address="127.0.0.1")
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        create_mask_arrays(job)
        ds = ray.data.from_items([{"group": u.group, "start": u.start, "stop": u.stop, "name": u.name}
                                  for u in units])
        out = ds.map_batches(ChunkSegmenter, fn_constructor_kwargs={"job": job}, batch_size=1,
                             compute=ray.data.ActorPoolStrategy(size=1), num_cpus=job.threads).take_all()
    finally:
        ray.shutdown()
    done = [(int(r["images"]), float(r["started"]), float(r["finished"])) for r in out]
    return finish(name, job, time.perf_counter() - t0, done)


def run_segflow(store: str, checkpoint: str, run_dir: Path, *, batch_size: int, threads: int,
                name: str = "segflow") -> Row:
    """``segflow segment`` end to end on the CPU, one local worker with ``threads`` torch threads."""
    shutil.rmtree(run_dir, ignore_errors=True)
    t0 = time.perf_counter()
    rc = segflow(["segment", "--store", store, "--checkpoint", checkpoint, "--out", str(run_dir), "--device", "cpu",
                  "--batch-size", str(batch_size), "--workers", "1", "--threads-per-worker", str(threads)])
    seconds = time.perf_counter() - t0
    assert rc == 0, "segflow segment failed"
    records = [json.loads(p.read_text()) for p in (run_dir / "units").glob("*.json")]
    done = [(r["n_images"], r["timing"]["started"], r["timing"]["finished"]) for r in records]
    return Row(name, sum(d[0] for d in done), seconds, steady(done), label_arrays(masks_path(str(run_dir))),
               read_dice(dice_dir(str(run_dir))))


def mask_difference(ref: dict[str, zarr.Array], other: dict[str, zarr.Array]) -> str | None:
    """None when both hold the same groups with bit-identical labels; else where they differ."""
    if sorted(ref) != sorted(other):
        return f"groups {sorted(other)} instead of {sorted(ref)}"
    found = []
    for g in sorted(ref):
        a, b = ref[g][:], other[g][:]
        if a.shape != b.shape or a.dtype != b.dtype:
            found.append(f"{g}: {b.dtype}{b.shape} instead of {a.dtype}{a.shape}")
        elif not np.array_equal(a, b):
            per_image = (a != b).reshape(len(a), -1).sum(axis=1)
            found.append(f"{g}: {int(per_image.sum())} pixels in {int((per_image > 0).sum())} images "
                         f"(first image {int(np.flatnonzero(per_image)[0])})")
    return "; ".join(found) or None


def dice_difference(ref: pa.Table, other: pa.Table) -> str | None:
    """None when both Dice tables hold the same rows (``run_id`` aside, in any order); else the
    columns that differ."""
    def canonical(t: pa.Table) -> pa.Table:
        return t.drop_columns(["run_id"]).sort_by([("image_id", "ascending"), ("class_id", "ascending")])

    a, b = canonical(ref), canonical(other)
    if a.num_rows != b.num_rows:
        return f"{b.num_rows} rows instead of {a.num_rows}"
    cols = [c for c in a.column_names if not a.column(c).equals(b.column(c))]
    return f"columns {cols} differ" if cols else None


def check_identical(rows: Sequence[Row], reference: Row) -> list[str]:
    """One line per row: its masks and Dice against ``reference``'s (``identical`` or where not)."""
    lines = []
    for r in rows:
        if r is reference:
            continue
        m, d = mask_difference(reference.masks, r.masks), dice_difference(reference.dice, r.dice)
        lines.append(f"{r.name} vs {reference.name}: masks {'identical' if m is None else 'DIFFER: ' + m}, "
                     f"Dice rows {'identical' if d is None else 'DIFFER: ' + d} ({r.dice.num_rows} rows)")
    return lines


def peer_of(name: str) -> str:
    """The peer a row name stands for: ``ray-2`` (the second run of the Ray row) -> ``ray``."""
    return name.removesuffix("-2")


def read_row(name: str, result: dict, out: Path) -> Row:
    """The row ``name`` from the figures its process reported and the outputs it left under ``out``."""
    if peer_of(name) == "segflow":
        masks, dice = label_arrays(masks_path(str(out / name))), read_dice(dice_dir(str(out / name)))
    else:
        masks = dict(zarr.open_group(str(out / name / "masks.zarr"), mode="r").arrays())
        dice = read_dice(Path(dice_dir(str(out / name), name)).parent)
    return Row(name, int(result["images"]), float(result["seconds"]), float(result["steady"]), masks, dice)


def run_in_child(name: str, argv: Sequence[str], out: Path) -> Row:
    """Row ``name`` in a new Python process of its own (``--row``), which reports its figures in a
    JSON file; nothing a row leaves in a process (environment, threads, allocator state, imports)
    reaches the next."""
    result = out / f"{name}.json"
    result.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv, "--row", name,
                           "--result", str(result)], check=False)
    if proc.returncode != 0 or not result.exists():
        raise SystemExit(f"the {name} row failed (exit status {proc.returncode})")
    return read_row(name, json.loads(result.read_text()), out)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--base", type=int, default=32, help="UNet width (default 32, the reference UNet)")
    ap.add_argument("--depth", type=int, default=4, help="UNet depth (default 4)")
    ap.add_argument("--checkpoint", help="checkpoint to use (default: an untrained UNet of --base/--depth)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads of every row")
    ap.add_argument("--peers", default=",".join(PEERS), help=f"rows to run, in this order (the bare loop first), of "
                         f"{','.join(PEERS)} (default all, in that order)")
    ap.add_argument("--dask-tuned", action="store_true",
                    help="run the Dask row with segflow's local-cluster settings instead of Dask's own")
    ap.add_argument("--one-process", action="store_true",
                    help="run every row in this process, one after the other (default: each row in a new "
                         "process of its own, so that no row inherits what an earlier one left behind)")
    ap.add_argument("--workdir", default=str(BENCH / "out"))
    ap.add_argument("--once", action="store_true",
                    help="run each row once (default: twice, in the given order and then in reverse, so that a "
                         "machine growing slower or faster during the run weighs on every row alike)")
    # a child of a run: this row only, its figures to --result (JSON)
    ap.add_argument("--row", choices=(*PEERS, *(f"{p}-2" for p in PEERS)), help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    asked = [p.strip() for p in args.peers.split(",") if p.strip()]
    if unknown := set(asked) - set(PEERS):
        ap.error(f"unknown rows {sorted(unknown)}; choose from {PEERS}")

    work = Path(args.workdir)
    store = str(ensure_store(work, args.images, args.size))
    checkpoint = args.checkpoint or make_checkpoint(work, args.base, args.depth)
    units = make_plan(open_store(store), None).units
    out = work / "peers"
    common = dict(store=store, checkpoint=checkpoint, batch_size=args.batch_size, threads=args.threads)
    torch.set_num_threads(args.threads)

    def run_row(name: str) -> Row:
        """Row ``name`` (a peer, or ``<peer>-2`` for its second run) in this process."""
        peer = peer_of(name)
        if peer == "segflow":
            return run_segflow(store, checkpoint, out / name, batch_size=args.batch_size, threads=args.threads,
                               name=name)
        job = peer_job(out, name, **common)
        if peer == "dask":
            return run_dask(job, units, tuned=args.dask_tuned, name=name)
        return (run_ray if peer == "ray" else run_bare)(job, units, name=name)

    if args.row:  # a child of the run below: one row, its figures to --result
        row = run_row(args.row)
        Path(args.result).write_text(json.dumps({"images": row.images, "seconds": row.seconds,
                                                 "steady": row.steady}))
        return 0

    order = (["bare"] if "bare" in asked else []) + [a for a in asked if a != "bare"]  # as given, bare first
    order += [] if args.once else [f"{name}-2" for name in reversed(order)]  # then in reverse
    child_argv = ["--images", str(args.images), "--size", str(args.size), "--batch-size", str(args.batch_size),
                  "--checkpoint", checkpoint, "--threads", str(args.threads), "--workdir", str(work),
                  *(["--dask-tuned"] if args.dask_tuned else [])]
    rows: list[Row] = []
    for name in order:
        row = run_row(name) if args.one_process else run_in_child(name, child_argv, out)
        rows.append(row)
        print(f"{row.name}: {row.images} images in {row.seconds:.1f} s = {row.images / row.seconds:.2f} images/s "
              f"(steady {row.images / row.steady:.2f} images/s, fixed {row.seconds - row.steady:.1f} s)", flush=True)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} with {args.threads} "
          f"threads in every row, {Path(checkpoint).name}, batch {args.batch_size}, {len(units)} units, "
          f"dask settings {'segflow' if args.dask_tuned else 'Dask defaults'}, "
          f"{'one process' if args.one_process else 'each row in a process of its own'}, "
          f"{'once' if args.once else 'each row twice (in the given order, then in reverse)'}")
    ips, steady_ips = {}, {}
    for peer in dict.fromkeys(peer_of(r.name) for r in rows):  # images/s over every run of the row
        runs = [r for r in rows if peer_of(r.name) == peer]
        ips[peer] = sum(r.images for r in runs) / sum(r.seconds for r in runs)
        steady_ips[peer] = sum(r.images for r in runs) / sum(r.steady for r in runs)
        if len(runs) > 1:
            print(f"{peer}, both runs: {ips[peer]:.2f} images/s (steady {steady_ips[peer]:.2f})")
    reference = next((r for r in rows if r.name == "segflow"), rows[0])
    for line in check_identical(rows, reference):
        print(line)
    if "segflow" in ips:
        for peer in [p for p in ("bare", "dask", "ray") if p in ips]:
            print(f"RATIO segflow/{peer} = {ips['segflow'] / ips[peer]:.3f} end to end "
                  f"({steady_ips['segflow'] / steady_ips[peer]:.3f} steady)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
