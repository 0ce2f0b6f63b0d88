"""Work units of tiled groups (large images): segment one block, and finish one image.

Per block (one work unit, one chunk of the output arrays; see :mod:`segcore.tiling`):

- semantic models, :func:`segment_block`: blended tile logits over the block, argmax, write the
  mask chunk, count TP/FP/FN against the ground-truth chunk;
- instance models, two passes: :func:`detect_block` runs the detector on each detector core of
  the block plus its halo and saves the objects whose box centre lies in that core
  (``RUN_DIR/blocks/<unit>.npz``); when
  every block of the image is detected, :func:`paste_block` fills the block's chunk of the
  instance and class arrays from the saved objects of every block that can reach into it, with
  ids unique across the image, and counts against the ground truth.

Per image, :func:`finish_image` sums the blocks' counts into the image's Dice rows, gathers the
instance records and the seam record, and computes the instance metrics when the whole image's
labels fit in :data:`MAX_METRIC_PIXELS`. Memory is bounded by the block, its halo and the tile
batch, never by the image.
"""

from __future__ import annotations

import io
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import torch
import zarr

from segcore import fsio
from segcore.models.checkpoint import ModelMeta
from segcore.errors import ConfigError
from segcore.run.units import _gt_to_classes, _unit_rows, load_model_cached, model_logits
from segcore.metrics.instance import instance_scores
from segcore.models.instances import predict_instances
from segcore.metrics.dice import confusion_counts, dice_from_counts
from segcore.normalise import normalise_batch, percentile_stats
from segcore.run.plan import WorkUnit
from segcore.run.rundir import dice_dir, instances_path, mark_unit_done, masks_path, table_dir
from segcore.run.tables import SEAM_SCHEMA, dice_table, instance_metrics_table, instance_table, write_part
from segcore.tiling import (BLENDS, BlockObjects, Window, blend_block, chunk_windows, flip_tta, keep_core_objects,
                            paste_objects, read_window, tiles_for)

#: Instance metrics of a tiled image are computed when its label image has at most this many pixels.
MAX_METRIC_PIXELS = 1 << 26
#: Pixels sampled (at most) per large image to find its normalisation percentiles.
STATS_SAMPLES = 1 << 22
#: Semantic tiles per forward pass: at most ``batch_size`` and at most this many pixels (bounds memory).
TILE_BATCH_PIXELS = 1 << 20
#: Default model tile of semantic models, and default overlaps.
DEFAULT_TILE = 512
#: Instance models: detector core side and halo.
DEFAULT_INSTANCE_TILE = 256
DEFAULT_INSTANCE_OVERLAP = 64



@dataclass(frozen=True)
class Tiling:
    """Resolved tiling options of a run (see :func:`resolve_tiling`)."""

    tile: int
    overlap: int
    blend: str = "gaussian"
    tta: bool = False


def resolve_tiling(meta: ModelMeta, *, tile_size: int | None, overlap: int | None, blend: str = "gaussian",
                   tta: bool = False) -> Tiling:
    """Tiling options for a model, defaults derived from it.

    Semantic models: the model tile defaults to :data:`DEFAULT_TILE` rounded up to the UNet's
    divisor (``2**depth``), the overlap to a quarter of the tile (more than the receptive field of
    the default UNets). Instance models: the detector runs on cores of ``tile`` pixels (default
    :data:`DEFAULT_INSTANCE_TILE`) plus a halo of ``overlap`` pixels on each side (default
    :data:`DEFAULT_INSTANCE_OVERLAP`), which must exceed the largest object; keep the window small
    enough that it holds fewer objects than the model's ``box_detections_per_img``.
    ``tile_size=0`` is handled by the caller (no tiling).
    """
    if blend not in BLENDS:
        raise ConfigError(f"blend must be one of {BLENDS}, got {blend!r}")
    if meta.kind == "instance":
        tile = DEFAULT_INSTANCE_TILE if tile_size is None else int(tile_size)
        ov = DEFAULT_INSTANCE_OVERLAP if overlap is None else int(overlap)
        if tile < 1 or ov < 0:
            raise ConfigError(f"need tile size >= 1 and overlap >= 0 pixels, got {tile} and {ov}")
        if tta:
            raise ConfigError("test-time augmentation applies to semantic models only")
        return Tiling(tile=tile, overlap=ov, blend=blend, tta=False)
    divisor = 2 ** int(meta.arch_kwargs.get("depth", 4))
    tile = DEFAULT_TILE if tile_size is None else int(tile_size)
    if tile < 1:
        raise ConfigError(f"tile size must be >= 1 (or 0 to disable tiling), got {tile}")
    tile = math.ceil(tile / divisor) * divisor
    ov = tile // 4 if overlap is None else int(overlap)
    if not 0 <= ov < tile:
        raise ConfigError(f"overlap must lie in [0, tile size {tile}), got {ov}")
    return Tiling(tile=tile, overlap=ov, blend=blend, tta=tta)


def image_stats(store_path: str, group: str, index: int, meta: ModelMeta
                ) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Percentile normalisation values of one stored image from a strided sample (read chunk by
    chunk); ``None`` for other normalisations. Every block of the image uses them."""
    if meta.normalisation.mode != "percentile":
        return None
    arr = zarr.open_group(store_path, mode="r")[f"images/{group}"]
    _, height, width, _ = arr.shape
    step = max(1, math.ceil(math.sqrt(height * width / STATS_SAMPLES)))
    ch = arr.chunks[1]
    samples = []
    for y in range(0, height, ch):
        block = arr[index, y:y + ch]
        samples.append(block[(-y) % step::step, ::step].reshape(-1, block.shape[-1]))
    return percentile_stats(np.concatenate(samples), meta.normalisation)


def _counts_vs_gt(store_path: str, unit: WorkUnit, pred: np.ndarray, *, mask_kind: str, num_classes: int,
                  row: dict[str, Any]) -> dict[str, Any] | None:
    """TP/FP/FN of a block against its ground truth (None without usable ground truth)."""
    if row["status"] != "ok" or row["mask_status"] != "ok":
        return None
    w = unit.window
    gt = zarr.open_group(store_path, mode="r")[f"gt/{unit.group}"][unit.start, w.y0:w.y1, w.x0:w.x1]
    gt = _gt_to_classes(gt, mask_kind=mask_kind)
    if int(gt.max(initial=0)) >= num_classes:
        return {"error": f"ground truth has label {int(gt.max())} but the model has {num_classes} classes; "
                         "check --mask-kind or the checkpoint"}
    tp, fp, fn = confusion_counts(pred[None], gt[None], num_classes)
    return {"tp": tp[0].tolist(), "fp": fp[0].tolist(), "fn": fn[0].tolist()}


def _record(unit: WorkUnit, t0: float, started: float, device: str, **extra: Any) -> dict[str, Any]:
    w = unit.window
    return {"unit": unit.name, "group": unit.group, "start": unit.start, "stop": unit.stop, "n_images": 0,
            "window": [w.y0, w.y1, w.x0, w.x1], "pixels": (w.y1 - w.y0) * (w.x1 - w.x0), **extra,
            "device": device, "pid": os.getpid(), "total_s": round(time.perf_counter() - t0, 4),
            "started": started, "finished": time.time()}


def _image_shape(store_path: str, group: str) -> tuple[int, int]:
    return tuple(zarr.open_group(store_path, mode="r")[f"images/{group}"].shape[1:3])  # type: ignore[return-value]


def segment_block(*, store_path: str, run_dir: str, unit: WorkUnit, checkpoint: str, checkpoint_sha256: str,
                  mask_kind: str, tiling: Tiling, stats: Any = None, batch_size: int = 8, device: str = "cpu",
                  precision: str = "bf16", num_threads: int | None = None) -> dict[str, Any]:
    """Semantic model: blend the tiles over one block, write its mask chunk; returns the block's record
    (with ``counts`` against the ground truth, or ``None``). Writes the unit's done marker last."""
    t0, started = time.perf_counter(), time.time()
    if num_threads:
        torch.set_num_threads(num_threads)
    model, meta = load_model_cached(checkpoint, sha256=checkpoint_sha256, device=device)
    height, width = _image_shape(store_path, unit.group)
    core = unit.window
    tiles = tiles_for(core, height, width, tiling.tile, tiling.overlap)
    rw = read_window(tiles)
    raw = zarr.open_group(store_path, mode="r")[f"images/{unit.group}"][unit.start, rw.y0:rw.y1, rw.x0:rw.x1]

    def forward(x: torch.Tensor) -> torch.Tensor:
        return model_logits(model, x, device=device, precision=precision)

    with torch.inference_mode():
        logits = blend_block(flip_tta(forward) if tiling.tta else forward, raw, (rw.y0, rw.x0), core, tiles,
                             to_input=lambda b: normalise_batch(b, meta.normalisation, stats=stats),
                             blend=tiling.blend, overlap=tiling.overlap,
                             batch_size=max(1, min(batch_size, TILE_BATCH_PIXELS // tiling.tile**2)))
    pred = logits.argmax(axis=0).astype(np.uint8 if meta.num_classes <= 256 else np.uint16)
    zarr.open_group(masks_path(run_dir), mode="r+")[unit.group][unit.start, core.y0:core.y1, core.x0:core.x1] = pred
    row = _unit_rows(store_path, unit)[0]
    record = _record(unit, t0, started, device, tiles=len(tiles),
                     counts=_counts_vs_gt(store_path, unit, pred, mask_kind=mask_kind,
                                          num_classes=meta.num_classes, row=row))
    mark_unit_done(run_dir, record)
    return record


def _block_location(run_dir: str, unit_name: str) -> str:
    return fsio.join(run_dir, "blocks", f"{unit_name}.npz")


def save_block(run_dir: str, unit: WorkUnit, block: BlockObjects) -> str:
    """Write a block's objects to ``RUN_DIR/blocks/<unit>.npz`` (atomically; masks bit-packed); returns
    its location."""
    path = _block_location(run_dir, unit.name)
    sizes = np.asarray([m.size for m in block.masks], dtype=np.int64)
    bits = np.packbits(np.concatenate([m.ravel() for m in block.masks])) if block.masks else np.zeros(0, np.uint8)
    fsio.write_bytes(path, fsio.to_buffer(lambda fh: np.savez(
        fh, boxes=block.boxes, classes=block.classes, scores=block.scores, cut_risk=block.cut_risk, sizes=sizes,
        bits=bits, dropped=np.int64(block.duplicates_dropped), capped=np.int64(block.capped),
        on_seams=np.int64(block.on_seams))))
    return path


def load_block(run_dir: str, unit_name: str) -> BlockObjects:
    """The objects :func:`save_block` wrote for ``unit_name``."""
    with np.load(io.BytesIO(fsio.read_bytes(_block_location(run_dir, unit_name)))) as z:
        boxes, sizes = z["boxes"], z["sizes"]
        flat = np.unpackbits(z["bits"], count=int(sizes.sum())).astype(bool)
        masks, offset = [], 0
        for (y0, x0, y1, x1), n in zip(boxes, sizes):
            masks.append(flat[offset:offset + n].reshape(int(y1 - y0), int(x1 - x0)))
            offset += int(n)
        return BlockObjects(boxes=boxes, masks=masks, classes=z["classes"], scores=z["scores"],
                            cut_risk=z["cut_risk"], duplicates_dropped=int(z["dropped"]), capped=int(z["capped"]),
                            on_seams=int(z["on_seams"]))


def detect_block(*, store_path: str, run_dir: str, unit: WorkUnit, checkpoint: str, checkpoint_sha256: str,
                 tiling: Tiling, stats: Any = None, device: str = "cpu", num_threads: int | None = None
                 ) -> dict[str, Any]:
    """Instance model, first pass: detect the objects of one block and save them (no done marker).

    The block is cut into detector cores of ``tiling.tile`` pixels; each is detected with
    ``tiling.overlap`` pixels of halo and keeps the objects whose box centre it holds
    (:func:`~segcore.tiling.keep_core_objects`), so every object is kept once. A window whose
    detections reach the model's per-image cap (``box_detections_per_img``) may have lost objects:
    it is counted in ``capped`` (saved, and reported in the seam table).
    """
    t0 = time.perf_counter()
    if num_threads:
        torch.set_num_threads(num_threads)
    model, meta = load_model_cached(checkpoint, sha256=checkpoint_sha256, device=device)
    height, width = _image_shape(store_path, unit.group)
    block = unit.window
    outer = block.grow(tiling.overlap, height, width)
    raw = zarr.open_group(store_path, mode="r")[f"images/{unit.group}"][unit.start, outer.y0:outer.y1,
                                                                          outer.x0:outer.x1]
    cap = int(model.detector.roi_heads.detections_per_img)
    parts, capped = [], 0
    for sub in chunk_windows(block.y1 - block.y0, block.x1 - block.x0, tiling.tile or max(block.shape)):
        core = Window(block.y0 + sub.y0, block.y0 + sub.y1, block.x0 + sub.x0, block.x0 + sub.x1)
        window = core.grow(tiling.overlap, height, width)
        pixels = raw[window.y0 - outer.y0:window.y1 - outer.y0, window.x0 - outer.x0:window.x1 - outer.x0]
        x = normalise_batch(pixels[None], meta.normalisation, stats=stats).to(device)
        pred = predict_instances(model, x)[0]
        capped += int(len(pred.records) >= cap)
        parts.append(keep_core_objects(pred.labels, pred.records, window, core, height, width))
    objects = BlockObjects(
        boxes=np.concatenate([p.boxes for p in parts]), masks=[m for p in parts for m in p.masks],
        classes=np.concatenate([p.classes for p in parts]), scores=np.concatenate([p.scores for p in parts]),
        cut_risk=np.concatenate([p.cut_risk for p in parts]),
        duplicates_dropped=sum(p.duplicates_dropped for p in parts), capped=capped,
        on_seams=sum(p.on_seams for p in parts))
    save_block(run_dir, unit, objects)
    return {"unit": unit.name, "objects": len(objects), "windows": len(parts), "capped": capped,
            "seconds": round(time.perf_counter() - t0, 4)}


def image_part(group: str, index: int) -> str:
    """Name of the table parts of one tiled image (its Dice rows, instances, seams)."""
    return f"{group}-{index:06d}"


def image_finished(run_dir: str, run_id: str, group: str, index: int) -> bool:
    """True when :func:`finish_image` wrote the Dice part of image ``index`` of ``group``."""
    return fsio.exists(fsio.join(dice_dir(run_dir, run_id), f"{image_part(group, index)}.parquet"))


def block_detected(run_dir: str, unit: WorkUnit) -> bool:
    return fsio.exists(_block_location(run_dir, unit.name))


def block_size(run_dir: str, unit: WorkUnit) -> int:
    """How many objects :func:`detect_block` kept for ``unit``."""
    with np.load(io.BytesIO(fsio.read_bytes(_block_location(run_dir, unit.name)))) as z:
        return int(z["sizes"].shape[0])


def reaching_units(unit: WorkUnit, units: Sequence[WorkUnit], overlap: int, height: int, width: int
                   ) -> list[WorkUnit]:
    """The units of the same image whose saved objects can reach into ``unit``'s block (their objects
    lie inside their block plus ``overlap``)."""
    return [u for u in units if u.group == unit.group and u.start == unit.start
            and u.window.grow(overlap, height, width).intersects(unit.window)]


def paste_block(*, store_path: str, run_dir: str, unit: WorkUnit, sources: Sequence[tuple[str, int]],
                checkpoint_sha256: str, mask_kind: str, meta: ModelMeta, device: str = "cpu") -> dict[str, Any]:
    """Instance model, second pass: fill the block's chunk of ``instances.zarr`` and ``masks.zarr``.

    Args:
        sources: ``(unit name, first id)`` of every unit of the image whose objects may reach into
            this block (:func:`reaching_units`), the first ids handed out by the flow so that ids
            are unique across the image.

    Returns the block's record: ``counts`` against the ground truth, the per-object pixels owned in
    this block (``objects``: ``[id, area, y0, x0, y1, x1]`` in image coordinates), and the seam
    figures of the block's own objects. Writes the unit's done marker last.
    """
    t0, started = time.perf_counter(), time.time()
    core = unit.window
    blocks = {name: load_block(run_dir, name) for name, _ in sources}
    ids, classes = paste_objects(core, [(first, blocks[name]) for name, first in sources])
    zarr.open_group(instances_path(run_dir), mode="r+")[unit.group][unit.start, core.y0:core.y1, core.x0:core.x1] = ids
    zarr.open_group(masks_path(run_dir), mode="r+")[unit.group][unit.start, core.y0:core.y1, core.x0:core.x1] = classes
    owned = []
    present, inverse, areas = np.unique(ids, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(ids.shape)
    for k, (oid, area) in enumerate(zip(present.tolist(), areas.tolist())):
        if oid == 0:
            continue
        ys, xs = np.nonzero(inverse == k)
        owned.append([oid, area, core.y0 + int(ys.min()), core.x0 + int(xs.min()),
                      core.y0 + int(ys.max()) + 1, core.x0 + int(xs.max()) + 1])
    own = blocks[unit.name]
    row = _unit_rows(store_path, unit)[0]
    record = _record(unit, t0, started, device, objects=owned, detected=len(own),
                     on_seams=own.on_seams, duplicates_dropped=own.duplicates_dropped,
                     cut_risk=int(own.cut_risk.sum()), capped=own.capped,
                     counts=_counts_vs_gt(store_path, unit, classes, mask_kind=mask_kind,
                                          num_classes=meta.num_classes, row=row))
    mark_unit_done(run_dir, record)
    return record


def first_ids(units: Sequence[WorkUnit], counts: Mapping[str, int]) -> dict[str, int]:
    """The first instance id of every unit's objects: 1, then running sums, per image in unit order."""
    out: dict[str, int] = {}
    nxt: dict[tuple[str, int], int] = {}
    for u in units:
        key = (u.group, u.start)
        out[u.name] = nxt.get(key, 1)
        nxt[key] = out[u.name] + int(counts[u.name])
    return out


def finish_image(*, store_path: str, run_dir: str, run_id: str, group: str, index: int,
                 records: Iterable[Mapping[str, Any]], meta: ModelMeta, checkpoint_sha256: str, mask_kind: str,
                 tiling: Tiling, blocks: Sequence[tuple[str, int]] = ()) -> dict[str, Any]:
    """Write the tables of one tiled image from its blocks' records.

    Dice rows from the summed counts (``dice/run_id=<id>/<group>-<index>.parquet``), and for
    instance models the instance rows, the instance metrics (images up to
    :data:`MAX_METRIC_PIXELS`) and one seam row (``seams/run_id=<id>/...``); ``blocks`` are then
    ``(unit name, first id)`` of every block of the image. Returns a small record.
    """
    records = list(records)
    part = image_part(group, index)
    rows = _unit_rows(store_path, WorkUnit(unit_id=0, group=group, start=index, stop=index + 1))
    row = rows[0]
    common = {"model": meta.arch, "checkpoint_sha256": checkpoint_sha256, "unit": part}
    c = meta.num_classes
    errors = [r["counts"]["error"] for r in records if r.get("counts") and "error" in r["counts"]]
    counted = [r["counts"] for r in records if r.get("counts") and "error" not in r["counts"]]
    ids, errs = [], []
    tp = fp = fn = np.zeros((0, c), dtype=np.int64)
    if row["status"] != "ok":
        errs.append((row["image_id"], row["error"] or "image could not be decoded"))
    elif row["mask_status"] == "error":
        errs.append((row["image_id"], f"ground truth unusable: {row['mask_error']}"))
    elif errors:
        errs.append((row["image_id"], errors[0]))
    elif counted:
        ids = [row["image_id"]]
        tp, fp, fn = (np.asarray([k[name] for k in counted], dtype=np.int64).sum(axis=0, keepdims=True)
                      for name in ("tp", "fp", "fn"))
    dice, empty = dice_from_counts(tp, fp, fn)
    write_part(dice_table(image_ids=ids, class_names=meta.class_names, tp=tp, fp=fp, fn=fn, dice=dice,
                          empty_gt=empty, errors=errs, **common), dice_dir(run_dir, run_id), f"{part}.parquet")
    out = {"image_id": row["image_id"], "blocks": len(records), "dice_rows": len(ids) * c + len(errs) * c}
    if meta.kind != "instance":
        return out
    objects: dict[int, list[int]] = {}
    for r in records:
        for oid, area, y0, x0, y1, x1 in r["objects"]:
            o = objects.get(oid)
            objects[oid] = [area, y0, x0, y1, x1] if o is None else [
                o[0] + area, min(o[1], y0), min(o[2], x0), max(o[3], y1), max(o[4], x1)]
    info: dict[int, tuple[int, float]] = {}
    for name, first in blocks:
        block = load_block(run_dir, name)
        for k in range(len(block)):
            info[first + k] = (int(block.classes[k]), float(block.scores[k]))
    inst = [{"instance_id": oid, "class_id": info[oid][0], "score": info[oid][1], "bbox": (x0, y0, x1, y1),
             "area": area} for oid, (area, y0, x0, y1, x1) in sorted(objects.items())]
    write_part(instance_table([(row["image_id"], inst)], class_names=meta.class_names, **common),
               table_dir(run_dir, "instances", run_id), f"{part}.parquet")
    seam = {"image_id": row["image_id"], "blocks": len(records), "tile_size": tiling.tile, "overlap": tiling.overlap,
        "objects": len(inst), "objects_on_seams": sum(r["on_seams"] for r in records),
        "duplicates_dropped": sum(r["duplicates_dropped"] for r in records),
        "cut_risk": sum(r["cut_risk"] for r in records), "windows_at_cap": sum(r["capped"] for r in records),
        "model": meta.arch, "checkpoint_sha256": checkpoint_sha256}
    write_part(pa.Table.from_pylist([seam], schema=SEAM_SCHEMA), table_dir(run_dir, "seams", run_id),
               f"{part}.parquet")
    out.update(instances=len(inst), seam=seam)
    arr = zarr.open_group(instances_path(run_dir), mode="r")[group]
    if mask_kind == "instance" and ids and arr.shape[1] * arr.shape[2] <= MAX_METRIC_PIXELS:
        gt = zarr.open_group(store_path, mode="r")[f"gt/{group}"][index]
        scores = instance_scores(arr[index], gt, scores={r["instance_id"]: r["score"] for r in inst})
        write_part(instance_metrics_table([(row["image_id"], scores)], **common),
                   table_dir(run_dir, "instance_metrics", run_id), f"{part}.parquet")
    return out
