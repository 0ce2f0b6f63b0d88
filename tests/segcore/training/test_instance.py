"""Tests of Mask R-CNN training on in-memory instance label images."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segcore.models.checkpoint import load_checkpoint, save_checkpoint
from segcore.errors import ConfigError
from segcore.collection.imageio import read_image, read_mask
from segcore.models.instances import targets_from_instance_labels
from segcore.models.predict import TorchPredictor
from segcore.normalise import Normalisation
from segcore.synthetic import INSTANCE_CLASS_NAMES, generate_instance_collection, make_instance_sample
from segcore.training.instance import (
    DEMO_INSTANCE_ARCH,
    DEMO_INSTANCE_ARCH_KWARGS,
    DEMO_INSTANCE_BATCH_SIZE,
    DEMO_INSTANCE_EPOCHS,
    DEMO_INSTANCE_IMAGE_SIZE,
    DEMO_INSTANCE_LR,
    DEMO_INSTANCE_N_IMAGES,
    DEMO_INSTANCE_N_TRAIN,
    DEMO_INSTANCE_NORMALISATION,
    DEMO_INSTANCE_TIME_BUDGET_S,
    augment_instance_sample,
    evaluate_instances,
    pooled_instance_scores,
    train_instance,
)

NORM = Normalisation(mode="range", scale=255.0)
# Few detections and samples keep an untrained model's steps and validation quick.
TINY_ARCH = {"box_detections_per_img": 5}
TINY_SAMPLING = {"proposals_per_image": 32, "rois_per_image": 8}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(n: int, *, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    pairs = [make_instance_sample(rng, size=size) for _ in range(n)]
    return np.stack([p[0] for p in pairs])[..., None], np.stack([p[1] for p in pairs])


def _train(images, labels, **overrides):
    kwargs = {
        "class_names": INSTANCE_CLASS_NAMES,
        "arch_kwargs": TINY_ARCH,
        "normalisation": NORM,
        "epochs": 1,
        "batch_size": 2,
        "val_fraction": 0.34,
        "seed": 0,
        **TINY_SAMPLING,
    }
    kwargs.update(overrides)
    return train_instance(images, labels, **kwargs)


@pytest.fixture(scope="module")
def tiny_data():
    return _data(3)


@pytest.fixture(scope="module")
def tiny_run(tiny_data):
    torch.set_num_threads(1)
    seen: list[dict] = []
    model, meta, history = _train(*tiny_data, progress=seen.append)
    return model, meta, history, seen


# -- augmentation and targets ---------------------------------------------------------------


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), crop=st.sampled_from([None, 24, 40]))
def test_augmentation_moves_image_and_labels_alike(seed, crop):
    """The image is a copy of the labels, so every view must keep them equal; rot90 and flip keep
    each object's area, a crop keeps a window of the original."""
    _, labels = make_instance_sample(np.random.default_rng(1), size=48)
    y = torch.from_numpy(labels.astype(np.int64))
    x = torch.stack([y.float(), -y.float()])
    ax, ay = augment_instance_sample(x, y, np.random.default_rng(seed), crop_size=crop)
    side = 48 if crop is None else crop
    assert ax.shape == (2, side, side) and ay.shape == (side, side)
    torch.testing.assert_close(ax[0], ay.float())
    torch.testing.assert_close(ax[1], -ay.float())
    if crop is None:
        np.testing.assert_array_equal(np.bincount(ay.numpy().ravel(), minlength=labels.max() + 1),
                                      np.bincount(labels.ravel(), minlength=labels.max() + 1))


def test_augmentation_is_a_function_of_the_generator_state():
    y = torch.arange(64 * 64).reshape(64, 64)
    x = y[None].float()
    a = augment_instance_sample(x, y, np.random.default_rng(3), crop_size=32)
    b = augment_instance_sample(x, y, np.random.default_rng(3), crop_size=32)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_non_square_images_are_only_flipped_or_turned_half_way():
    y = torch.arange(4 * 6).reshape(4, 6)
    shapes = {tuple(augment_instance_sample(y[None].float(), y, np.random.default_rng(s))[1].shape)
              for s in range(20)}
    assert shapes == {(4, 6)}


def test_targets_of_a_flipped_image_are_the_flipped_targets():
    labels = np.zeros((6, 8), dtype=np.uint16)
    labels[1:3, 0:3] = 4  # box (0, 1, 3, 3)
    labels[2:6, 5:7] = 9  # box (5, 2, 7, 6)
    base = targets_from_instance_labels(labels)
    np.testing.assert_array_equal(base["boxes"].numpy(), [[0, 1, 3, 3], [5, 2, 7, 6]])
    width, height = 8, 6

    flipped = targets_from_instance_labels(np.ascontiguousarray(labels[:, ::-1]))
    x0, y0, x1, y1 = base["boxes"].unbind(1)
    torch.testing.assert_close(flipped["boxes"], torch.stack([width - x1, y0, width - x0, y1], 1))
    assert torch.equal(flipped["masks"], base["masks"].flip(-1))
    assert torch.equal(flipped["labels"], base["labels"])

    # rot90 (counter-clockwise): row i of the result is column W-1-i of the original.
    turned = targets_from_instance_labels(np.ascontiguousarray(np.rot90(labels)))
    torch.testing.assert_close(turned["boxes"], torch.stack([y0, width - x1, y1, width - x0], 1))
    assert torch.equal(turned["masks"], torch.rot90(base["masks"], 1, dims=(-2, -1)))
    assert turned["masks"].shape[1:] == (width, height)


# -- pooled scores ----------------------------------------------------------------------------


def test_pooled_scores_by_hand():
    gt1 = np.zeros((4, 6), dtype=np.uint16)
    gt1[0:2, 0:2], gt1[2:4, 4:6] = 3, 8
    pred1 = np.zeros((4, 6), dtype=np.uint32)
    pred1[0:2, 0:2] = 1  # matches object 3 exactly; object 8 is missed
    gt2 = np.zeros((4, 6), dtype=np.uint16)
    pred2 = np.zeros((4, 6), dtype=np.uint32)
    pred2[1:3, 1:3] = 1  # a false positive on an empty image
    s = pooled_instance_scores([pred1, pred2], [gt1, gt2], scores=[{1: 0.9}, {1: 0.8}])
    assert (s["n_images"], s["tp"], s["fp"], s["fn"]) == (2, 1, 1, 1)
    assert (s["precision"], s["recall"], s["f1"], s["pq"]) == (0.5, 0.5, 0.5, 0.5)
    # Image 1 only (image 2 has no ground truth): precision 1 up to recall 0.5 = 51 of 101 points.
    assert s["ap"] == pytest.approx(51 / 101)
    assert s["dice_fg"] == pytest.approx(2 * 4 / (4 + 8 + 4 + 0))


def test_pooled_scores_of_nothing_against_nothing_are_perfect():
    empty = np.zeros((3, 3), dtype=np.uint16)
    s = pooled_instance_scores([empty], [empty])
    assert (s["f1"], s["pq"], s["dice_fg"], s["precision"], s["recall"]) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert math.isnan(s["ap"])
    with pytest.raises(ConfigError, match="one of each"):
        pooled_instance_scores([empty], [empty, empty])


def test_pooled_scores_of_no_detections_are_zero():
    gt = np.zeros((4, 4), dtype=np.uint16)
    gt[1:3, 1:3] = 2
    s = pooled_instance_scores([np.zeros_like(gt)], [gt])
    assert (s["tp"], s["fp"], s["fn"], s["precision"], s["recall"], s["f1"], s["pq"]) == (0, 0, 1, 0.0, 0.0, 0.0, 0.0)


# -- training ---------------------------------------------------------------------------------


def test_same_seed_gives_the_same_weights_and_history(tiny_data, tiny_run):
    m1, meta1, h1, _ = tiny_run
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    m2, meta2, h2 = _train(*tiny_data)
    assert torch.equal(torch.rand(3), expected)  # the global torch random state is left alone
    m3, _, _ = _train(*tiny_data, seed=1)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)
    assert [r["losses"] for r in h1] == [r["losses"] for r in h2]
    assert meta1.provenance["val_scores"] == meta2.provenance["val_scores"]


def test_history_record_progress_and_meta(tiny_run):
    model, meta, history, seen = tiny_run
    assert seen == history and [r["epoch"] for r in history] == [1]
    record = history[0]
    assert set(record) == {"epoch", "loss", "losses", "val_f1", "val_precision", "val_recall", "val_ap", "val_pq",
                           "val_dice_fg", "lr", "seconds", "elapsed_s"}
    assert set(record["losses"]) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness",
                                     "loss_rpn_box_reg"}
    assert np.isfinite(record["loss"]) and record["seconds"] > 0
    assert 0.0 <= record["val_f1"] <= 1.0 and 0.0 <= record["val_dice_fg"] <= 1.0
    assert not model.training
    assert (meta.arch, meta.in_channels, meta.class_names) == ("maskrcnn_r18", 1, INSTANCE_CLASS_NAMES)
    assert meta.arch_kwargs == TINY_ARCH and meta.normalisation == NORM and meta.kind == "instance"
    p = meta.provenance
    assert (p["n_train"], p["n_val"], p["epochs_run"], p["best_epoch"], p["stopped_early"]) == (2, 1, 1, 1, False)
    assert (p["proposals_per_image"], p["rois_per_image"]) == (32, 8)
    assert p["val_scores"]["f1"] == record["val_f1"]
    assert p["torch_threads"] == 1 and p["seconds"] > 0
    assert (p["device"], p["precision"], p["optimiser"]) == ("cpu", "fp32", "AdamW(weight_decay=1e-4), onecycle")


def test_returned_model_reproduces_its_validation_scores_after_a_checkpoint_round_trip(tiny_data, tiny_run, tmp_path):
    model, meta, _, _ = tiny_run
    images, labels = tiny_data
    val_idx = np.sort(np.random.default_rng(0).permutation(len(images))[:1])
    loaded, _ = load_checkpoint(save_checkpoint(tmp_path / "m.safetensors", model, meta))
    again = evaluate_instances(TorchPredictor(loaded, meta), images[val_idx], labels[val_idx])
    assert again == pytest.approx(meta.provenance["val_scores"], nan_ok=True)


def test_crops_classes_and_no_validation(tiny_data):
    images, labels = tiny_data
    classes = [{int(i): 2 for i in np.unique(lab) if i} for lab in labels]
    model, meta, history = _train(images, labels, crop_size=32, class_names=("background", "a", "b"),
                                  instance_classes=classes, val_fraction=0.0, epochs=1)
    p = meta.provenance
    assert p["crops_per_image"] == 4 and p["crop_size"] == 32
    assert (p["n_train"], p["n_val"], p["best_epoch"]) == (3, 0, 1)
    assert history[0]["val_f1"] is None
    assert meta.num_classes == 3 and model.num_classes == 3


def test_time_budget_stops_after_the_current_epoch(tiny_data):
    _, meta, history = _train(*tiny_data, epochs=3, time_budget_s=1e-6)
    assert len(history) == 1
    assert (meta.provenance["stopped_early"], meta.provenance["epochs_run"]) == (True, 1)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"labels": "short"}, "matching images"),
        ({"labels": "float"}, "integer instance ids"),
        ({"labels": "negative"}, "negative"),
        ({"arch": "unet"}, "not an instance segmenter"),
        ({"class_names": ("background",)}, "at least one class"),
        ({"instance_classes": "short"}, "one id -> class mapping per image"),
        ({"instance_classes": "class5"}, r"\[1, 2\)"),
        ({"instance_classes": "missing"}, "has no class for instance id"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"val_fraction": -0.1}, "val_fraction"),
        ({"n": 1}, "leave none for training"),
        ({"epochs": 0}, "epochs"),
        ({"batch_size": 1.5}, "batch_size"),
        ({"crop_size": 65}, "crop_size 65 exceeds"),
        ({"crop_size": 0}, "crop_size"),
        ({"lr": float("nan")}, "lr"),
        ({"time_budget_s": 0.0}, "time_budget_s"),
        ({"rois_per_image": 0}, "rois_per_image"),
        ({"arch_kwargs": {"num_classes": 5}}, "num_classes"),
        ({"images": "5d"}, r"\(N, H, W, C\)"),
    ],
)
def test_bad_inputs_raise_config_error(tiny_data, change, match):
    images, labels = tiny_data
    change = dict(change)
    n = change.pop("n", None)
    if n is not None:
        images, labels = images[:n], labels[:n]
    kind = change.pop("labels", None)
    if kind == "short":
        labels = labels[:, :-1]
    elif kind == "float":
        labels = labels.astype(np.float32)
    elif kind == "negative":
        labels = labels.astype(np.int32)
        labels[0, 0, 0] = -1
    classes = change.pop("instance_classes", None)
    full = [{int(i): 1 for i in np.unique(lab) if i} for lab in labels]
    if classes == "short":
        change["instance_classes"] = full[:1]
    elif classes == "class5":
        change["instance_classes"] = [{k: 5 for k in m} for m in full]
    elif classes == "missing":
        change["instance_classes"] = [dict(list(m.items())[1:]) for m in full]
    if change.pop("images", None) == "5d":
        images = images[..., None]
    with pytest.raises(ConfigError, match=match):
        _train(images, labels, **change)


def test_demo_settings_are_consistent():
    assert 0 < DEMO_INSTANCE_N_TRAIN < DEMO_INSTANCE_N_IMAGES
    assert DEMO_INSTANCE_N_IMAGES - DEMO_INSTANCE_N_TRAIN >= 50
    assert DEMO_INSTANCE_NORMALISATION.mode == "range"
    assert DEMO_INSTANCE_TIME_BUDGET_S <= 600
    with pytest.raises(TypeError):
        DEMO_INSTANCE_ARCH_KWARGS["score_threshold"] = 0.1  # read-only for every caller


@pytest.mark.slow
def test_demo_defaults_reach_the_held_out_f1_bar(tmp_path):
    """The demo's recipe on 2 threads: write the instance collection, train on the first
    DEMO_INSTANCE_N_TRAIN images, segment the rest and score them (a few minutes on 2 CPU cores)."""
    root = tmp_path / "demo"
    ids = generate_instance_collection(root, n_images=DEMO_INSTANCE_N_IMAGES, size=DEMO_INSTANCE_IMAGE_SIZE, seed=0)
    images = np.stack([read_image(root / "images" / f"{i}.png") for i in ids])
    labels = np.stack([read_mask(root / "masks" / f"{i}.png") for i in ids])
    model, meta, _ = train_instance(
        images[:DEMO_INSTANCE_N_TRAIN],
        labels[:DEMO_INSTANCE_N_TRAIN],
        arch=DEMO_INSTANCE_ARCH,
        arch_kwargs=DEMO_INSTANCE_ARCH_KWARGS,
        class_names=INSTANCE_CLASS_NAMES,
        normalisation=DEMO_INSTANCE_NORMALISATION,
        epochs=DEMO_INSTANCE_EPOCHS,
        batch_size=DEMO_INSTANCE_BATCH_SIZE,
        lr=DEMO_INSTANCE_LR,
        seed=0,
        time_budget_s=DEMO_INSTANCE_TIME_BUDGET_S,
    )
    scores = evaluate_instances(TorchPredictor(model.eval(), meta), images[DEMO_INSTANCE_N_TRAIN:],
                                labels[DEMO_INSTANCE_N_TRAIN:])
    assert scores["f1"] >= 0.85, scores
