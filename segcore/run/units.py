"""One work unit of whole images: predict, write the mask chunk, score, mark done.

:func:`segment_unit` is the per-unit function every worker runs (and that anyone can run by hand
on one unit): read the unit's image and ground-truth chunks, predict in batches through the run's
:class:`~segcore.models.predict.Predictor` (a semantic image model's batches are pipelined and
scored as each one finishes, where the model runs: :mod:`segcore.models.stream`; other models'
masks are scored against the chunk afterwards), write the mask chunk, write one Parquet part of
Dice rows (:mod:`segcore.run.evaluate`), and write the unit's done-record last. A forward pass that runs out of memory is
retried with half the batch (:mod:`segcore.run.memory`); the batch it finished with is recorded.
A volumetric model segments a slab of a volume with the slices around it
(:mod:`segcore.run.volume_model`).
"""

from __future__ import annotations

import logging
import time
from typing import Any, Collection, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from segcore.collection.store import open_store, read_manifest, store_root
from segcore.collection.versions import current_manifest
from segcore.errors import ConfigError
from segcore.metrics.instance import instance_scores
from segcore.models.checkpoint import ModelMeta
from segcore.models.instances import InstancePrediction
from segcore.run.channels import adapt_images
from segcore.models.stream import Labelled, stream_labels
from segcore.run.context import Counts, RunContext, Timing, UnitRecord
from segcore.run.evaluate import checked_gt, count_against_gt, counts_from_confusion, dice_rows, ground_truth_state
from segcore.run.memory import with_backoff
from segcore.run.plan import RunPlan, WorkUnit
from segcore.run.rundir import dice_dir, instances_path, label_array, mark_done, masks_path, read_plan, table_dir
from segcore.run.tables import instance_metrics_table, instance_table, write_part
from segcore.run.volume_model import group_stats, volume_slab_labels

log = logging.getLogger(__name__)


def unit_rows(store_path: str, group: str, start: int, stop: int, *, manifest: pa.Table | None = None
              ) -> list[dict[str, Any]]:
    """Manifest rows of images ``[start, stop)`` of store group ``group``, in index order (of
    ``manifest`` when given, else of the store's, read now)."""
    manifest = read_manifest(store_path) if manifest is None else manifest
    rows = manifest.filter(pc.and_(pc.equal(manifest["group"], group),
                                   pc.and_(pc.greater_equal(manifest["index"], start),
                                           pc.less(manifest["index"], stop)))).sort_by("index").to_pylist()
    if [r["index"] for r in rows] != list(range(start, stop)):
        raise ConfigError(f"group {group} images {start}-{stop - 1}: the store manifest does not list every image; "
                          "re-ingest")
    return rows


def _write_instances(ctx: RunContext, unit: WorkUnit, meta: ModelMeta, rows: Sequence[dict[str, Any]],
                     preds: Sequence[InstancePrediction], gt: np.ndarray | None, scored: set[int], *,
                     keep: Sequence[int]) -> int:
    """Instance labels (``preds``: one per image of the unit), instance rows and (instance ground
    truth ``gt``, the ``(N, H, W)`` raw chunk of the images ``keep``, scored for the images in
    ``scored``) instance metrics of a unit; ``rows`` and ``scored`` index the images ``keep``.
    Returns the number of instances of its decodable images."""
    common = {"model": meta.arch, "checkpoint_sha256": ctx.checkpoint_sha256, "unit": unit.name}
    label_array(instances_path(ctx.run_dir), unit.group, mode="r+")[unit.start:unit.stop] = (
        np.stack([p.labels for p in preds]))
    preds = [preds[i] for i in keep]
    ok = [(r, p) for r, p in zip(rows, preds) if r["status"] == "ok"]
    write_part(instance_table([(r["image_id"], p.records) for r, p in ok], class_names=meta.class_names, **common),
               table_dir(ctx.run_dir, "instances", ctx.run_id), f"{unit.name}.parquet")
    if ctx.mask_kind == "instance" and scored:
        scores = [(rows[i]["image_id"], instance_scores(preds[i].labels, gt[i],
                                                        scores={rec["instance_id"]: rec["score"]
                                                                for rec in preds[i].records}))
                  for i in sorted(scored)]
        write_part(instance_metrics_table(scores, **common), table_dir(ctx.run_dir, "instance_metrics", ctx.run_id),
                   f"{unit.name}.parquet")
    return sum(len(p.records) for _, p in ok)


def blank_predictions(shape: tuple[int, int, int], *, instance: bool, dtype: np.dtype) -> Any:
    """Background predictions for ``shape`` = ``(N, H, W)`` images: ``(N, H, W)`` labels of ``dtype``, or
    (instance models) N empty :class:`InstancePrediction`."""
    if not instance:
        return np.zeros(shape, dtype=dtype)
    return [InstancePrediction(labels=np.zeros(shape[1:], np.uint32), classes=np.zeros(shape[1:], dtype), records=[])
            for _ in range(shape[0])]


def _blank_refused(preds: np.ndarray, instance_preds: list[InstancePrediction] | None, refused: dict[int, str]
                   ) -> None:
    """Background, in place, for the images the channel policy refused (they were fed as zeros)."""
    preds[list(refused)] = 0
    if instance_preds is not None:
        blank = blank_predictions((len(refused), *preds.shape[1:]), instance=True, dtype=preds.dtype)
        for i, b in zip(refused, blank):
            instance_preds[i] = b


def current_slots(rows: Sequence[dict[str, Any]], *, segmented: Collection[str], whole: bool = False) -> list[int]:
    """Indices of a unit's manifest ``rows`` to segment: all but the versions that newer content
    replaced (``superseded_by`` set, :mod:`segcore.collection.versions`) whose image's current
    version the run segments too (its id in ``segmented``: :func:`planned_current_ids`). With
    ``whole`` (the slabs of a volume, segmented together) the unit is kept whole unless every row
    is left out."""
    keep = [i for i, r in enumerate(rows) if r.get("superseded_by") is None or r["image_id"] not in segmented]
    return list(range(len(rows))) if whole and keep else keep


def planned_current_ids(manifest: pa.Table, groups: Collection[str]) -> set[str]:
    """Ids of the images whose current version lies in one of the store ``groups`` (a run's plan):
    their older versions need no forward pass. An image superseded by a version the run has not
    planned (an ingest while it runs) keeps its older version segmented, as the run's reader
    (:mod:`segcore.run.results`) serves it."""
    current = current_manifest(manifest).select(["image_id", "group"]).to_pylist()
    return {r["image_id"] for r in current if r["group"] in groups}


def superseded_tiled_images(manifest: pa.Table, plan: RunPlan) -> set[tuple[str, int]]:
    """``(group, index)`` of the tiled images of ``plan`` (segmented block by block) that newer content
    replaced and whose current version the plan segments too: left out like such versions in units
    of whole images (:func:`current_slots`)."""
    tiled = set(plan.tiled_images)
    if not tiled:
        return set()
    old = manifest.filter(pc.is_valid(manifest.column("superseded_by"))).select(["image_id", "group", "index"])
    segmented = planned_current_ids(manifest, plan.groups)
    return {(r["group"], r["index"]) for r in old.to_pylist()
            if (r["group"], r["index"]) in tiled and r["image_id"] in segmented}


def _with_blanks(preds: np.ndarray, instance_preds: list[InstancePrediction] | None, keep: Sequence[int], n: int
                 ) -> tuple[np.ndarray, list[InstancePrediction] | None]:
    """The predictions of the images ``keep`` of a unit of ``n`` placed among background for the others."""
    full = np.zeros((n, *preds.shape[1:]), dtype=preds.dtype)
    full[list(keep)] = preds
    if instance_preds is None:
        return full, None
    blank = blank_predictions(full.shape, instance=True, dtype=preds.dtype)
    for i, p in zip(keep, instance_preds):
        blank[i] = p
    return full, blank


def _truth_to_stream(gt: np.ndarray, usable: list[int], *, mask_kind: str, meta: ModelMeta
                     ) -> tuple[np.ndarray, np.ndarray, dict[int, str]]:
    """A unit's ``(N, H, W)`` raw ground truth as :func:`stream_labels` scores it: class labels (the
    array itself when it already is, no copy), ``(N,)`` bool which images to score (those in ``usable``
    whose ground truth can be scored), and by index the ``usable`` images whose ground truth cannot be
    scored (:func:`checked_gt`)."""
    classes, problems = checked_gt(gt, mask_kind=mask_kind, meta=meta)
    errors = {i: problems[i] for i in usable if i in problems}
    to_score = np.zeros(len(gt), dtype=bool)
    to_score[[i for i in usable if i not in errors]] = True
    return classes, to_score, errors


def segment_unit(ctx: RunContext, unit: WorkUnit) -> UnitRecord:
    """Segment and evaluate one unit of whole images; returns its record (counts and timings, no arrays).

    Writes ``masks.zarr/<group>/0[start:stop]`` (exactly one chunk of class labels) and
    ``dice/run_id=<id>/<unit>.parquet`` (rows as :func:`segcore.run.evaluate.dice_rows` makes them).
    Instance models also write ``instances.zarr/<group>/0[start:stop]`` (uint32 instance ids),
    ``instances/run_id=<id>/<unit>.parquet`` (one row per predicted instance) and, when the ground
    truth is instance labels, ``instance_metrics/run_id=<id>/<unit>.parquet``. The done-record is
    written last. Images are fed through the channel policy (:mod:`segcore.run.channels`); an image
    it refuses gets a background mask and error rows naming the reason. An image version that newer
    content replaced, where the run segments the newer one too (:func:`current_slots`), gets a
    background mask and no rows, without a forward pass.
    """
    ctx.faults.hang(unit.name)
    t0, started = time.perf_counter(), time.time()
    predictor = ctx.predictor()
    meta = predictor.meta
    root = store_root(ctx.store)
    store = open_store(ctx.store) if predictor.spatial_dims == 3 else None  # a volumetric model: volume groups
    volume = store is not None and store.group(unit.group).volume is not None
    manifest = read_manifest(ctx.store)
    all_rows = unit_rows(ctx.store, unit.group, unit.start, unit.stop, manifest=manifest)
    if any(r["superseded_by"] is not None for r in all_rows):
        keep = current_slots(all_rows, whole=volume,
                             segmented=planned_current_ids(manifest, read_plan(ctx.run_dir).groups))
    else:
        keep = list(range(len(all_rows)))
    images = root[f"images/{unit.group}"][unit.start:unit.stop]
    if len(keep) < len(all_rows):
        images = images[keep]
    images, _, refused = adapt_images(images, model_channels=meta.in_channels)
    rows = [all_rows[i] for i in keep]
    rows = [dict(r, status="error", error=refused[i]) if i in refused else r for i, r in enumerate(rows)]
    usable = [i for i, r in enumerate(rows) if ground_truth_state(r)[0]]
    gt = root[f"gt/{unit.group}"][unit.start:unit.stop][keep] if usable else None  # (N, H, W) raw ground truth
    truth, to_score, gt_errors = None, None, {}
    if usable and predictor.kind == "semantic" and predictor.spatial_dims == 2:  # scored batch by batch
        truth, to_score, gt_errors = _truth_to_stream(gt, usable, mask_kind=ctx.mask_kind, meta=meta)
    t_read = time.perf_counter()

    def predict(batch: int, _tile: int | None) -> Any:
        if len(refused) == len(images):  # no image the model can take (or none current): background, no forward pass
            return blank_predictions(images.shape[:3], instance=predictor.kind == "instance",
                                     dtype=predictor.label_dtype)
        ctx.faults.check_forward(images=min(batch, len(images)), height=images.shape[1], width=images.shape[2])
        if predictor.kind == "instance":
            return predictor.instances(images, batch_size=batch)
        if volume:
            return volume_slab_labels(predictor, root[f"images/{unit.group}"], unit.start, unit.stop,
                                      tiling=ctx.tiling, batch_size=batch,
                                      stats=group_stats(store, unit.group, predictor))[0]
        if predictor.spatial_dims == 3:  # 2-D images through a volumetric model: volumes of one slice
            return predictor.labels(images[:, None], batch_size=batch, tta=ctx.tta)[:, 0]
        return stream_labels(predictor, images, batch_size=batch, tta=ctx.tta, gt=truth, scored=to_score)

    out, batch, _ = with_backoff(predict, batch=ctx.batch_size, device=ctx.device, what=f"unit {unit.name}")
    counts: dict[int, Counts] = {}
    if isinstance(out, Labelled):  # counted batch by batch where the model ran
        if out.confusion is not None:
            counts = {i: Counts(error=msg) for i, msg in gt_errors.items()}
            counts.update(zip(np.flatnonzero(to_score).tolist(), counts_from_confusion(out.confusion[to_score])))
        out = out.labels
    instance_preds = out if predictor.kind == "instance" else None
    preds = out if instance_preds is None else (np.stack([p.classes for p in out]) if out else
                                                np.zeros((0, *images.shape[1:3]), predictor.label_dtype))
    if usable and truth is None:  # instance and volumetric models: counted over the whole unit
        counts = dict(zip(usable, count_against_gt(preds[usable], gt[usable], mask_kind=ctx.mask_kind, meta=meta)))
    t_pred = time.perf_counter()
    cap = predictor.detections_cap if instance_preds is not None else None
    capped = [rows[i]["image_id"] for i, p in enumerate(instance_preds or []) if cap and len(p.records) >= cap]
    if capped:
        log.warning("%s: %d image(s) reached the model's cap of %d detections (%s%s): objects beyond it are "
                    "missing; raise the model's box_detections_per_img", unit.name, len(capped), cap,
                    ", ".join(capped[:3]), ", ..." if len(capped) > 3 else "")
    if refused:
        _blank_refused(preds, instance_preds, refused)
    if len(keep) < len(all_rows):  # superseded versions: background masks, no rows
        preds, instance_preds = _with_blanks(preds, instance_preds, keep, len(all_rows))
    label_array(masks_path(ctx.run_dir), unit.group, mode="r+")[unit.start:unit.stop] = preds
    table = dice_rows(rows, {rows[i]["image_id"]: c for i, c in counts.items()}, meta=meta,
                      checkpoint_sha256=ctx.checkpoint_sha256, unit=unit.name)
    write_part(table, dice_dir(ctx.run_dir, ctx.run_id), f"{unit.name}.parquet")
    scored = {i for i, c in counts.items() if c.error is None}
    n_instances = None
    if instance_preds is not None:
        n_instances = _write_instances(ctx, unit, meta, rows, instance_preds, gt, scored, keep=keep)
    statuses = table.column("status").to_pylist()
    record = UnitRecord(
        unit=unit.name, group=unit.group, start=unit.start, stop=unit.stop, key=ctx.key, n_images=unit.n_images,
        n_evaluated=len(scored), n_errors=statuses.count("error") // max(1, meta.num_classes),
        dice_rows=table.num_rows, instances=n_instances, batch_size=batch,
        n_refused=sum(r["status"] != "ok" for r in rows), n_superseded=len(all_rows) - len(keep), n_capped=len(capped),
        timing=Timing.since(t0, started, ctx.device, read_s=t_read - t0, predict_s=t_pred - t_read))
    mark_done(ctx.run_dir, record)
    return record
