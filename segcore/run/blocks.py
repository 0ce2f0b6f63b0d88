"""Work units of tiled groups (large images): one block of one image, one chunk of the outputs.

- semantic models, :func:`segment_block`: blended tile logits over the block, argmax, write the
  mask chunk, count TP/FP/FN against the ground-truth chunk;
- instance models, two passes: :func:`detect_block` runs the detector on each detector core of
  the block plus its halo and saves the objects whose box centre lies in that core
  (``RUN_DIR/blocks/<unit>.npz``); when every block of the image is detected,
  :func:`paste_block` fills the block's chunk of the instance and class arrays from the saved
  objects of every block that can reach into it, with ids unique across the image, and counts
  against the ground truth.

Every forward pass goes through the run's :class:`~segcore.models.predict.Predictor`; each step
writes its done-record last. The image's tables are written by :mod:`segcore.run.images` once
all its blocks are done; :mod:`segcore.run.schedule` says which steps remain. Memory is bounded
by the block, its halo and the tile batch, never by the image; a forward pass that runs out of memory is
retried with half the tile batch, then half the tile (:mod:`segcore.run.memory`), and the sizes a
block finished with are in its record.
"""

from __future__ import annotations

import io
import math
import time
from typing import Sequence

import numpy as np
import torch

from segcore import fsio
from segcore.collection.store import store_root
from segcore.models.checkpoint import ModelMeta
from segcore.normalise import Stats, percentile_stats
from segcore.run.channels import adapt_images
from segcore.run.context import BlockRecord, Counts, DetectRecord, RunContext, Timing
from segcore.run.evaluate import count_against_gt, ground_truth_state
from segcore.run.memory import MIN_DETECT_TILE, smallest_tile, tile_multiple, with_backoff
from segcore.run.plan import WorkUnit
from segcore.run.rundir import instances_path, label_array, mark_done, masks_path
from segcore.run.units import unit_rows
from segcore.tiling import (BlockObjects, Window, blend_block, chunk_windows, flip_tta, keep_core_objects,
                            paste_objects, read_window, tiles_for)

#: Pixels sampled (at most) per large image to find its normalisation percentiles.
STATS_SAMPLES = 1 << 22
#: Semantic tiles per forward pass: at most ``batch_size`` and at most this many pixels (bounds memory).
TILE_BATCH_PIXELS = 1 << 20


def image_stats(store_path: str, group: str, index: int, meta: ModelMeta) -> Stats | None:
    """Percentile normalisation values of one stored image from a strided sample (read chunk by
    chunk), of its pixels as the channel policy feeds them to the model (:mod:`segcore.run.channels`);
    ``None`` for other normalisations, or when the policy refuses the sample. Every block of the
    image uses them."""
    if meta.normalisation.mode != "percentile":
        return None
    arr = store_root(store_path)[f"images/{group}"]
    _, height, width, _ = arr.shape
    step = max(1, math.ceil(math.sqrt(height * width / STATS_SAMPLES)))
    ch = arr.chunks[1]
    samples = []
    for y in range(0, height, ch):
        block = arr[index, y:y + ch]
        samples.append(block[(-y) % step::step, ::step].reshape(-1, block.shape[-1]))
    pixels, _, refused = adapt_images(np.concatenate(samples)[None, :, None], model_channels=meta.in_channels)
    return None if refused else percentile_stats(pixels[0, :, 0], meta.normalisation)


def _counts_vs_gt(ctx: RunContext, unit: WorkUnit, pred: np.ndarray, meta: ModelMeta) -> Counts | None:
    """Counts of a block against its ground truth (None without usable ground truth)."""
    row = unit_rows(ctx.store, unit.group, unit.start, unit.stop)[0]
    if not ground_truth_state(row)[0]:
        return None
    w = unit.window
    gt = store_root(ctx.store)[f"gt/{unit.group}"][unit.start, w.y0:w.y1, w.x0:w.x1]
    return count_against_gt(pred[None], gt[None], mask_kind=ctx.mask_kind, meta=meta)[0]


def _image_shape(store_path: str, group: str) -> tuple[int, int]:
    return tuple(store_root(store_path)[f"images/{group}"].shape[1:3])  # type: ignore[return-value]


def _window(unit: WorkUnit) -> tuple[int, int, int, int]:
    w = unit.window
    return (w.y0, w.y1, w.x0, w.x1)


def segment_block(ctx: RunContext, unit: WorkUnit, *, stats: Stats | None = None) -> BlockRecord:
    """Semantic model: blend the tiles over one block, write its mask chunk; returns the block's record
    (with ``counts`` against the ground truth, or ``None``). Writes the done-record last."""
    ctx.faults.hang(unit.name)
    t0, started = time.perf_counter(), time.time()
    predictor = ctx.predictor()
    tiling = ctx.tiling
    height, width = _image_shape(ctx.store, unit.group)
    core = unit.window
    images = store_root(ctx.store)[f"images/{unit.group}"]
    logits_of = flip_tta(predictor.logits) if tiling.tta else predictor.logits
    refused: dict[int, str] = {}

    def blend(batch: int, tile: int | None) -> tuple[int, np.ndarray]:
        tiles = tiles_for(core, height, width, tile, tiling.overlap)
        rw = read_window(tiles)
        raw = images[unit.start, rw.y0:rw.y1, rw.x0:rw.x1]
        adapted, _, why = adapt_images(raw[None], model_channels=predictor.meta.in_channels)  # channel policy
        refused.update(why)
        ctx.faults.check_forward(images=min(batch, len(tiles)), height=tile, width=tile)
        with torch.inference_mode():
            return len(tiles), blend_block(logits_of, adapted[0], (rw.y0, rw.x0), core, tiles,
                                           to_input=lambda b: predictor.prepare(b, stats=stats), blend=tiling.blend,
                                           overlap=tiling.overlap, batch_size=batch)

    multiple = tile_multiple(predictor.meta)
    (n_tiles, logits), batch, tile = with_backoff(
        blend, batch=max(1, min(ctx.batch_size, TILE_BATCH_PIXELS // tiling.tile**2)), tile=tiling.tile,
        multiple=multiple, min_tile=min(tiling.tile, smallest_tile(multiple=multiple, overlap=tiling.overlap)),
        device=ctx.device, what=f"block {unit.name}")
    pred = logits.argmax(axis=0).astype(predictor.label_dtype)
    if refused:  # fed as zeros: background, and the reason instead of counts
        pred[:] = 0
    label_array(masks_path(ctx.run_dir), unit.group, mode="r+")[unit.start, core.y0:core.y1, core.x0:core.x1] = pred
    record = BlockRecord(unit=unit.name, group=unit.group, index=unit.start, window=_window(unit), key=ctx.key,
                         tiles=n_tiles,
                         counts=Counts(error=refused[0]) if refused else _counts_vs_gt(ctx, unit, pred, predictor.meta),
                         timing=Timing.since(t0, started, ctx.device), batch_size=batch, tile=tile)
    mark_done(ctx.run_dir, record)
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


def saved_blocks(run_dir: str) -> set[str]:
    """The units whose objects :func:`save_block` wrote into ``run_dir`` (one listing)."""
    return {loc.rsplit("/", 1)[-1][:-len(".npz")]
            for loc in fsio.list_files(fsio.join(run_dir, "blocks"), suffix=".npz", recursive=False)}


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


def detect_block(ctx: RunContext, unit: WorkUnit, *, stats: Stats | None = None) -> DetectRecord:
    """Instance model, first pass: detect the objects of one block and save them; the done-record
    (``<unit>.detect``) says how many were kept.

    The block is cut into detector cores of ``tiling.tile`` pixels; each is detected with
    ``tiling.overlap`` pixels of halo and keeps the objects whose box centre it holds
    (:func:`~segcore.tiling.keep_core_objects`), so every object is kept once. A window whose
    detections reach the model's per-window cap (``box_detections_per_img``) may have lost
    objects: it is counted in ``capped`` (saved, and reported in the seam table).
    """
    ctx.faults.hang(unit.name)
    t0 = time.perf_counter()
    predictor = ctx.predictor()
    tiling = ctx.tiling
    height, width = _image_shape(ctx.store, unit.group)
    block = unit.window
    outer = block.grow(tiling.overlap, height, width)
    raw = store_root(ctx.store)[f"images/{unit.group}"][unit.start, outer.y0:outer.y1,
                                                                         outer.x0:outer.x1]
    raw = adapt_images(raw[None], model_channels=predictor.meta.in_channels)[0][0]  # channel policy
    cap = predictor.detections_cap

    def detect(_batch: int, tile: int | None) -> tuple[list, int]:
        parts, capped = [], 0
        for sub in chunk_windows(block.y1 - block.y0, block.x1 - block.x0, tile):
            core = Window(block.y0 + sub.y0, block.y0 + sub.y1, block.x0 + sub.x0, block.x0 + sub.x1)
            window = core.grow(tiling.overlap, height, width)
            pixels = raw[window.y0 - outer.y0:window.y1 - outer.y0, window.x0 - outer.x0:window.x1 - outer.x0]
            ctx.faults.check_forward(images=1, height=pixels.shape[0], width=pixels.shape[1])
            pred = predictor.instances(pixels[None], stats=stats)[0]
            capped += int(cap is not None and len(pred.records) >= cap)
            parts.append(keep_core_objects(pred.labels, pred.records, window, core, height, width))
        return parts, capped

    first = tiling.tile or max(block.shape)
    (parts, capped), _, tile = with_backoff(detect, batch=1, tile=first, min_tile=min(first, MIN_DETECT_TILE),
                                            device=ctx.device, what=f"block {unit.name}")
    objects = BlockObjects(
        boxes=np.concatenate([p.boxes for p in parts]), masks=[m for p in parts for m in p.masks],
        classes=np.concatenate([p.classes for p in parts]), scores=np.concatenate([p.scores for p in parts]),
        cut_risk=np.concatenate([p.cut_risk for p in parts]),
        duplicates_dropped=sum(p.duplicates_dropped for p in parts), capped=capped,
        on_seams=sum(p.on_seams for p in parts))
    save_block(ctx.run_dir, unit, objects)
    record = DetectRecord(unit=unit.name, key=ctx.key, objects=len(objects), windows=len(parts), capped=capped,
                          seconds=round(time.perf_counter() - t0, 4), tile=tile)
    mark_done(ctx.run_dir, record)
    return record


def paste_block(ctx: RunContext, unit: WorkUnit, *, sources: Sequence[tuple[str, int]], meta: ModelMeta
                ) -> BlockRecord:
    """Instance model, second pass: fill the block's chunk of ``instances.zarr`` and ``masks.zarr``.

    Args:
        sources: ``(unit name, first id)`` of every unit of the image whose objects may reach into
            this block (:meth:`segcore.run.schedule.TiledSchedule.to_paste` hands them out, so that
            ids are unique across the image).

    Returns the block's record: ``counts`` against the ground truth, the per-object pixels owned in
    this block (``objects``: ``[id, area, y0, x0, y1, x1]`` in image coordinates), and the seam
    figures of the block's own objects. Writes the done-record last.
    """
    t0, started = time.perf_counter(), time.time()
    core = unit.window
    blocks = {name: load_block(ctx.run_dir, name) for name, _ in sources}
    ids, classes = paste_objects(core, [(first, blocks[name]) for name, first in sources])
    label_array(instances_path(ctx.run_dir), unit.group, mode="r+")[unit.start, core.y0:core.y1, core.x0:core.x1] = ids
    label_array(masks_path(ctx.run_dir), unit.group, mode="r+")[unit.start, core.y0:core.y1, core.x0:core.x1] = classes
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
    record = BlockRecord(unit=unit.name, group=unit.group, index=unit.start, window=_window(unit), key=ctx.key,
                         tiles=0, counts=_counts_vs_gt(ctx, unit, classes, meta),
                         timing=Timing.since(t0, started, ctx.device), objects=owned, detected=len(own),
                         on_seams=own.on_seams, duplicates_dropped=own.duplicates_dropped,
                         cut_risk=int(own.cut_risk.sum()), capped=own.capped)
    mark_done(ctx.run_dir, record)
    return record
