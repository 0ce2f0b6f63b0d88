"""Finish one tiled image: its tables from its blocks' records.

:func:`finish_image` sums the blocks' counts into the image's Dice rows (through the one
evaluation policy, :func:`segcore.run.evaluate.dice_rows`), gathers the instance records and the
seam record, computes the instance metrics when the whole image's labels fit in
:data:`MAX_METRIC_PIXELS`, and writes the image's done-record last. :func:`leave_out_image` stands
in for both steps for an image version that newer content replaced: blank blocks, no tables.
"""

from __future__ import annotations

import logging
import time
from typing import Sequence

import pyarrow as pa

from segcore.collection.store import store_root
from segcore.metrics.instance import instance_scores
from segcore.models.checkpoint import ModelMeta
from segcore.run.blocks import load_block
from segcore.run.context import BlockRecord, ImageRecord, RunContext, Timing
from segcore.run.evaluate import dice_rows, sum_counts
from segcore.run.plan import WorkUnit, image_part
from segcore.run.rundir import dice_dir, instances_path, label_array, mark_done, masks_path, table_dir
from segcore.run.tables import SEAM_SCHEMA, instance_metrics_table, instance_table, write_part
from segcore.run.units import unit_rows

log = logging.getLogger(__name__)

#: Instance metrics of a tiled image are computed when its label image has at most this many pixels.
MAX_METRIC_PIXELS = 1 << 26


def _instances(ctx: RunContext, records: Sequence[BlockRecord], blocks: Sequence[tuple[str, int]]) -> list[dict]:
    """One instance row per object of the image, from the pixels each block owns and the saved detections."""
    objects: dict[int, list[int]] = {}
    for r in records:
        for oid, area, y0, x0, y1, x1 in r.objects:
            o = objects.get(oid)
            objects[oid] = [area, y0, x0, y1, x1] if o is None else [
                o[0] + area, min(o[1], y0), min(o[2], x0), max(o[3], y1), max(o[4], x1)]
    info: dict[int, tuple[int, float]] = {}
    for name, first in blocks:
        block = load_block(ctx.run_dir, name)
        for k in range(len(block)):
            info[first + k] = (int(block.classes[k]), float(block.scores[k]))
    return [{"instance_id": oid, "class_id": info[oid][0], "score": info[oid][1], "bbox": (x0, y0, x1, y1),
             "area": area} for oid, (area, y0, x0, y1, x1) in sorted(objects.items())]


def finish_image(ctx: RunContext, group: str, index: int, *, records: Sequence[BlockRecord], meta: ModelMeta,
                 blocks: Sequence[tuple[str, int]] = ()) -> ImageRecord:
    """Write the tables of one tiled image from its blocks' records.

    Dice rows from the summed counts (``dice/run_id=<id>/<group>-<index>.parquet``), and for
    instance models the instance rows, the instance metrics (images up to
    :data:`MAX_METRIC_PIXELS`) and one seam row (``seams/run_id=<id>/...``); ``blocks`` are then
    ``(unit name, first id)`` of every block of the image. Returns the image's done-record.
    """
    part = image_part(group, index)
    row = unit_rows(ctx.store, group, index, index + 1)[0]
    common = {"model": meta.arch, "checkpoint_sha256": ctx.checkpoint_sha256, "unit": part}
    counted = [r.counts for r in records if r.counts is not None]
    counts = {row["image_id"]: sum_counts(counted)} if counted else {}
    table = dice_rows([row], counts, meta=meta, checkpoint_sha256=ctx.checkpoint_sha256, unit=part)
    write_part(table, dice_dir(ctx.run_dir, ctx.run_id), f"{part}.parquet")
    n_instances = None
    if meta.kind == "instance":
        inst = _instances(ctx, records, blocks)
        n_instances = len(inst)
        write_part(instance_table([(row["image_id"], inst)], class_names=meta.class_names, **common),
                   table_dir(ctx.run_dir, "instances", ctx.run_id), f"{part}.parquet")
        tiling = ctx.tiling
        seam = {"image_id": row["image_id"], "blocks": len(records), "tile_size": tiling.tile,
                "overlap": tiling.overlap, "objects": len(inst),
                "objects_on_seams": sum(r.on_seams for r in records),
                "duplicates_dropped": sum(r.duplicates_dropped for r in records),
                "cut_risk": sum(r.cut_risk for r in records), "windows_at_cap": sum(r.capped for r in records),
                "model": meta.arch, "checkpoint_sha256": ctx.checkpoint_sha256}
        write_part(pa.Table.from_pylist([seam], schema=SEAM_SCHEMA), table_dir(ctx.run_dir, "seams", ctx.run_id),
                   f"{part}.parquet")
        if seam["cut_risk"] or seam["windows_at_cap"]:  # counted in the seam table; told here too
            log.warning("%s: %d object(s) touch the edge of their detection window (they may be cut in two: raise "
                        "--overlap above the largest object's size) and %d detection window(s) reached the "
                        "model's cap on detections (raise its box_detections_per_img or lower --tile-size); "
                        "see the seams table", row["image_id"], seam["cut_risk"], seam["windows_at_cap"])
        arr = label_array(instances_path(ctx.run_dir), group)
        scored = table.num_rows and table.column("status")[0].as_py() == "ok"
        if ctx.mask_kind == "instance" and scored and arr.shape[1] * arr.shape[2] <= MAX_METRIC_PIXELS:
            gt = store_root(ctx.store)[f"gt/{group}"][index]
            scores = instance_scores(arr[index], gt, scores={r["instance_id"]: r["score"] for r in inst})
            write_part(instance_metrics_table([(row["image_id"], scores)], **common),
                       table_dir(ctx.run_dir, "instance_metrics", ctx.run_id), f"{part}.parquet")
    record = ImageRecord(part=part, group=group, index=index, key=ctx.key, image_id=row["image_id"],
                         blocks=len(records), dice_rows=table.num_rows, instances=n_instances)
    mark_done(ctx.run_dir, record)
    return record


def leave_out_image(ctx: RunContext, group: str, index: int, *, blocks: Sequence[WorkUnit], instance: bool
                    ) -> ImageRecord:
    """Finish a tiled image version that newer content replaced, whose newer version the run segments
    too (:func:`segcore.run.units.superseded_tiled_images`), without a forward pass: each of its
    ``blocks`` (all of them) gets a background chunk in ``masks.zarr`` (and, for
    instance models, ``instances.zarr``) and a done-record without counts; the image gets no rows
    and a done-record with ``superseded`` set, written last."""
    t0, started = time.perf_counter(), time.time()
    arrays = [label_array(masks_path(ctx.run_dir), group, mode="r+")]
    if instance:
        arrays.append(label_array(instances_path(ctx.run_dir), group, mode="r+"))
    for u in blocks:
        w = u.window
        for arr in arrays:
            arr[index, w.y0:w.y1, w.x0:w.x1] = 0
        mark_done(ctx.run_dir, BlockRecord(unit=u.name, group=group, index=index, window=(w.y0, w.y1, w.x0, w.x1),
                                           key=ctx.key, tiles=0, counts=None,
                                           timing=Timing.since(t0, started, ctx.device)))
    row = unit_rows(ctx.store, group, index, index + 1)[0]
    record = ImageRecord(part=image_part(group, index), group=group, index=index, key=ctx.key,
                         image_id=row["image_id"], blocks=len(blocks), dice_rows=0, instances=0 if instance else None,
                         superseded=True)
    mark_done(ctx.run_dir, record)
    return record
