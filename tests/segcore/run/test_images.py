"""Finishing a tiled image of an instance model in-process: detect, paste, then the image's tables
and the warning of objects that may be cut and windows at the model's cap."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from segcore.collection.imageio import write_png
from segcore.collection.sources import pair_sources, probe_sources
from segcore.collection.store import chunk_rows, create_store, plan_groups, write_manifest, write_store_chunk
from segcore.models import create_model
from segcore.models.checkpoint import ModelMeta, save_checkpoint
from segcore.normalise import Normalisation
from segcore.run.blocks import detect_block, paste_block
from segcore.run.images import finish_image
from segcore.run.rundir import done_records
from segcore.run.schedule import TiledSchedule
from segcore.run.start import start_run


def test_a_tiled_image_with_windows_at_the_cap_is_told_and_counted_in_its_seam_row(tmp_path: Path, caplog) -> None:
    rng = np.random.default_rng(2)
    write_png(tmp_path / "img" / "big.png", rng.integers(0, 256, (96, 96), dtype=np.uint8))
    rows = probe_sources(pair_sources(str(tmp_path / "img"), None))
    groups, planned = plan_groups(rows, chunk_pixels=48 * 48, max_chunk_images=64, tile_chunk=48)
    store = str(tmp_path / "s.zarr")
    create_store(store, groups, with_gt=False, mask_kind="instance", spec={})
    write_manifest(store, [r for c in chunk_rows(planned, groups) for r in write_store_chunk(store, c, threads=1)])
    kwargs = {"score_threshold": 0.0, "box_detections_per_img": 1}  # any detection reaches the cap
    meta = ModelMeta(arch="maskrcnn_r18", arch_kwargs=kwargs, class_names=("bg", "obj"), in_channels=1,
                     normalisation=Normalisation(mode="range", scale=255.0))
    torch.manual_seed(0)
    ckpt = str(save_checkpoint(tmp_path / "m.safetensors", create_model("maskrcnn_r18", in_channels=1, num_classes=2,
                                                                        **kwargs), meta))
    ctx, plan, _, info = start_run(store, ckpt, str(tmp_path / "run"), tile_size=48, overlap=8, device="cpu")
    schedule = TiledSchedule(plan, {}, instance=True, shapes={g.name: (g.height, g.width) for g in info.groups})
    detected = [detect_block(ctx, u) for u in schedule.to_detect()]
    assert len(detected) == 4 and sum(r.capped for r in detected) > 0
    done = done_records(ctx.run_dir, ctx.key)
    records = {u.name: paste_block(ctx, u, sources=sources, meta=meta)
               for u, sources in schedule.to_paste(done, redetected=schedule.units)}
    (job,) = schedule.to_finish(schedule.units, records, done)
    with caplog.at_level(logging.WARNING, logger="segcore"):
        finish_image(ctx, job.group, job.index, records=job.records, meta=meta, blocks=job.blocks)
    seams = pq.read_table(Path(ctx.run_dir) / "seams").to_pylist()
    assert len(seams) == 1 and seams[0]["windows_at_cap"] == sum(r.capped for r in detected)
    told = [r.message for r in caplog.records if r.message.startswith("big: ")]
    assert len(told) == 1 and f"{seams[0]['windows_at_cap']} detection window(s) reached the model's cap" in told[0]
    assert f"{seams[0]['cut_risk']} object(s) touch the edge" in told[0] and "see the seams table" in told[0]
