"""The pipeline flows: ingest, segment (+ evaluate), and run (= both in one flow run).

Each flow takes one frozen spec. The steps ``ingest_steps`` and ``segment_steps`` compose tasks
and are shared: ``run_flow`` calls both inside one flow run, on one Dask cluster.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import pyarrow.compute as pc
from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.futures import as_completed

from flows.artifacts import UnitProgress, publish_run_artifacts
from flows.execution import task_runner, torch_threads
from flows.ingest import ingest_steps
from flows.names import ingest_run_name, run_run_name, segment_run_name
from segcore.models import checkpoint as ckpt
from segcore import fsio
from segcore.run import blocks as tiled
from segcore.config import ExecutionSpec, IngestSpec, RunSpec, SegmentSpec, flow_run_token, with_flow_run
from segcore.errors import CheckpointError, NotFound, SegflowError
from segcore.fsio import file_sha256
from segcore.collection.incremental import current_rows
from segcore.run.plan import check_alignment, plan_units
from segcore.run.rundir import finished_units, mask_chunks, prepare_run, read_run_info, write_summary
from segcore.run.results import open_run
from segcore.collection.store import open_store, read_manifest, spec_json, store_exists
from segcore.metrics.summary import render_markdown, summarise_dice, summarise_instances
from tasks.lake import publish_lake_task
from tasks.segment import (detect_block_task, finish_image_task, image_stats_task, paste_block_task,
                           segment_block_task, segment_unit_task)


def preflight(spec: SegmentSpec) -> tuple[ckpt.ModelMeta, str, Any]:
    """Fail fast, before fan-out: checkpoint readable and fitting its architecture, store compatible."""
    meta = ckpt.read_meta(spec.checkpoint)
    ckpt.load_checkpoint(spec.checkpoint)  # weights fit the architecture? raises CheckpointError if not
    sha = file_sha256(spec.checkpoint)
    store = open_store(spec.store)
    for g in store.groups:
        if g.channels != meta.in_channels:
            raise CheckpointError(
                f"store group {g.name} has {g.channels}-channel images but the checkpoint expects "
                f"{meta.in_channels} channel(s); use a checkpoint trained on such images"
            )
    if store.has_gt and store.mask_kind == "instance" and meta.num_classes != 2:
        raise CheckpointError(
            f"the store's ground truth is instance labels (foreground vs background) but the checkpoint has "
            f"{meta.num_classes} classes; ingest class masks with --mask-kind class"
        )
    return meta, sha, store


def _gather(futures: list, what: str, log: Any, *, count_images: bool = False,
            progress: UnitProgress | None = None) -> tuple[list[dict], list[str]]:
    """Results of ``futures`` as they complete, with progress in the log (and in ``progress``, one
    unit per successful future); failures are collected."""
    results, failed = [], []
    images_done, t0 = 0, time.perf_counter()
    step = max(1, len(futures) // 20)
    for n, fut in enumerate(as_completed(futures), start=1):
        try:
            rec = fut.result()
            results.append(rec)
            images_done += rec.get("n_images", 0)
            if progress is not None:
                progress.advance(images=rec.get("n_images", 0))
        except Exception as exc:  # one unit failing loses nothing else; reported by the caller
            failed.append(f"{exc}")
        if count_images:
            log.info("segment: %d/%d %s, %d images, %.1f images/s", n, len(futures), what, images_done,
                     images_done / max(time.perf_counter() - t0, 1e-9))
        elif n % step == 0 or n == len(futures):
            log.info("segment: %d/%d %s (%.1f s)", n, len(futures), what, time.perf_counter() - t0)
    return results, failed


def _tiled_steps(spec: SegmentSpec, units: list, done: dict[str, dict], *, meta: ckpt.ModelMeta, sha: str,
                 store: Any, run_id: str, tiling: tiled.Tiling, threads: int | None, log: Any,
                 progress: UnitProgress | None = None) -> list[str]:
    """Segment the blocks of large images (see segcore.run.blocks), then finish each image; returns failures."""
    images = sorted({(u.group, u.start) for u in units})
    shapes = {g.name: (g.height, g.width) for g in store.groups}
    failed: list[str] = []
    stats: dict[tuple[str, int], Any] = {}
    if meta.normalisation.mode == "percentile":  # only images whose blocks still run the model
        pending = {(u.group, u.start) for u in units
                   if not (tiled.block_detected(spec.out, u) if meta.kind == "instance" else u.name in done)}
        futs = {key: image_stats_task.submit(spec.store, key[0], key[1], meta) for key in sorted(pending)}
        stats = {key: f.result() for key, f in futs.items()}
    common = dict(checkpoint_sha256=sha, num_threads=threads)
    firsts: dict[str, int] = {}
    if meta.kind == "instance":
        # First pass: detect every block not yet detected. A block detected anew changes the ids
        # of its image, so every block of that image is pasted again.
        detect = [u for u in units if not tiled.block_detected(spec.out, u)]
        redo = {(u.group, u.start) for u in detect}
        results, failed = _gather([detect_block_task.submit(spec, u, tiling=tiling, stats=stats.get((u.group, u.start)),
                                                            **common) for u in detect], "blocks detected", log)
        if failed:
            return failed
        firsts = tiled.first_ids(units, {u.name: tiled.block_size(spec.out, u) for u in units})
        todo = [u for u in units if u.name not in done or (u.group, u.start) in redo]
        futures = []
        for u in todo:
            h, w = shapes[u.group]
            sources = [(v.name, firsts[v.name]) for v in tiled.reaching_units(u, units, tiling.overlap, h, w)]
            futures.append(paste_block_task.submit(spec, u, sources=sources, checkpoint_sha256=sha,
                                                   mask_kind=store.mask_kind, meta=meta))
        results, failed = _gather(futures, "blocks pasted", log, progress=progress)
    else:
        todo = [u for u in units if u.name not in done]
        futures = [segment_block_task.submit(spec, u, tiling=tiling, stats=stats.get((u.group, u.start)),
                                             mask_kind=store.mask_kind, **common) for u in todo]
        results, failed = _gather(futures, "blocks", log, progress=progress)
    if failed:
        return failed
    records = {**done, **{r["unit"]: r for r in results}}
    finish = []
    rerun = {(u.group, u.start) for u in todo}  # images with a block segmented or pasted now
    for group, index in images:
        if (group, index) not in rerun and tiled.image_finished(spec.out, run_id, group, index):
            continue  # finished by an earlier run: not evaluated (nor published) twice
        mine = [u for u in units if (u.group, u.start) == (group, index)]
        finish.append(finish_image_task.submit(
            spec, group, index, run_id=run_id, records=[records[u.name] for u in mine], meta=meta,
            checkpoint_sha256=sha, mask_kind=store.mask_kind, tiling=tiling,
            blocks=[(u.name, firsts[u.name]) for u in mine] if firsts else []))
    return _gather(finish, "large images finished", log)[1]


def segment_steps(spec: SegmentSpec) -> dict[str, Any]:
    """Plan units, check alignment, segment unfinished units in parallel, summarise, publish."""
    log = get_run_logger()
    t0 = time.perf_counter()
    meta, sha, store = preflight(spec)
    tiling = None if spec.tile_size == 0 else tiled.resolve_tiling(meta, tile_size=spec.tile_size,
                                                                   overlap=spec.overlap, blend=spec.blend, tta=spec.tta)
    groups = store.groups if tiling else [dataclasses.replace(g, tile=0) for g in store.groups]
    info = prepare_run(spec.out, store_path=spec.store, store_id=store.store_id, checkpoint=spec.checkpoint,
                       checkpoint_sha256=sha,
                       meta=meta, groups=groups, spec=spec_json(spec))
    run_id = info["run_id"]
    units = plan_units(store, tiled=tiling is not None)
    chunks, counts = mask_chunks(spec.out)
    check_alignment(units, chunks=chunks, counts=counts)
    done = finished_units(spec.out)
    whole = [u for u in units if u.window is None]
    blocks = [u for u in units if u.window is not None]
    todo = [u for u in whole if u.name not in done]
    n_images = sum(u.n_images for u in todo)
    log.info("segment: run %s, %d unit(s), %d already done, %d to do (%d images)%s", run_id, len(units),
             sum(u.name in done for u in units), len(todo) + sum(u.name not in done for u in blocks), n_images,
             f"; {len({(u.group, u.start) for u in blocks})} large image(s) in {len(blocks)} blocks, tiles "
             f"{tiling.tile or 'per block'} px, overlap {tiling.overlap} px" if blocks else "")
    threads = torch_threads(spec.execution)
    futures = [segment_unit_task.submit(spec, u, run_id=run_id, checkpoint_sha256=sha, mask_kind=store.mask_kind,
                                        num_threads=threads) for u in todo]
    progress = UnitProgress(run_id, total=len(units), done=sum(u.name in done for u in units))
    failed = _gather(futures, "units", log, count_images=True, progress=progress)[1]
    if blocks:
        failed += _tiled_steps(spec, blocks, done, meta=meta, sha=sha, store=store, run_id=run_id, tiling=tiling,
                               threads=threads, log=log, progress=progress)
    n_skipped = len([u for u in units if u.name in done])
    run = open_run(spec.out)
    manifest = read_manifest(spec.store)
    unit_groups = {u.name: u.group for u in units}
    current = manifest.filter(pc.is_null(manifest.column("superseded_by")))  # changed files: newest version only
    dice = current_rows(run.dice_table(), manifest, unit_groups)
    summary = summarise_dice(dice, manifest=current)
    if meta.kind == "instance":
        summary["instance"] = summarise_instances(current_rows(run.instance_metrics_table(), manifest, unit_groups),
                                                  current_rows(run.instance_table(), manifest, unit_groups))
    summary.update(run_id=run_id, model=meta.arch, checkpoint_sha256=sha, units=len(units),
                   units_skipped=n_skipped, units_failed=len(failed), seconds=round(time.perf_counter() - t0, 2),
                   outputs={"run directory": spec.out, "masks": f"{spec.out}/masks.zarr",
                            "dice table": f"{spec.out}/dice", "summary": f"{spec.out}/summary.md",
                            **({"data lake": spec.lake} if spec.lake else {})})
    markdown = render_markdown(summary, title=f"segflow run {run_id}")
    write_summary(spec.out, summary, markdown)
    publish_run_artifacts(run, summary, markdown, dice=dice)
    if spec.lake:  # after the summary: a lake that cannot be written loses nothing else
        published = publish_lake_task.submit(spec.lake, run_dir=spec.out, unit_groups=unit_groups).result()
        log.info("segment: appended %s to the lake %s", published or "nothing new", spec.lake)
    if failed:
        raise SegflowError(f"{len(failed)} unit(s) failed (the others are saved; run the same command again to "
                           f"retry only those): " + "; ".join(failed[:5]))
    return summary


@flow(name="segflow-ingest", flow_run_name=ingest_run_name)
def ingest_flow(spec: IngestSpec) -> dict[str, Any]:
    """Decode a collection of images (and masks) into a chunked Zarr store with a manifest."""
    return ingest_steps(this_run(spec))


@flow(name="segflow-segment", flow_run_name=segment_run_name)
def segment_flow(spec: SegmentSpec) -> dict[str, Any]:
    """Segment every work unit of a store, write masks and per-image Dice, publish a summary."""
    return segment_steps(this_run(spec))


@flow(name="segflow-run", flow_run_name=run_run_name)
def run_flow(spec: RunSpec) -> dict[str, Any]:
    """Ingest + segment + evaluate in one flow run.

    An incremental run (``spec.ingest.incremental``) segments into one run directory per
    checkpoint below ``spec.segment.out`` (see :func:`incremental_run_dir`), so a retrained
    checkpoint starts a run of its own. When it finds nothing new in the landing zone and every
    work unit is done, it ends after the ingest: no model is loaded, nothing is segmented, and
    when no file needed hashing either, nothing is submitted to Dask, so no cluster is started
    (or needed: a scheduled run with nothing new completes while the cluster is down).
    """
    spec = this_run(spec)
    ingested = ingest_steps(spec.ingest)
    segment = spec.segment
    if spec.ingest.incremental:
        segment = segment.model_copy(update={"out": incremental_run_dir(segment.out, segment.checkpoint)})
        if ingested["new_files"] == 0 and (not store_exists(segment.store) or units_pending(segment) == 0):
            get_run_logger().info("run: nothing new in %s and every image of %s is segmented in %s; no inference "
                                  "this time", spec.ingest.images, segment.store, segment.out)
            if segment.lake and store_exists(segment.store):  # parts that a failed publication left behind
                # Called, not submitted: it runs in this process, so a quiet run never starts the Dask cluster.
                units = plan_units(open_store(segment.store), tiled=segment.tile_size != 0)
                publish_lake_task(segment.lake, run_dir=segment.out, unit_groups={u.name: u.group for u in units})
            return {"ingest": ingested, "segmented": False, "run_dir": segment.out, "flow_run_id": str(flow_run.id)}
    summary = segment_steps(segment)
    return {**summary, "ingest": ingested, "segmented": True, "run_dir": segment.out, "flow_run_id": str(flow_run.id)}


def this_run(spec: Any) -> Any:
    """``spec`` with ``{flow_run}`` in its locations filled in for the running flow run
    (see :func:`segcore.config.flow_run_token`; a subflow fills in its own)."""
    return with_flow_run(spec, flow_run_token(flow_run.scheduled_start_time, flow_run.id))


def incremental_run_dir(out: str, checkpoint: str) -> str:
    """``out/checkpoint-<first 12 hex of its sha256>``: the run directory of incremental runs with ``checkpoint``."""
    try:
        sha = file_sha256(checkpoint)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {checkpoint!r}: {exc}") from exc
    return fsio.join(out, f"checkpoint-{sha[:12]}")


def units_pending(spec: SegmentSpec) -> int | None:
    """Work units of ``spec.store`` without a done marker in ``spec.out`` (None: no run there yet)."""
    try:
        read_run_info(spec.out)
    except NotFound:
        return None
    done = finished_units(spec.out)
    return sum(u.name not in done for u in plan_units(open_store(spec.store), tiled=spec.tile_size != 0))


def with_runner(f, execution: ExecutionSpec):
    """``f`` with a Dask task runner for ``execution`` (a new LocalCluster or an existing scheduler)."""
    return f.with_options(task_runner=task_runner(execution))
