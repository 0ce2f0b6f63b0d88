"""Reading a run back: an image whose file changed is read at its current version only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from segcore.models.checkpoint import ModelMeta, save_checkpoint
from segcore.collection.imageio import write_png
from segcore.run.start import start_run
from segcore.run.units import segment_unit
from segcore.models import create_model
from segcore.normalise import Normalisation
from segcore.run.results import open_run
from segcore.collection.sources import pair_sources, probe_sources
from segcore.collection.store import chunk_rows, create_store, plan_groups, write_manifest, write_store_chunk

META = ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2}, class_names=("bg", "fg"), in_channels=1,
                 normalisation=Normalisation(mode="range", scale=255.0))


def _ingest(src: Path, *, first_group: int, batch: int) -> tuple[list, list[dict]]:
    """Probe and plan the images under ``src/img`` (masks under ``src/gt``) as groups from ``first_group`` on."""
    rows = probe_sources(pair_sources(str(src / "img"), str(src / "gt")))
    return plan_groups([dict(r, batch=batch) for r in rows], chunk_pixels=4 * 256, max_chunk_images=4,
                       first_group=first_group)


def test_dice_of_a_changed_image_has_the_rows_of_its_current_version_only(tmp_path):
    # Batch 0 holds a, b, c (group g000); file "a" then changed in place: batch 1 holds its new
    # content (ground truth all foreground) in group g001 and the old manifest row is superseded.
    rng = np.random.default_rng(5)
    for name in ("a", "b", "c"):
        img = rng.integers(0, 256, (16, 16), dtype=np.uint8)
        write_png(tmp_path / "v0" / "img" / f"{name}.png", img)
        write_png(tmp_path / "v0" / "gt" / f"{name}.png", (img > 100).astype(np.uint8))
    write_png(tmp_path / "v1" / "img" / "a.png", rng.integers(0, 256, (16, 16), dtype=np.uint8))
    write_png(tmp_path / "v1" / "gt" / "a.png", np.ones((16, 16), np.uint8))
    groups0, planned0 = _ingest(tmp_path / "v0", first_group=0, batch=0)
    groups1, planned1 = _ingest(tmp_path / "v1", first_group=len(groups0), batch=1)
    store, run_dir = str(tmp_path / "s.zarr"), str(tmp_path / "run")
    create_store(store, groups0 + groups1, with_gt=True, mask_kind="class", spec={})
    old, new = ([r for c in chunk_rows(p, g) for r in write_store_chunk(store, c, threads=1)]
                for p, g in ((planned0, groups0), (planned1, groups1)))
    (new_a,) = new
    write_manifest(store, old + new)
    ckpt = save_checkpoint(tmp_path / "m.safetensors", create_model("unet", in_channels=1, num_classes=2,
                                                                    base=4, depth=2), META)
    ctx, plan, _, _ = start_run(store, str(ckpt), run_dir, batch_size=4, device="cpu", num_threads=1)
    units = plan.units
    for u in units:  # both versions segmented while current (a unit reaching a superseded one skips it)
        segment_unit(ctx, u)
    for r in old:
        if r["image_id"] == "a":
            r["superseded_by"] = new_a["sha256"] or "0" * 64
    write_manifest(store, old + new)

    reader = open_run(run_dir)
    table = reader.dice_table()
    assert table.filter(pc.equal(table["image_id"], "a")).num_rows == 4  # both versions stay in the table
    assert reader.image_ids == ["a", "b", "c"]
    rows = reader.dice("a")
    assert [r["class_id"] for r in rows] == [0, 1]
    assert {r["unit"] for r in rows} == {u.name for u in units if u.group == new_a["group"]} != set()
    # the current ground truth has 256 foreground and no background pixels (the old one had both)
    assert [r["tp"] + r["fn"] for r in rows] == [0, 256]
    assert [r["tp"] for r in rows] == [0, int((reader.mask("a") == 1).sum())]
    assert reader.dice("b") == table.filter(pc.equal(table["image_id"], "b")).sort_by("class_id").to_pylist()
