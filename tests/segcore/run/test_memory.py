"""Out-of-memory back-off inside a step: an injected out-of-memory error halves the batch, then the tile;
the outputs equal those of a run started with the sizes the step finished with."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from segcore.collection.imageio import write_png
from segcore.collection.sources import pair_sources, probe_sources
from segcore.collection.store import chunk_rows, create_store, plan_groups, write_manifest, write_store_chunk
from segcore.models import create_model
from segcore.models.checkpoint import ModelMeta, save_checkpoint
from segcore.normalise import Normalisation
from segcore.run.blocks import segment_block
from segcore.run.context import BlockRecord, UnitRecord, record_from_json
from segcore.run.memory import Faults, OutOfMemory, halve, smallest_tile, with_backoff
from segcore.run.rundir import done_records, label_array, masks_path
from segcore.run.start import start_run
from segcore.run.units import segment_unit

META = ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2}, class_names=("bg", "a", "b"), in_channels=1,
                 normalisation=Normalisation(mode="range", scale=255.0))


def _store(tmp_path: Path, *, size: tuple[int, int], count: int, tile_chunk: int = 0) -> dict:
    rng = np.random.default_rng(5)
    for i in range(count):
        write_png(tmp_path / "img" / f"i{i}.png", rng.integers(0, 256, size, dtype=np.uint8))
    rows = probe_sources(pair_sources(str(tmp_path / "img"), None))
    groups, planned = plan_groups(rows, chunk_pixels=8 * size[0] * size[1] if not tile_chunk else 64 * 64,
                                  max_chunk_images=64, tile_chunk=tile_chunk)
    store = str(tmp_path / "s.zarr")
    create_store(store, groups, with_gt=False, mask_kind="class", spec={})
    write_manifest(store, [r for c in chunk_rows(planned, groups) for r in write_store_chunk(store, c, threads=1)])
    torch.manual_seed(0)
    model = create_model("unet", in_channels=1, num_classes=3, base=4, depth=2)
    with torch.no_grad():  # weights of a spread that gives every class somewhere (an untrained one gives one)
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    ckpt = save_checkpoint(tmp_path / "m.safetensors", model, META)
    return {"store": store, "ckpt": str(ckpt)}


def test_halve_goes_through_the_batch_then_the_tile() -> None:
    assert halve(8, None) == (4, None) and halve(3, None) == (1, None) and halve(1, None) is None
    assert halve(2, 64, multiple=4, min_tile=12) == (1, 64)
    assert halve(1, 64, multiple=4, min_tile=12) == (1, 32)
    assert halve(1, 20, multiple=4, min_tile=12) == (1, 12)  # 10 -> 8 -> held at the minimum
    assert halve(1, 12, multiple=4, min_tile=12) is None
    assert smallest_tile(multiple=4, overlap=8) == 20 and smallest_tile(multiple=16, overlap=4) == 32


def test_with_backoff_records_the_sizes_and_gives_up_at_the_bottom() -> None:
    seen = []

    def attempt(batch: int, tile: int | None) -> str:
        seen.append((batch, tile))
        Faults(oom_pixels=2 * 16 * 16).check_forward(images=batch, height=tile, width=tile)
        return "ok"

    assert with_backoff(attempt, batch=4, tile=32, multiple=4, min_tile=8) == ("ok", 1, 16)
    assert seen == [(4, 32), (2, 32), (1, 32), (1, 16)]
    with pytest.raises(OutOfMemory, match="batch of 1 and tiles of 32 px") as info:
        with_backoff(attempt, batch=1, tile=32, multiple=4, min_tile=32)
    assert isinstance(info.value, MemoryError)
    with pytest.raises(OutOfMemory):
        with_backoff(lambda b, t: (_ for _ in ()).throw(MemoryError()), batch=2)


def test_a_unit_out_of_memory_finishes_with_half_the_batch_bitwise_equal(tmp_path: Path) -> None:
    data = _store(tmp_path, size=(16, 16), count=6)
    ctx, plan, _, _ = start_run(data["store"], data["ckpt"], str(tmp_path / "oom"), batch_size=4, device="cpu")
    assert [u.n_images for u in plan.units] == [6]
    faulty = dataclasses.replace(ctx, faults=Faults(oom_pixels=3 * 16 * 16))  # 4 images per pass do not fit
    record = segment_unit(faulty, plan.units[0])
    assert isinstance(record, UnitRecord) and record.batch_size == 2
    assert done_records(ctx.run_dir, ctx.key)[record.unit].batch_size == 2

    ref, plan2, _, _ = start_run(data["store"], data["ckpt"], str(tmp_path / "ref"), batch_size=2, device="cpu")
    assert segment_unit(ref, plan2.units[0]).batch_size == 2
    group = plan.units[0].group
    got, want = (label_array(masks_path(d), group)[:] for d in (ctx.run_dir, ref.run_dir))
    assert len(np.unique(want)) > 1  # the model predicts more than one class on these images
    np.testing.assert_array_equal(got, want)


def test_a_block_out_of_memory_halves_the_batch_then_the_tile_bitwise_equal(tmp_path: Path) -> None:
    data = _store(tmp_path, size=(96, 96), count=1, tile_chunk=48)
    ctx, plan, _, _ = start_run(data["store"], data["ckpt"], str(tmp_path / "oom"), tile_size=32, overlap=4,
                                batch_size=4, device="cpu")
    blocks = [u for u in plan.units if u.window is not None]
    assert len(blocks) == 4 and ctx.tiling.tile == 32
    # Passes over more than 16 x 16 px fail: batch 4 -> 2 -> 1 at tile 32, then tile 16 (> twice the overlap 4, 4 | 16).
    faulty = dataclasses.replace(ctx, faults=Faults(oom_pixels=16 * 16))
    records = [segment_block(faulty, u) for u in blocks]
    assert {(r.batch_size, r.tile) for r in records} == {(1, 16)}
    saved = done_records(ctx.run_dir, ctx.key)[blocks[0].name]
    assert isinstance(saved, BlockRecord) and (saved.batch_size, saved.tile) == (1, 16)

    ref, plan2, _, _ = start_run(data["store"], data["ckpt"], str(tmp_path / "ref"), tile_size=16, overlap=4,
                                 batch_size=1, device="cpu")
    assert all((r.batch_size, r.tile) == (1, 16) for r in (segment_block(ref, u) for u in plan2.units))
    group = blocks[0].group
    got, want = (label_array(masks_path(d), group)[:] for d in (ctx.run_dir, ref.run_dir))
    np.testing.assert_array_equal(got, want)
    untouched, plan3, _, _ = start_run(data["store"], data["ckpt"], str(tmp_path / "t32"), tile_size=32, overlap=4,
                                       batch_size=4, device="cpu")
    [segment_block(untouched, u) for u in plan3.units]
    assert not np.array_equal(label_array(masks_path(untouched.run_dir), group)[:], got)


def test_records_written_before_the_new_fields_still_parse() -> None:
    old = {"type": "unit", "unit": "unit-00000", "group": "g000", "start": 0, "stop": 2, "key": "k", "n_images": 2,
           "n_evaluated": 2, "n_errors": 0, "dice_rows": 6, "instances": None,
           "timing": {"device": "cpu", "pid": 1, "started": 0.0, "finished": 1.0}}
    assert record_from_json(old).batch_size is None
    block = {"type": "block", "unit": "b", "group": "g", "index": 0, "window": [0, 8, 0, 8], "key": "k", "tiles": 1,
             "counts": None, "timing": old["timing"]}
    parsed = record_from_json(block)
    assert (parsed.batch_size, parsed.tile, parsed.window) == (None, None, (0, 8, 0, 8))
