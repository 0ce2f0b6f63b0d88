"""The real CUDA out-of-memory path: with most of the device's memory taken, a unit asked to run 64 images
per pass backs off to a batch that fits and completes. Marked `gpu`: deselected by default and skipped
where torch sees no CUDA device. Run with `pytest -m gpu` on a GPU machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from segcore.collection.imageio import write_png
from segcore.collection.sources import pair_sources, probe_sources
from segcore.collection.store import chunk_rows, create_store, plan_groups, write_manifest, write_store_chunk
from segcore.models import create_model
from segcore.models.checkpoint import ModelMeta, save_checkpoint
from segcore.models.predict import load_predictor
from segcore.normalise import Normalisation
from segcore.run.rundir import done_records, label_array, masks_path
from segcore.run.start import start_run
from segcore.run.units import segment_unit

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

N, SIDE = 64, 256
META = ModelMeta(arch="unet", arch_kwargs={"base": 16, "depth": 3}, class_names=("bg", "a", "b"), in_channels=1,
                 normalisation=Normalisation(mode="range", scale=255.0))


def test_a_unit_backs_off_to_a_batch_that_fits_in_the_free_memory(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for i in range(N):
        write_png(tmp_path / "img" / f"i{i:02d}.png", rng.integers(0, 256, (SIDE, SIDE), dtype=np.uint8))
    rows = probe_sources(pair_sources(str(tmp_path / "img"), None))
    groups, planned = plan_groups(rows, chunk_pixels=N * SIDE * SIDE, max_chunk_images=N)
    store = str(tmp_path / "s.zarr")
    create_store(store, groups, with_gt=False, mask_kind="class", spec={})
    write_manifest(store, [r for c in chunk_rows(planned, groups) for r in write_store_chunk(store, c, threads=2)])
    torch.manual_seed(0)
    ckpt = str(save_checkpoint(tmp_path / "m.safetensors", create_model("unet", in_channels=1, num_classes=3,
                                                                          **META.arch_kwargs), META))
    ctx, plan, _, _ = start_run(store, ckpt, str(tmp_path / "run"), batch_size=N, device="cuda", precision="fp32")
    assert [u.n_images for u in plan.units] == [N]
    ctx = ctx.on_worker(0)

    # Peak memory of a pass over 4 images, then leave free about 2.5 times that: 64 per pass cannot fit.
    predictor = load_predictor(ckpt, sha256=ctx.checkpoint_sha256, device=ctx.device, precision="fp32")
    images = zarr.open_group(store, mode="r")[f"images/{plan.units[0].group}"][:4]
    reference = predictor.labels(images, batch_size=4)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    predictor.labels(images, batch_size=4)
    peak4 = torch.cuda.max_memory_allocated() - base
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info()
    blocker = torch.empty(int(free - 2.5 * peak4), dtype=torch.uint8, device=ctx.device)
    try:
        record = segment_unit(ctx, plan.units[0])
    finally:
        del blocker
        torch.cuda.empty_cache()
    assert record.batch_size is not None and 1 <= record.batch_size <= 8
    assert done_records(ctx.run_dir, ctx.key)[record.unit].batch_size == record.batch_size
    masks = label_array(masks_path(ctx.run_dir), plan.units[0].group)[:]
    # cuDNN may pick other kernels for another batch size: labels agree, up to a rare tie at the argmax.
    assert (masks[:4] == reference).mean() > 0.999
