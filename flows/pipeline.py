"""The pipeline flows: ingest, segment (+ evaluate), and run (= both in one flow run).

Each flow takes one frozen spec. The steps ``ingest_steps`` and ``segment_steps`` compose tasks
and are shared: ``run_flow`` calls both inside one flow run, on one Dask cluster.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.futures import as_completed

from flows.artifacts import UnitProgress, publish_run_artifacts
from flows.execution import task_runner, torch_threads
from flows.names import ingest_run_name, run_run_name, segment_run_name
from segcore import checkpoint as ckpt
from segcore import tiled
from segcore.config import ExecutionSpec, IngestSpec, RunSpec, SegmentSpec
from segcore.errors import CheckpointError, SegflowError, StoreError
from segcore.fileio import file_sha256
from segcore.plan import check_alignment, plan_units
from segcore.rundir import finished_units, mask_chunks, prepare_run, write_summary
from segcore.results import open_run
from segcore.store import (chunk_rows, create_store, existing_store_matches, open_store, pair_sources, plan_groups,
                           read_manifest, spec_json, write_manifest)
from segcore.summary import render_markdown, summarise_dice, summarise_instances
from tasks.ingest import probe_files, write_chunk
from tasks.segment import (detect_block_task, finish_image_task, image_stats_task, paste_block_task,
                           segment_block_task, segment_unit_task)


def ingest_steps(spec: IngestSpec) -> dict[str, Any]:
    """Pair, probe (in batches), plan groups, create the store, decode chunks, write the manifest."""
    log = get_run_logger()
    t0 = time.perf_counter()
    rows = pair_sources(spec.images, spec.masks)
    log.info("ingest: %d files found in %s", len(rows), spec.images)
    if not spec.overwrite and existing_store_matches(spec.store, spec=spec_json(spec),
                                                     source_paths=[r["source_path"] for r in rows]):
        manifest = read_manifest(spec.store)
        n_ok = sum(1 for s in manifest.column("status").to_pylist() if s == "ok")
        log.info("ingest: %s already holds these %d files with the same options; reusing it (pass --overwrite "
                 "to decode them again)", spec.store, len(rows))
        return {"store": spec.store, "files": len(rows), "images": n_ok, "errors": len(rows) - n_ok,
                "groups": len(open_store(spec.store).groups), "chunks": None, "reused": True}
    batches = [rows[i:i + spec.probe_batch] for i in range(0, len(rows), spec.probe_batch)]
    probe_futures = [probe_files.submit(b, label=f"files {i * spec.probe_batch}-{i * spec.probe_batch + len(b) - 1}")
                     for i, b in enumerate(batches)]
    probed = [r for f in probe_futures for r in f.result()]
    groups, planned = plan_groups(probed, chunk_pixels=spec.chunk_pixels, max_chunk_images=spec.max_chunk_images,
                                  tile_chunk=spec.tile_chunk)
    if not groups:
        raise StoreError(f"none of the {len(rows)} files in {spec.images!r} could be read; first error: "
                         f"{next((r['error'] for r in probed if r['error']), 'no files')}")
    with_gt = spec.masks is not None
    create_store(spec.store, groups, with_gt=with_gt, mask_kind=spec.mask_kind, spec=spec_json(spec),
                 overwrite=spec.overwrite)
    chunks = chunk_rows(planned, groups)
    futures = [write_chunk.submit(spec.store, c, label=f"{c[0]['group']} images {c[0]['index']}-{c[-1]['index']}")
               for c in chunks]
    written: list[dict[str, Any]] = []
    for n, fut in enumerate(as_completed(futures), start=1):
        written.extend(fut.result())
        if n % max(1, len(futures) // 10) == 0 or n == len(futures):
            log.info("ingest: %d/%d chunks written", n, len(futures))
    errors = [r for r in planned if r["group"] is None]
    write_manifest(spec.store, sorted(written, key=lambda r: (r["group"], r["index"])) + errors)
    n_ok = sum(1 for r in written if r["status"] == "ok")
    n_err = len(rows) - n_ok
    log.info("ingest: %d images in %d group(s), %d chunk(s); %d error row(s); %.1f s -> %s",
             n_ok, len(groups), len(chunks), n_err, time.perf_counter() - t0, spec.store)
    return {"store": spec.store, "files": len(rows), "images": n_ok, "errors": n_err, "groups": len(groups),
            "chunks": len(chunks)}


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
                progress.advance()
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
    """Segment the blocks of large images (see segcore.tiled), then finish each image; returns failures."""
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
    for group, index in images:
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
    info = prepare_run(spec.out, store_path=spec.store, checkpoint=spec.checkpoint, checkpoint_sha256=sha,
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
    summary = summarise_dice(run.dice_table(), manifest=read_manifest(spec.store))
    if meta.kind == "instance":
        summary["instance"] = summarise_instances(run.instance_metrics_table(), run.instance_table())
    summary.update(run_id=run_id, model=meta.arch, checkpoint_sha256=sha, units=len(units),
                   units_skipped=n_skipped, units_failed=len(failed), seconds=round(time.perf_counter() - t0, 2),
                   outputs={"run directory": spec.out, "masks": f"{spec.out}/masks.zarr",
                            "dice table": f"{spec.out}/dice", "summary": f"{spec.out}/summary.md"})
    markdown = render_markdown(summary, title=f"segflow run {run_id}")
    write_summary(spec.out, summary, markdown)
    publish_run_artifacts(run, summary, markdown)
    if failed:
        raise SegflowError(f"{len(failed)} unit(s) failed (the others are saved; run the same command again to "
                           f"retry only those): " + "; ".join(failed[:5]))
    return summary


@flow(name="segflow-ingest", flow_run_name=ingest_run_name)
def ingest_flow(spec: IngestSpec) -> dict[str, Any]:
    """Decode a collection of images (and masks) into a chunked Zarr store with a manifest."""
    return ingest_steps(spec)


@flow(name="segflow-segment", flow_run_name=segment_run_name)
def segment_flow(spec: SegmentSpec) -> dict[str, Any]:
    """Segment every work unit of a store, write masks and per-image Dice, publish a summary."""
    return segment_steps(spec)


@flow(name="segflow-run", flow_run_name=run_run_name)
def run_flow(spec: RunSpec) -> dict[str, Any]:
    """Ingest + segment + evaluate in one flow run."""
    ingest_steps(spec.ingest)
    return segment_steps(spec.segment)


def with_runner(f, execution: ExecutionSpec):
    """``f`` with a Dask task runner for ``execution`` (a new LocalCluster or an existing scheduler)."""
    return f.with_options(task_runner=task_runner(execution))
