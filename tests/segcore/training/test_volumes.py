"""Tests of volumetric semantic training (segcore.training.volumes) and of the pieces it shares
with the 2-D trainer: the loss on 5-D logits, the meta and checkpoint of a 3-D model, refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcore.errors import ConfigError
from segcore.metrics.dice import confusion_counts, dice_from_counts
from segcore.models import create_model
from segcore.models.checkpoint import load_checkpoint, read_meta, save_checkpoint
from segcore.models.predict import TorchPredictor, open_predictor
from segcore.normalise import Normalisation
from segcore.synthetic_volumes import VOLUME_CLASS_NAMES, make_volume_sample
from segcore.training.init import replace_head
from segcore.training.semantic import segmentation_loss
from segcore.training.settings import Recipe
from segcore.training.volumes import train_volumes

NORM = Normalisation(mode="range", scale=255.0)
TINY = {"base": 4, "depth": 2}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _volumes(n: int, *, seed: int, shape: tuple[int, int, int] = (16, 32, 32)) -> tuple[np.ndarray, np.ndarray]:
    pairs = [make_volume_sample(np.random.default_rng(s), shape=shape) for s in np.random.SeedSequence(seed).spawn(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def _train(volumes, masks, **overrides):
    kwargs = {"class_names": VOLUME_CLASS_NAMES, "arch_kwargs": TINY, "normalisation": NORM, "epochs": 1,
              "batch_size": 2, "patch_size": (8, 16, 16), "seed": 0}
    kwargs.update(overrides)
    return train_volumes(volumes, masks, **kwargs)


@pytest.fixture(scope="module")
def tiny_volumes():
    return _volumes(5, seed=0)


def test_the_loss_of_volumes_is_the_loss_of_their_stacked_slices():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 3, 4, 5, 6), torch.randint(0, 3, (2, 4, 5, 6))
    flat = segmentation_loss(logits.reshape(2, 3, 20, 6), target.reshape(2, 20, 6))
    torch.testing.assert_close(segmentation_loss(logits, target), flat)
    onehot = torch.nn.functional.one_hot(target, 3).movedim(-1, 1).float()
    assert float(segmentation_loss(onehot * 20.0, target)) < 0.01


def test_a_tiny_unet3d_learns_to_segment_held_out_volumes():
    """Loss falls and held-out Dice is far above chance after a few CPU seconds of training (90
    steps; measured: loss 1.99 -> 0.68, held-out Dice ellipsoid 0.48, box 0.49). Chance: labels
    drawn at random in the classes' proportions (about 4 % of the voxels each) score about 0.04
    per class; calling every object a box scores about 0.5 for boxes and 0 for ellipsoids."""
    volumes, masks = _volumes(12, seed=0, shape=(24, 40, 40))
    held_out, truth = _volumes(2, seed=1, shape=(24, 40, 40))
    model, meta, history = _train(volumes, masks, epochs=30, batch_size=2, patch_size=(16, 24, 24), lr=2e-2,
                                  val_fraction=0.25, recipe=Recipe(fg_fraction=0.5))
    losses = [r["loss"] for r in history]
    assert losses[-1] < 0.5 * losses[0], losses
    pred = TorchPredictor(model, meta, precision="fp32").labels(held_out[..., None], batch_size=1)
    tp, fp, fn = (c.sum(axis=0) for c in confusion_counts(pred.reshape(2, -1, 40), truth.reshape(2, -1, 40), 3))
    dice, _ = dice_from_counts(tp, fp, fn)
    assert dice[1:].min() > 0.2 and dice[1:].mean() > 0.3, dice


def test_meta_and_checkpoint_record_a_volumetric_model(tiny_volumes, tmp_path):
    volumes, masks = tiny_volumes
    model, meta, history = _train(volumes, masks, epochs=2)
    assert (meta.arch, meta.input_axes, meta.spatial_dims, meta.in_channels) == ("unet3d", "bczyx", 3, 1)
    p = meta.provenance
    assert p["trainer"] == "segcore.training.volumes.train_volumes" and p["patch_size"] == [8, 16, 16]
    assert "flip along z, y and x" in p["augmentation"] and "patch_size" not in p["recipe"]
    assert (p["n_train"], p["n_val"], p["epochs_run"]) == (4, 1, 2) and p["val_ids"][0].startswith("vol_")
    assert p["val_dice"] == max(history, key=lambda r: r["val_dice_mean_fg"])["val_dice"]
    path = save_checkpoint(tmp_path / "v.safetensors", model, meta)
    assert read_meta(path).input_axes == "bczyx"
    loaded, _ = load_checkpoint(path)
    direct = TorchPredictor(model, meta, precision="fp32").labels(volumes[:2, ..., None])
    assert direct.shape == (2, 16, 32, 32)
    np.testing.assert_array_equal(open_predictor(path, precision="fp32").labels(volumes[:2, ..., None]), direct)
    np.testing.assert_array_equal(TorchPredictor(loaded, meta, precision="fp32").labels(volumes[:2, ..., None]),
                                  direct)


def test_same_seed_gives_the_same_weights(tiny_volumes):
    volumes, masks = tiny_volumes
    a, _, ha = _train(volumes, masks)
    b, _, hb = _train(volumes, masks)
    c, _, _ = _train(volumes, masks, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and [r["loss"] for r in ha] == [r["loss"] for r in hb]
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_zscore_is_fitted_on_the_training_voxels(tiny_volumes):
    volumes, masks = tiny_volumes
    _, meta, _ = _train(volumes, masks, normalisation=Normalisation(mode="zscore"), val_fraction=0.2)
    train = np.delete(volumes, [int(v.split("_")[1]) for v in meta.provenance["val_ids"]], axis=0)
    assert meta.normalisation.mean == pytest.approx((float(train.mean()),))
    assert meta.normalisation.std == pytest.approx((float(train.std()),))


def test_fine_tuning_a_volumetric_model_with_new_classes_gets_a_new_3d_head():
    model = create_model("unet3d", in_channels=1, num_classes=3, **TINY)
    replace_head(model, arch="unet3d", num_classes=5)
    assert isinstance(model.head, torch.nn.Conv3d) and model.head.out_channels == 5
    assert model(torch.zeros(1, 1, 3, 5, 7)).shape == (1, 5, 3, 5, 7)


@pytest.mark.parametrize(("change", "match"), [
    ({"arch": "unet"}, r"trains on \(N, H, W, C\) images"),
    ({"arch": "maskrcnn"}, "not a registered semantic model"),
    ({"arch": "nope"}, "not a registered semantic model"),
    ({"masks": "short"}, r"masks must be \(N, D, H, W\) matching volumes"),
    ({"patch_size": (8, 16)}, "patch_size"),
    ({"patch_size": 0}, "patch_size"),
    ({"n": 1}, "at least 2 volumes"),
    ({"volumes": "2d"}, r"\(N, D, H, W, C\) or \(N, D, H, W\)"),
])
def test_bad_inputs_raise_config_error(tiny_volumes, change, match):
    volumes, masks = tiny_volumes
    change = dict(change)
    if change.pop("masks", None) == "short":
        masks = masks[:, :-1]
    n = change.pop("n", None)
    if n is not None:
        volumes, masks = volumes[:n], masks[:n]
    if change.pop("volumes", None) == "2d":
        volumes = volumes[:, 0]
    with pytest.raises(ConfigError, match=match):
        _train(volumes, masks, **change)


def test_one_volume_is_refused_with_advice_that_helps() -> None:
    from segcore.training.inputs import check_semantic_inputs

    volume, labels = np.zeros((1, 4, 8, 8, 1), np.float32), np.zeros((1, 4, 8, 8), np.int64)
    with pytest.raises(ConfigError, match=r"1 volume leaves none for training .* give at least 2 volumes, or "
                                          r"a validation fraction of 0 \(--val-fraction 0\) to train on it "
                                          r"without validation"):
        check_semantic_inputs(volume, labels, class_names=("background", "a"), arch_kwargs={}, epochs=1, batch_size=1,
                              lr=1e-3, val_fraction=0.01, time_budget_s=None, noun="volume")
    assert check_semantic_inputs(volume, labels, class_names=("background", "a"), arch_kwargs={}, epochs=1,
                                 batch_size=1, lr=1e-3, val_fraction=0.0, time_budget_s=None, noun="volume") == (1, 0)


def test_one_volume_trains_without_validation_and_keeps_the_last_epoch(tiny_volumes):
    volumes, masks = tiny_volumes
    model, meta, history = _train(volumes[:1], masks[:1], epochs=2, val_fraction=0.0)
    p = meta.provenance
    assert (meta.input_axes, p["n_train"], p["n_val"], p["val_ids"], p["epochs_run"]) == ("bczyx", 1, 0, [], 2)
    assert (p["best_epoch"], p["val_dice"], p["val_dice_mean_fg"]) == (None, None, None)
    assert p["largest_region"] == {"choice": "auto", "kept": False, "reason": "volumetric model"}
    assert [set(r) & {"val_dice", "val_dice_mean_fg"} for r in history] == [set(), set()]
    pred = TorchPredictor(model, meta, precision="fp32").labels(volumes[:1, ..., None])
    assert pred.shape == (1, 16, 32, 32)


@pytest.mark.parametrize("floor, patches", [(0, 1), (6, 6)])
def test_an_epoch_of_one_volume_draws_a_patch_or_the_floor(tiny_volumes, monkeypatch, floor, patches):
    import segcore.training.volumes as volumes_module

    drawn = []
    real = volumes_module.flip_axes
    monkeypatch.setattr(volumes_module, "flip_axes", lambda x, y, rng: drawn.append(len(x)) or real(x, y, rng))
    volumes, masks = tiny_volumes
    _, meta, _ = _train(volumes[:1], masks[:1], epochs=2, val_fraction=0.0, recipe=Recipe(min_epoch_patches=floor))
    assert sum(drawn) == 2 * patches and meta.provenance["recipe"]["min_epoch_patches"] == floor
