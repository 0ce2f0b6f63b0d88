"""Tests of training from a collection store (what ``segflow train`` runs on a worker), without Prefect."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from segcore.collection.sources import pair_sources, probe_sources
from segcore.config import IngestSpec
from segcore.collection.store import (
    chunk_rows,
    create_store,
    plan_groups,
    write_manifest,
    write_store_chunk,
)
from segcore.errors import CheckpointError, ConfigError
from segcore.fsio import file_sha256
from segcore.models.checkpoint import load_checkpoint
from segcore.normalise import Normalisation
from segcore.synthetic import generate_collection
from segcore.synthetic_volumes import VOLUME_CLASS_NAMES, generate_volume_collection
from segcore.training.from_store import TrainResult, epoch_line, no_validation_note, read_labelled, train_from_store
from segcore.training.semantic import train_semantic
from segcore.training.settings import DEFAULT_MIN_EPOCH_PATCHES, Recipe
from tests.segcore.collection.serial import ingest_serially

NORM = Normalisation(mode="range", scale=255.0)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _store(root: Path, *, mask_kind: str) -> str:
    """Ingest the synthetic collection under ``root`` into ``root/collection.zarr``."""
    rows = probe_sources(pair_sources(str(root / "images"), str(root / "masks")))
    groups, rows = plan_groups(rows, chunk_pixels=32 * 32 * 4, max_chunk_images=4)
    store = str(root / "collection.zarr")
    create_store(store, groups, with_gt=True, mask_kind=mask_kind, spec={})
    final = [r for chunk in chunk_rows(rows, groups) for r in write_store_chunk(store, chunk)]
    write_manifest(store, final + [r for r in rows if r["group"] is None])
    return store


@pytest.fixture(scope="module")
def semantic_store(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("from_store")
    generate_collection(root, n_images=6, size=32, seed=0)
    return _store(root, mask_kind="class")


def _train(store: str, out: Path, **overrides) -> TrainResult:
    kwargs = dict(store=store, out=str(out), model="unet", class_names=None, arch_kwargs={"base": 4}, epochs=2,
                  batch_size=4, lr=None, val_fraction=0.34, crop_size=None, seed=0, time_budget_s=None,
                  normalisation=NORM, command="segflow train --test")
    kwargs.update(overrides)
    return train_from_store(**kwargs)


def test_trains_the_stores_images_and_writes_a_described_checkpoint(semantic_store, tmp_path):
    seen: list[dict] = []
    out = tmp_path / "m.safetensors"
    result = _train(semantic_store, out, on_epoch=seen.append)
    assert result.checkpoint == str(out) and result.sha256 == file_sha256(out)
    assert result.kind == "semantic" and seen == result.history and len(result.history) == 2
    model, meta = load_checkpoint(out)
    assert meta.arch_kwargs == {"base": 4, "depth": 3}  # merged over the UNet defaults
    assert meta.class_names == ("background", "class_1", "class_2")  # one per label value in the store
    p = meta.provenance
    assert (p["command"], p["store"], p["images"], p["n_train"], p["n_val"]) == (
        "segflow train --test", semantic_store, 6, 4, 2)
    assert (p["batch_size"], p["lr"]) == (4, 3e-3)  # lr: the UNet default
    assert result.best_val_score == p["val_dice_mean_fg"] == max(r["val_dice_mean_fg"] for r in result.history)

    # The same as training on the store's arrays directly: bit for bit.
    images, labels, ids = read_labelled(semantic_store)
    direct, _, _ = train_semantic(images, labels.astype(np.int64), class_names=meta.class_names,
                                  arch_kwargs={"base": 4, "depth": 3}, normalisation=NORM, epochs=2, batch_size=4,
                                  lr=3e-3, val_fraction=0.34, seed=0, ids=ids, val_split="tail",
                                  recipe=Recipe(min_epoch_patches=DEFAULT_MIN_EPOCH_PATCHES))  # segflow train's floor
    assert p["recipe"]["min_epoch_patches"] == DEFAULT_MIN_EPOCH_PATCHES
    assert p["val_split"] == "tail" and p["val_ids"] == sorted(ids)[-2:]  # the default: a contiguous hold-out
    expected = direct.state_dict()
    assert all(torch.equal(t, expected[k]) for k, t in model.state_dict().items())


def test_images_of_one_shape_in_several_groups_train_together_and_several_shapes_are_named(tmp_path, capsys,
                                                                                          caplog):
    """An incremental store appends a group per batch (and every volume is a group): its images of one
    shape train together, in group order; images of two shapes are refused with their counts."""
    from segcore.collection.imageio import write_png
    from segcore.errors import StoreError

    rng = np.random.default_rng(0)
    batches = {0: [("a0", 16), ("a1", 16)], 1: [("b0", 16)], 2: [("c0", 24)]}
    for batch, images in batches.items():
        for name, side in images:
            img = rng.integers(0, 256, (side, side), dtype=np.uint8)
            write_png(tmp_path / f"b{batch}" / "img" / f"{name}.png", img)
            write_png(tmp_path / f"b{batch}" / "gt" / f"{name}.png", (img > 128).astype(np.uint8))
    store = str(tmp_path / "s.zarr")
    planned, groups = [], []
    for batch in batches:
        rows = probe_sources(pair_sources(str(tmp_path / f"b{batch}" / "img"), str(tmp_path / f"b{batch}" / "gt")))
        g, r = plan_groups([dict(x, batch=batch) for x in rows], chunk_pixels=4 * 256, max_chunk_images=4,
                           first_group=len(groups))
        groups, planned = groups + g, planned + [(g, r)]
    create_store(store, groups, with_gt=True, mask_kind="class", spec={})
    written = [row for g, r in planned for c in chunk_rows(r, g) for row in write_store_chunk(store, c)]
    write_manifest(store, written)
    with pytest.raises(StoreError, match=r"has labelled images of 2: 16x16x1 uint8 \(3 image\(s\) in g000, g001\); "
                                         r"24x24x1 uint8 \(1 image\(s\) in g002\)\. Ingest the images of one shape"):
        read_labelled(store)
    from flows.cli import main

    assert main(["train", "--store", store, "--out", str(tmp_path / "no.safetensors")]) == 2  # before any cluster
    err = capsys.readouterr().err
    assert err.startswith("segflow: error: training needs images of one shape") and err.count("\n") == 1, err
    # c0's mask refused at ingest: c0 is left out (so one shape remains), and the log says why
    write_manifest(store, [dict(r, mask_status="error", mask_error="StoreError: mask shape 20x20 differs")
                           if r["image_id"] == "c0" else r for r in written])
    import logging

    with caplog.at_level(logging.WARNING, logger="segcore"):
        images, labels, ids = read_labelled(store)
    assert ids == ["a0", "a1", "b0"] and images.shape == (3, 16, 16, 1) and labels.shape == (3, 16, 16)
    assert ("1 image(s) left out of training, their mask could not be used: c0 (StoreError: mask shape 20x20 "
            "differs)") in caplog.text
    write_manifest(store, [r for r in written if r["image_id"] != "c0"])
    from segcore.collection.imageio import read_image

    for i, name in enumerate(ids):
        source = tmp_path / f"b{ {'a': 0, 'b': 1}[name[0]]}" / "img" / f"{name}.png"
        np.testing.assert_array_equal(images[i, ..., 0], read_image(source)[..., 0])
    result = _train(store, tmp_path / "m.safetensors", epochs=1)
    assert sorted(load_checkpoint(result.checkpoint)[1].provenance["val_ids"] + ["a0", "a1"]) == ids
    # one shape but another pixel type (a 16-bit batch): refused too, not promoted without a word
    write_png(tmp_path / "b3" / "img" / "d0.png", rng.integers(0, 65535, (16, 16), dtype=np.uint16))
    write_png(tmp_path / "b3" / "gt" / "d0.png", np.ones((16, 16), np.uint8))
    rows3 = probe_sources(pair_sources(str(tmp_path / "b3" / "img"), str(tmp_path / "b3" / "gt")))
    g3, r3 = plan_groups([dict(x, batch=3) for x in rows3], chunk_pixels=4 * 256, max_chunk_images=4,
                         first_group=len(groups))
    from segcore.collection.incremental import append_groups

    append_groups(store, g3)
    more = [row for c in chunk_rows(r3, g3) for row in write_store_chunk(store, c)]
    write_manifest(store, [r for r in written if r["image_id"] != "c0"] + more)
    with pytest.raises(StoreError, match=r"of 2: 16x16x1 uint16 \(1 image\(s\) in g003\); 16x16x1 uint8 \(3 "):
        read_labelled(store)


def test_the_recipe_records_the_precision_that_ran(semantic_store, tmp_path):
    # bf16 asked for on the CPU: the CPU trains in fp32, and the checkpoint says so
    result = _train(semantic_store, tmp_path / "cpu.safetensors", epochs=1, device="cpu", precision="bf16")
    recipe = load_checkpoint(result.checkpoint)[1].provenance["recipe"]
    assert (recipe["device"], recipe["precision"]) == ("cpu", "fp32")


def test_an_out_that_cannot_be_a_checkpoint_file_is_refused_before_training(semantic_store, tmp_path):
    seen: list[dict] = []
    (tmp_path / "models").mkdir()
    for out, says in ((tmp_path / "models", "is a directory"), (tmp_path / "m.segflow", "names a directory record")):
        with pytest.raises(CheckpointError, match=f"{says}; a torch checkpoint is a file: give NAME.safetensors"):
            _train(semantic_store, out, on_epoch=seen.append)
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(CheckpointError, match="a-file is a file, so nothing can be made under it; give another path"):
        _train(semantic_store, tmp_path / "a-file" / "m.safetensors", on_epoch=seen.append)
    assert seen == [] and list((tmp_path / "models").iterdir()) == []


def test_an_existing_checkpoint_is_replaced_only_with_overwrite(semantic_store, tmp_path):
    seen: list[dict] = []
    out = tmp_path / "m.safetensors"
    first = _train(semantic_store, out, epochs=1)
    with pytest.raises(CheckpointError, match=r"m.safetensors' exists; give a new --out, or pass --overwrite"):
        _train(semantic_store, out, epochs=1, seed=1, on_epoch=seen.append)
    assert seen == [] and file_sha256(out) == first.sha256  # refused before any epoch; the model is kept
    second = _train(semantic_store, out, epochs=1, seed=1, overwrite=True)
    assert file_sha256(out) == second.sha256 != first.sha256


def test_instance_labels_train_a_unet_on_foreground(tmp_path):
    root = tmp_path / "inst"
    generate_collection(root, n_images=4, size=32, seed=1)
    store = _store(root, mask_kind="instance")
    result = _train(store, tmp_path / "fg.safetensors", epochs=1, val_fraction=0.25)
    _, meta = load_checkpoint(result.checkpoint)
    assert meta.class_names == ("background", "class_1")


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"model": "vit"}, "unknown model 'vit'"),
        ({"model": "maskrcnn_r18"}, "--mask-kind instance"),
        ({"crop_size": 16}, "crop_size applies to instance models only"),
        ({"val_fraction": 0.0, "refit": True}, r"refit \(--refit\) .* val_fraction 0 \(--val-fraction 0\)"),
        ({"val_fraction": 1.0}, r"val_fraction must lie in \[0, 1\): .* 0 for none"),
    ],
)
def test_refusals_say_what_to_do(semantic_store, tmp_path, change, match):
    out = tmp_path / "x.safetensors"
    with pytest.raises(ConfigError, match=match):
        _train(semantic_store, out, **change)
    assert not out.exists()


def test_epoch_line_lists_the_float_validation_scores():
    record = {"epoch": 2, "loss": 0.41234, "val_dice": {"a": 0.5}, "val_dice_mean_fg": 0.81249, "val_f1": None,
              "lr": 0.001, "seconds": 3.14}
    assert epoch_line(record, epochs=10) == "epoch 2/10: loss 0.4123, val_dice_mean_fg 0.812 (3.1 s)"
    record["val_dice"] = {"background": 0.99, "liver": 0.9123, "tumour": 0.7}
    assert epoch_line(record, epochs=10).startswith("epoch 2/10: loss 0.4123, val_dice liver 0.912/tumour 0.700, ")
    record["time_budget_spent"] = True
    assert epoch_line(record, epochs=10).endswith(" (3.1 s); time budget spent, stopping")


def test_init_fine_tunes_from_the_parent_and_records_its_sha256(semantic_store, tmp_path):
    parent = _train(semantic_store, tmp_path / "parent.safetensors")
    # lr 1e-12: the optimiser cannot move the weights, so the child's convolutions are the parent's.
    child = _train(semantic_store, tmp_path / "child.safetensors", init=parent.checkpoint, arch_kwargs=None,
                   epochs=1, lr=1e-12, normalisation=None)
    p_net, p_meta = load_checkpoint(parent.checkpoint)
    c_net, c_meta = load_checkpoint(child.checkpoint)
    assert c_meta.provenance["init"] == {"path": parent.checkpoint, "sha256": file_sha256(parent.checkpoint),
                                         "arch": "unet", "class_names": list(p_meta.class_names),
                                         "head_replaced": False}
    assert c_meta.class_names == p_meta.class_names and c_meta.normalisation == NORM  # the parent's
    assert c_meta.arch_kwargs == p_meta.arch_kwargs
    for name, value in p_net.state_dict().items():
        if name.endswith("weight") and value.ndim == 4:
            torch.testing.assert_close(c_net.state_dict()[name], value, rtol=0, atol=1e-6)


def test_init_with_other_classes_replaces_the_unet_head_only(semantic_store, tmp_path):
    parent = _train(semantic_store, tmp_path / "parent.safetensors")
    names = ("background", "disc", "square", "spare")
    child = _train(semantic_store, tmp_path / "child.safetensors", init=parent.checkpoint, arch_kwargs=None,
                   epochs=1, lr=1e-12, class_names=names)
    p_net, _ = load_checkpoint(parent.checkpoint)
    c_net, c_meta = load_checkpoint(child.checkpoint)
    assert c_meta.class_names == names and c_meta.provenance["init"]["head_replaced"] is True
    assert c_net.head.out_channels == 4 and p_net.head.out_channels == 3
    torch.testing.assert_close(c_net.down[0][0].weight, p_net.down[0][0].weight, rtol=0, atol=1e-6)


def test_init_refuses_another_architecture_and_architecture_options(semantic_store, tmp_path):
    parent = _train(semantic_store, tmp_path / "parent.safetensors")
    with pytest.raises(ConfigError, match="pass --model unet"):
        _train(semantic_store, tmp_path / "x.safetensors", init=parent.checkpoint, model="maskrcnn_r18",
               arch_kwargs=None)
    with pytest.raises(ConfigError, match="parent model's"):
        _train(semantic_store, tmp_path / "x.safetensors", init=parent.checkpoint, arch_kwargs={"base": 8})


def test_mask_rcnn_head_replacement_keeps_the_backbone():
    from segcore.models import create_model
    from segcore.training.init import replace_head

    net = create_model("maskrcnn_r18", in_channels=1, num_classes=2)
    before = {k: v.clone() for k, v in net.state_dict().items() if "backbone" in k}
    replace_head(net, arch="maskrcnn_r18", num_classes=3)
    heads = net.detector.roi_heads
    assert heads.box_predictor.cls_score.out_features == 3 and heads.box_predictor.bbox_pred.out_features == 12
    assert heads.mask_predictor.mask_fcn_logits.out_channels == 3 and net.num_classes == 3
    for k, v in before.items():
        torch.testing.assert_close(net.state_dict()[k], v, rtol=0, atol=0)


def test_val_fraction_0_trains_on_every_image_and_claims_no_validation(semantic_store, tmp_path):
    result = _train(semantic_store, tmp_path / "all.safetensors", val_fraction=0.0, val_split="group",
                    group_pattern=r"^(\w+)_")
    _, meta = load_checkpoint(result.checkpoint)
    p = meta.provenance
    assert (p["images"], p["n_train"], p["n_val"], p["val_ids"], p["best_epoch"]) == (6, 6, 0, [], None)
    assert (result.best_val_score, result.best_epoch, result.best_val) == (None, None, None)
    assert result.course == {"epochs": 2, "epochs_run": 2, "stopped_early": False, "time_budget_s": None,
                             "val_fraction": 0.0, "val_split": None, "n_train": 6, "n_val": 0}
    assert no_validation_note(dataclasses.asdict(result)) == (
        "no validation (val fraction 0): trained on all 6 images; the checkpoint holds the last epoch's weights "
        "(epoch 2 of 2), not a best epoch")
    assert epoch_line(result.history[0], epochs=2).startswith("epoch 1/2: loss ")
    assert "val" not in epoch_line(result.history[0], epochs=2)


def test_unet3d_trains_on_the_one_volume_of_a_store_without_validation(tmp_path):
    """A store of one labelled TIFF z-stack: refused with validation (nothing would be left to train
    on, and the message says what to do), trained on with val_fraction 0."""
    data = tmp_path / "data"
    generate_volume_collection(data, n_volumes=1, shape=(16, 16, 16), seed=2, file_format="tiff")
    store = str(tmp_path / "one.zarr")
    ingest_serially(IngestSpec(images=str(data / "images"), masks=str(data / "masks"), store=store))
    out = tmp_path / "u3.safetensors"
    common = dict(model="unet3d", class_names=VOLUME_CLASS_NAMES, arch_kwargs={"base": 4, "depth": 2}, epochs=2,
                  batch_size=2, patch_size=8)
    with pytest.raises(ConfigError, match=r"1 volume leaves none for training .* \(--val-fraction 0\) to train "
                                          r"on it without validation"):
        _train(store, out, val_fraction=0.15, **common)
    assert not out.exists()
    result = _train(store, out, val_fraction=0.0, **common)
    model, meta = load_checkpoint(out)
    assert (meta.arch, meta.input_axes) == ("unet3d", "bczyx")
    p = meta.provenance
    assert (p["images"], p["n_train"], p["n_val"], p["best_epoch"], p["val_dice"]) == (1, 1, 0, None, None)
    assert p["patch_size"] == [8, 8, 8] and len(result.history) == 2 and result.best_val_score is None
    assert no_validation_note(dataclasses.asdict(result)).startswith(
        "no validation (val fraction 0): trained on the one volume; the checkpoint holds the last epoch's weights")


def test_range_asked_for_images_that_are_not_8_bit_is_warned(tmp_path, caplog):
    import logging

    import zarr

    from segcore.training.from_store import _resolve_normalisation

    store = str(tmp_path / "s.zarr")
    zarr.open_group(store, mode="w")  # a store without a fingerprint: the images are looked at
    hu = np.array([[[[-1000.0], [40.0]], [[300.0], [1200.0]]]], dtype=np.float32)
    with caplog.at_level(logging.WARNING, logger="segcore"):
        norm, choice = _resolve_normalisation("range", store, hu)
    assert norm.mode == "range" and choice["reason"] == "given"
    assert "normalisation range divides by 255, for 8-bit images; these hold -1000..1200 (float32): auto would " \
           "pick ct" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="segcore"):
        _resolve_normalisation("range", store, np.full((1, 2, 2, 1), 200, np.uint8))
    assert "divides by 255" not in caplog.text
