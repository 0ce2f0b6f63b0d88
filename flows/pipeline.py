"""The pipeline flows: ingest, segment (+ evaluate), and run (= both in one flow run).

Each flow takes one frozen spec. The steps ``ingest_steps`` and ``segment_steps`` compose tasks
and are shared: ``run_flow`` calls both inside one flow run, on one Dask cluster.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import Any, Callable

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.futures import as_completed

from flows.artifacts import UnitProgress, publish_run_artifacts
from flows.execution import task_runner, torch_threads
from flows.ingest import ingest_steps
from flows.names import ingest_run_name, run_run_name, segment_run_name
from flows.watch import Failure, gather_watched
from segcore import fsio
from segcore.collection.versions import current_manifest, current_rows
from segcore.collection.store import read_manifest, spec_json, store_exists
from segcore.config import ExecutionSpec, IngestSpec, RunSpec, SegmentSpec, flow_run_token, with_flow_run
from segcore.errors import CheckpointError, SegflowError, StoreError
from segcore.lease import Lease, run_dir_lease
from segcore.metrics.summary import render_markdown, summarise_dice, summarise_instances, summarise_volumes
from segcore.models.checkpoint import ModelMeta
from segcore.models.predict import check_device
from segcore.models.record import model_sha256
from segcore.run.blocks import saved_blocks
from segcore.run.context import BlockRecord, RunContext
from segcore.run.images import leave_out_image
from segcore.run.plan import RunPlan, check_alignment, large_whole_groups
from segcore.run.results import open_run
from segcore.run.deadlines import UnitTimeouts
from segcore.run.rundir import (clear_failed, done_records, failed_records, mark_failed, mask_chunks, pyramid_jobs,
                                unlist_pyramids, write_summary)
from segcore.run.schedule import TiledSchedule
from segcore.run.start import pending_work, start_run
from segcore.run.units import superseded_tiled_images
from segcore.run.volumes import (Volume, check_volume_pattern, clear_volume_table, find_volumes,
                                  read_volume_table)
from tasks.lake import publish_lake_task
from tasks.progress import report
from tasks.segment import (detect_block_task, finish_image_task, image_stats_task, label_pyramid_task,
                           paste_block_task, segment_block_task, segment_unit_task)
from tasks.volumes import score_volumes_task


def _gather(futures: list, what: str, log: Any, *, names: list[str] | None = None) -> tuple[list, list[Failure]]:
    """Records of ``futures`` as they complete, with progress in the log; failures (named by ``names``,
    one per future, else by ``what``) are collected."""
    results, failed = [], []
    label = {id(f): n for f, n in zip(futures, names or [])}
    t0 = time.perf_counter()
    step = max(1, len(futures) // 20)
    for n, fut in enumerate(as_completed(futures), start=1):
        try:
            results.append(fut.result())
        except Exception as exc:  # one step failing loses nothing else; reported by the caller
            failed.append(Failure(label.get(id(fut), what), f"{exc}", 1))
        if n % step == 0 or n == len(futures):
            log.info("segment: %d/%d %s (%.1f s)", n, len(futures), what, time.perf_counter() - t0)
    return results, failed


class PassProgress:
    """Progress of a pass over blocks that the run's unit count does not show (the detection pass of
    an instance model's large images, before each block is pasted and counted): ``detect: 3/20 blocks``."""

    def __init__(self, stage: str, *, total: int) -> None:
        self.stage, self.total, self.done = stage, total, 0
        report(stage, 0, total, "starting")

    def advance(self, n: int = 1, *, images: int = 0) -> None:
        self.done = min(self.total, self.done + n)
        report(self.stage, self.done, self.total)


def _watched(submit: Any, todo: list, watch: dict[str, Any], log: Any, what: str,
             progress: UnitProgress | PassProgress | None = None) -> tuple[list, list[Failure]]:
    """``submit`` every unit of ``todo`` (or ``(unit, sources)`` pair) with timeouts and retries
    (:func:`flows.watch.gather_watched`, settings ``watch``); progress in the log and in ``progress``."""
    def unit_of(item: Any) -> Any:
        return item[0] if isinstance(item, tuple) else item

    step, done, t0 = max(1, len(todo) // 20), [0, 0], time.perf_counter()
    # a tiled image counts once its last block of this pass is done
    blocks = Counter((unit_of(i).group, unit_of(i).start) for i in todo if unit_of(i).window is not None)
    seen: Counter[tuple[str, int]] = Counter()

    def images_of(record: Any) -> int:
        if isinstance(record, BlockRecord):
            seen[(record.group, record.index)] += 1
            return int(seen[(record.group, record.index)] == blocks[(record.group, record.index)])
        return (getattr(record, "n_images", 0) - getattr(record, "n_refused", 0)  # segmented: not those refused
                - getattr(record, "n_superseded", 0))  # or replaced by newer versions

    def advance(record: Any) -> None:
        images = images_of(record)
        done[0] += 1
        done[1] += images
        if progress is not None:
            progress.advance(images=images)
        if done[0] % step == 0 or done[0] == len(todo):
            log.info("segment: %d/%d %s, %d images, %.1f s", done[0], len(todo), what, done[1],
                     time.perf_counter() - t0)

    weights = unit_weights([unit_of(i) for i in todo])
    return gather_watched(submit, todo, name=lambda i: unit_of(i).name, weight=lambda i: weights[unit_of(i).name],
                          on_result=advance, log=log, **watch)


def unit_weights(units: list[Any]) -> dict[str, float]:
    """What each unit weighs in its timeout, by name: its images; a block, its share of the largest
    block of its group among ``units`` (at least 1/16), so that the timeouts learnt from the strips
    at an image's edges do not cut whole blocks short."""
    def area(u: Any) -> int:
        return (u.window.y1 - u.window.y0) * (u.window.x1 - u.window.x0)

    largest: dict[str, int] = {}
    for u in units:
        if u.window is not None:
            largest[u.group] = max(largest.get(u.group, 0), area(u))
    return {u.name: float(u.n_images) if u.window is None else max(area(u) / largest[u.group], 1 / 16)
            for u in units}


def _tiled_steps(ctx: RunContext, schedule: TiledSchedule, meta: ModelMeta, log: Any,
                 progress: UnitProgress, watch: Callable[[], dict[str, Any]]) -> list[Failure]:
    """Submit the steps the schedule says remain for the tiled images; returns failures. ``watch()``
    gives the timeout and retry settings of one kind of step (each kind its own estimate)."""
    left_out = schedule.to_leave_out()
    for group, index in left_out:  # older versions of images the run segments anew: blank, no forward pass
        blocks = schedule.plan.blocks_of(group, index)
        leave_out_image(ctx, group, index, blocks=blocks, instance=meta.kind == "instance")
        progress.advance(len(blocks))
    if left_out:
        log.info("segment: %d large image version(s) that newer content replaced left out (blank masks, no rows)",
                 len(left_out))
    stats = {key: image_stats_task.submit(ctx.store, key[0], key[1], meta) for key in schedule.stats_needed()}
    stats = {key: f.result() for key, f in stats.items()}
    done = schedule.done
    if meta.kind == "instance":
        detect = schedule.to_detect()
        found, failed = _watched(lambda u: detect_block_task.submit(ctx, u, stats=stats.get((u.group, u.start))),
                                 detect, watch(), log, "blocks detected", PassProgress("detect", total=len(detect)))
        if failed:
            return failed
        detections = {**done, **{r.marker: r for r in found}}
        todo = schedule.to_paste(detections, redetected=detect)
        results, failed = _watched(lambda j: paste_block_task.submit(ctx, j[0], sources=j[1], meta=meta), todo,
                                   watch(), log, "blocks pasted", progress)
        todo = [u for u, _ in todo]
    else:
        detections = None
        todo = schedule.to_segment()
        results, failed = _watched(lambda u: segment_block_task.submit(ctx, u, stats=stats.get((u.group, u.start))),
                                   todo, watch(), log, "blocks", progress)
    if failed:
        return failed
    records = {**done, **{r.marker: r for r in results}}
    jobs = schedule.to_finish(todo, records, detections)
    return _gather([finish_image_task.submit(ctx, j.group, j.index, records=j.records, meta=meta, blocks=j.blocks)
                    for j in jobs], "large images finished", log,
                   names=[f"finish-image-{j.group}-{j.index}" for j in jobs])[1]


def segment_steps(spec: SegmentSpec) -> dict[str, Any]:
    """Hold the run directory's lease (one writer at a time, see :mod:`segcore.lease`) and segment."""
    with Lease(run_dir_lease(spec.out), what=f"run directory {spec.out}", option="--out", run=str(flow_run.id),
               wait_s=spec.wait_for_lease) as lease:
        summary = _segment_held(spec)
    if lease.lost:
        raise SegflowError(f"another process took over the lease of run directory {spec.out} while this run wrote "
                           "into it; its outputs are complete, but check that no other command still writes there "
                           "and run the same command again to verify")
    return summary


def _segment_held(spec: SegmentSpec) -> dict[str, Any]:
    """Record the run, segment its unfinished units in parallel, summarise, publish."""
    log = get_run_logger()
    t0 = time.perf_counter()
    if not spec.execution.dask_address:  # the workers share this machine's GPUs, if any
        check_device(spec.device)
    ctx, plan, meta, store = start_run(
        spec.store, spec.checkpoint, spec.out, tile_size=spec.tile_size, overlap=spec.overlap, blend=spec.blend,
        tta=spec.tta, precision=spec.precision, batch_size=spec.batch_size, device=spec.device,
        num_threads=torch_threads(spec.execution), compile=spec.compile, spec=spec_json(spec),
        workers_here=not spec.execution.dask_address)
    whole = large_whole_groups(store, ctx.tiling)
    if whole and meta.spatial_dims == 2:
        log.warning("segment: %s %s stored whole (ingested with --tile-chunk 0), so segmented whole, one image per "
                    "forward pass: --tile-size applies to images stored in blocks; ingest with --tile-chunk N to "
                    "segment them in tiles", ", ".join(whole), "is" if len(whole) == 1 else "are")
    if spec.volume_pattern:  # before any unit is segmented
        check_volume_pattern(current_manifest(read_manifest(spec.store)).to_pylist(), spec.volume_pattern)
    chunks, counts = mask_chunks(spec.out)
    check_alignment(plan.units, chunks=chunks, counts=counts)
    done = done_records(spec.out, ctx.key)
    n_done = sum(u.name in done for u in plan.units)
    todo = [u for u in plan.units if u.window is None and u.name not in done]
    schedule = TiledSchedule(plan, done, instance=meta.kind == "instance",
                             shapes={g.name: (g.height, g.width) for g in store.groups},
                             saved=saved_blocks(spec.out) if meta.kind == "instance" and plan.tiled_images else None,
                             left_out=superseded_tiled_images(read_manifest(spec.store), plan))
    log.info("segment: run %s, %d unit(s), %d already done, %d to do (%d images)%s", ctx.run_id, len(plan.units),
             n_done, len(plan.units) - n_done, sum(u.n_images for u in todo),
             f"; {len(plan.tiled_images)} large image(s) in {sum(u.window is not None for u in plan.units)} blocks, "
             f"tiles {ctx.tiling.tile} px, overlap {ctx.tiling.overlap} px" if plan.tiled_images else "")
    progress = UnitProgress(ctx.run_id, total=len(plan.units), done=n_done)
    def watch() -> dict[str, Any]:  # one timeout estimate per kind of step: a block is not an image
        return {"timeouts": UnitTimeouts(floor=spec.unit_timeout_floor, cap=spec.unit_timeout_cap),
                "retries": spec.unit_retries}

    earlier = failed_records(spec.out, ctx.key)
    failed = _watched(lambda u: segment_unit_task.submit(ctx, u), todo, watch(), log, "units", progress)[1]
    if schedule.units or schedule.left_out:
        failed += _tiled_steps(ctx, schedule, meta, log, progress, watch)
    for f in failed:
        mark_failed(spec.out, key=ctx.key, unit=f.name, reason=f.reason, attempts=f.attempts)
    done_now = done_records(spec.out, ctx.key)  # a failed-record goes once its unit is done, not before
    clear_failed(spec.out, sorted(n for n in set(earlier) - {f.name for f in failed} if n in done_now))
    # Pyramids once every unit is done; those of the groups written now (a new done-record) are rewritten,
    # or, when some unit failed, left out of date until then.
    written = {u.group for u in plan.units if u.name in done_now and done_now[u.name] != done.get(u.name)}
    # Volumes likewise: one with a failed slab would be scored against a blank slab; scored on the next run.
    if failed:
        unlist_pyramids(spec.out, written)
        clear_volume_table(spec.out)
    pyramids_failed = [] if failed else _pyramids(spec.out, written, log)
    volumes_failed, volumes = ([], []) if failed else _score_volumes(spec, plan, log)
    summary = summarise_run(spec, ctx, plan, meta, n_done=n_done, n_failed=len(failed), seconds=time.perf_counter() - t0,
                            volume_slices={v.volume_id: v.slices for v in volumes},
                            capped=sum(getattr(r, "n_capped", 0) for r in done_now.values()))
    if volumes_failed:
        summary["volumes_failed"] = [f"{f.name}: {f.reason}" for f in volumes_failed]
    if spec.lake:  # after the summary: a lake that cannot be written loses nothing else
        published = publish_lake_task.submit(spec.lake, run_dir=spec.out).result()
        log.info("segment: appended %s to the lake %s", published or "nothing new", spec.lake)
    if failed:
        raise SegflowError(f"{len(failed)} unit(s) failed (the others are saved; the reasons are in "
                           f"{fsio.join(spec.out, 'failed')}; "
                           + ("run the same command again to retry only those): " if all(f.retried for f in failed)
                              else "fix what they name, then run the same command again to redo only those): ")
                           + "; ".join(f"{f.name} ({f.reason}, {f.attempts} attempt(s)"
                                       f"{'' if f.retried else ', not retried: every attempt fails the same way'})"
                                       for f in failed[:5])
                           + (f"; and {len(failed) - 5} more" if len(failed) > 5 else ""))
    if pyramids_failed:
        raise SegflowError("the masks are complete, but the pyramid levels of " + "; ".join(
            f"{f.name} ({f.reason})" for f in pyramids_failed) + " could not be written; run the same command "
                           "again to write them")
    return summary


#: Volumes scored per task (a volume's surface distances take seconds; never one task per volume).
VOLUMES_PER_TASK = 8


def _score_volumes(spec: SegmentSpec, plan: RunPlan, log: Any) -> tuple[list[Failure], list[Volume]]:
    """Score the run's volumes (ingested volumes, and 2-D images grouped by ``spec.volume_pattern``)
    into the volume table, written anew; returns the batches that failed (the others are kept) and
    the volumes."""
    planned = set(plan.groups)
    rows = [r for r in current_manifest(read_manifest(spec.store)).to_pylist() if r["group"] in planned]
    volumes = find_volumes(rows, pattern=spec.volume_pattern)
    clear_volume_table(spec.out)
    if not volumes:
        return [], []
    batches = [volumes[i:i + VOLUMES_PER_TASK] for i in range(0, len(volumes), VOLUMES_PER_TASK)]
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())  # each scoring pass: new part names, for the lake
    names = [f"volumes-{stamp}-{i:05d}" for i in range(len(batches))]
    futures = [score_volumes_task.submit(spec.out, b, part=n) for b, n in zip(batches, names)]
    failed = _gather(futures, "volume batches", log, names=names)[1]
    for f in failed:
        log.warning("segment: volume batch %s failed (%s); its volumes have no rows", f.name, f.reason)
    return failed, volumes


def _pyramids(run_dir: str, changed: set[str], log: Any) -> list[Failure]:
    """Write the pyramid levels of every label image of the run that lacks them, and rewrite those of
    the groups in ``changed``; returns the failures."""
    jobs = pyramid_jobs(run_dir, changed=changed)
    return _gather([label_pyramid_task.submit(location, overwrite=overwrite) for location, overwrite in jobs],
                   "label images with pyramids", log, names=[location for location, _ in jobs])[1]


def summarise_run(spec: SegmentSpec, ctx: RunContext, plan: RunPlan, meta: ModelMeta, *, n_done: int, n_failed: int,
                  seconds: float, volume_slices: dict[str, tuple[str, ...]] | None = None, capped: int = 0
                  ) -> dict[str, Any]:
    """Summarise the current versions of the run's images (and volumes: ``volume_slices`` gives each
    volume's slices, a few of which the gallery of worst volumes shows; ``capped``: images whose
    detections reached the instance model's cap); write and publish the summary."""
    run = open_run(spec.out)
    manifest = read_manifest(spec.store)
    part_groups = plan.part_groups()
    current = current_manifest(manifest)  # changed files: newest version only
    dice = current_rows(run.dice_table(), manifest, part_groups)
    summary = summarise_dice(dice, manifest=current)
    volumes = read_volume_table(spec.out)
    if volumes.num_rows:
        summary["volumes"] = summarise_volumes(volumes, slices=volume_slices or {})
    if meta.kind == "instance":
        summary["instance"] = summarise_instances(current_rows(run.instance_metrics_table(), manifest, part_groups),
                                                  current_rows(run.instance_table(), manifest, part_groups))
        summary["images_at_detection_cap"] = capped
    summary.update(run_id=ctx.run_id, model=meta.arch, checkpoint_sha256=ctx.checkpoint_sha256, units=len(plan.units),
                   units_skipped=n_done, units_failed=n_failed, seconds=round(seconds, 2),
                   outputs={"run directory": spec.out, "masks": f"{spec.out}/masks.zarr",
                            "dice table": f"{spec.out}/dice", "summary": f"{spec.out}/summary.md",
                            **({"volume table": f"{spec.out}/volumes"} if volumes.num_rows else {}),
                            **({"instance labels": f"{spec.out}/instances.zarr",
                                "instance table": f"{spec.out}/instances",
                                "instance metrics": f"{spec.out}/instance_metrics"} if meta.kind == "instance" else {}),
                            **({"data lake": spec.lake} if spec.lake else {})})
    markdown = render_markdown(summary, title=f"segflow run {ctx.run_id}")
    write_summary(spec.out, summary, markdown)
    publish_run_artifacts(run, summary, markdown, dice=dice)
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
    if spec.ingest.overwrite and not spec.ingest.incremental and fsio.exists(fsio.join(spec.segment.out, "run.json")):
        # checked before the store is replaced: the run directory would then refuse the new store
        raise StoreError(f"run directory {spec.segment.out!r} holds the results of a run; --overwrite would replace "
                         f"its store {spec.ingest.store!r}, whose results these are: give a new --out")
    ingested = ingest_steps(spec.ingest)
    segment = spec.segment
    if spec.ingest.incremental:
        segment = segment.model_copy(update={"out": incremental_run_dir(segment.out, segment.checkpoint)})
        if ingested["new_files"] == 0 and (not store_exists(segment.store) or pending_work(
                segment.store, segment.checkpoint, segment.out, tile_size=segment.tile_size, overlap=segment.overlap,
                blend=segment.blend, tta=segment.tta, precision=segment.precision, device=segment.device,
                compile=segment.compile, workers_here=not segment.execution.dask_address) == 0):
            get_run_logger().info("run: nothing new in %s and every image of %s is segmented in %s; no inference "
                                  "this time", spec.ingest.images, segment.store, segment.out)
            if segment.lake and fsio.exists(fsio.join(segment.out, "run.json")):  # parts a failed publication left
                # Called, not submitted: it runs in this process, so a quiet run never starts the Dask cluster.
                publish_lake_task(segment.lake, run_dir=segment.out)
            return {"ingest": ingested, "segmented": False, "run_dir": segment.out, "flow_run_id": str(flow_run.id)}
    summary = segment_steps(segment)
    return {**summary, "ingest": ingested, "segmented": True, "run_dir": segment.out, "flow_run_id": str(flow_run.id)}


def this_run(spec: Any) -> Any:
    """``spec`` with ``{flow_run}`` in its locations filled in for the running flow run
    (see :func:`segcore.config.flow_run_token`; a subflow fills in its own)."""
    return with_flow_run(spec, flow_run_token(flow_run.scheduled_start_time, flow_run.id))


def incremental_run_dir(out: str, checkpoint: str) -> str:
    """``out/checkpoint-<first 12 hex of its sha256>``: the run directory of incremental runs with ``checkpoint``
    (a model record: :func:`segcore.models.record.model_sha256`)."""
    try:
        sha = model_sha256(checkpoint)
    except OSError as exc:
        raise CheckpointError(f"cannot read checkpoint {checkpoint!r}: {exc}") from exc
    return fsio.join(out, f"checkpoint-{sha[:12]}")


def with_runner(f, execution: ExecutionSpec):
    """``f`` with a Dask task runner for ``execution`` (a new LocalCluster or an existing scheduler)."""
    return f.with_options(task_runner=task_runner(execution))
