"""Tests of the window/zscore/ct schemes on hand-computed values, their fitting, the choice of
``auto`` from a fingerprint, degenerate data (no NaN), and train == inference bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segcore.collection.imageio import read_image, read_mask
from segcore.errors import ConfigError
from segcore.models.checkpoint import load_checkpoint, save_checkpoint
from segcore.models.predict import TorchPredictor
from segcore.normalise import Normalisation, normalise_batch
from segcore.normalise_fit import (choose_normalisation, fit_normalisation, parse_given_normalisation,
                                  parse_normalisation)

CT = Path(__file__).resolve().parents[1] / "data" / "ct-liver"


def _nhwc(values: list, dtype: str = "float32") -> np.ndarray:
    return np.asarray(values, dtype=dtype)[None, :, :, None]


def test_window_clips_and_maps_to_0_1_by_hand() -> None:
    norm = parse_normalisation("window:-100,300")
    out = normalise_batch(_nhwc([[-1000, -100], [100, 2000]]), norm)
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 0.0], [0.5, 1.0]]))


def test_window_presets_are_level_and_width() -> None:
    norm = parse_normalisation("window:abdomen")  # W400 L40
    assert (norm.mode, norm.window, norm.preset) == ("window", (-160.0, 240.0), "abdomen")
    assert parse_normalisation("window:lung").window == (-1350.0, 150.0)  # W1500 L-600


def test_a_model_from_elsewhere_declares_its_fitted_values_by_hand() -> None:
    ct = parse_given_normalisation("ct:-20,180,90,50")
    assert (ct.clip_low, ct.clip_high, ct.mean, ct.std) == ((-20.0,), (180.0,), (90.0,), (50.0,)) and ct.fitted
    out = normalise_batch(_nhwc([[-1000, 40], [140, 3000]]), ct)[0, 0]  # clip to -20..180, then (x - 90) / 50
    torch.testing.assert_close(out, torch.tensor([[-2.2, -1.0], [1.0, 1.8]]))
    z = parse_given_normalisation("zscore:10,4", channels=2)
    assert (z.mean, z.std) == ((10.0, 10.0), (4.0, 4.0))
    torch.testing.assert_close(normalise_batch(np.array([[[[2.0, 18.0]]]], dtype=np.float32), z).flatten(),
                               torch.tensor([-2.0, 2.0]))
    assert parse_given_normalisation("window:abdomen") == parse_normalisation("window:abdomen")
    assert parse_given_normalisation("imagenet").mean == (0.485, 0.456, 0.406)
    for bad, why in [("ct", "not one a model from elsewhere"), ("auto", "not one"), ("zscore", "not one"),
                     ("ct:1,2,3", "ct:LO,HI,MEAN,STD"), ("ct:5,1,0,1", "LO < HI"), ("zscore:0,0", "STD must be > 0"),
                     ("zscore:a,b", "zscore:MEAN,STD"), ("window:3,1", "neither LO,HI")]:
        with pytest.raises(ConfigError, match=why):
            parse_given_normalisation(bad)


def test_zscore_fits_the_dataset_mean_and_std_by_hand() -> None:
    images = np.array([[[[0.0], [2.0]]], [[[4.0], [6.0]]]], dtype=np.float32)  # (2, 1, 2, 1): 0, 2, 4, 6
    norm = fit_normalisation(Normalisation(mode="zscore"), images)
    assert norm.mean == (3.0,) and norm.std == pytest.approx((5.0**0.5,))  # var = (9+1+1+9)/4
    out = normalise_batch(images, norm)
    torch.testing.assert_close(out.flatten(), torch.tensor([-3.0, -1.0, 1.0, 3.0]) / 5.0**0.5)


def test_ct_fits_on_foreground_clips_to_its_percentiles_then_z_scores() -> None:
    # Foreground values 0, 10, 20, 30 (mean 15, std sqrt(125)); background -1000 and 1000 are left out.
    image = _nhwc([[-1000, 0, 10], [20, 30, 1000]])
    mask = np.array([[[0, 1, 1], [2, 1, 0]]])
    norm = fit_normalisation(Normalisation(mode="ct"), image, mask)
    # np.percentile, linear: 0.5th at position 0.015 -> 0.15; 99.5th at position 2.985 -> 29.85.
    assert norm.clip_low == pytest.approx((0.15,)) and norm.clip_high == pytest.approx((29.85,))
    assert norm.mean == (15.0,) and norm.std == pytest.approx((125.0**0.5,))
    out = normalise_batch(image, norm)[0, 0]
    expected = (torch.tensor([[0.15, 0.15, 10.0], [20.0, 29.85, 29.85]]) - 15.0) / 125.0**0.5
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("choice", ["percentile", "range", "window:0,1", "zscore", "ct"])
def test_constant_images_never_give_nan(choice: str) -> None:
    images = np.full((2, 3, 3, 1), 7.0, dtype=np.float32)
    norm = fit_normalisation(parse_normalisation(choice), images, np.ones((2, 3, 3), dtype=np.int64))
    out = normalise_batch(images, norm)
    assert torch.isfinite(out).all()
    if choice in ("zscore", "ct"):  # std 0 is replaced by 1: constant data normalise to 0
        assert norm.std == (1.0,)
        torch.testing.assert_close(out, torch.zeros_like(out))


def test_ct_without_foreground_fits_on_every_pixel() -> None:
    images = np.array([[[[1.0], [3.0]]]], dtype=np.float32)
    norm = fit_normalisation(Normalisation(mode="ct"), images, np.zeros((1, 1, 2), dtype=np.int64))
    assert norm.mean == (2.0,) and norm.std == (1.0,)
    assert torch.isfinite(normalise_batch(images, norm)).all()


def test_unfitted_schemes_refuse_to_normalise() -> None:
    with pytest.raises(ConfigError, match="fit"):
        normalise_batch(_nhwc([[1.0]]), Normalisation(mode="ct"))


@pytest.mark.parametrize("text", ["window:300,-100", "window:nope", "minmax", "window:-inf,inf", "window:0,inf"])
def test_bad_choices_name_the_valid_ones(text: str) -> None:
    with pytest.raises(ConfigError, match="window"):
        parse_normalisation(text)


@pytest.mark.parametrize(
    "fingerprint, mode",
    [
        ({"dtype": "float32", "channels": 1, "min": -1024.0, "max": 1500.0, "negative": True}, "ct"),
        ({"dtype": "int16", "channels": 1, "min": -3.0, "max": 5.0, "negative": True}, "zscore"),
        ({"dtype": "uint16", "channels": 1, "min": 0.0, "max": 4000.0, "negative": False}, "percentile"),
        ({"dtype": "float32", "channels": 3, "min": -1024.0, "max": 1500.0, "negative": True}, "zscore"),
        (None, "percentile"),
    ],
)
def test_auto_picks_from_the_fingerprint_and_says_why(fingerprint, mode) -> None:
    norm, reason = choose_normalisation(fingerprint)
    assert norm.mode == mode and mode in reason


def test_train_and_inference_normalise_bit_for_bit(tmp_path) -> None:
    """The ct scheme fitted on real CT slices, stored in a checkpoint and read back, gives the very
    tensor the training-time object gives."""
    from segcore.training.semantic import train_semantic

    ids = sorted(p.stem for p in (CT / "images").glob("*.tif"))
    images = np.stack([read_image(CT / "images" / f"{i}.tif") for i in ids])
    masks = np.stack([read_mask(CT / "masks" / f"{i}.tif") for i in ids]).astype(np.int64)
    model, meta, _ = train_semantic(images, masks, class_names=("background", "liver", "tumour"),
                                    arch_kwargs={"base": 4, "depth": 2}, normalisation=Normalisation(mode="ct"),
                                    epochs=1, batch_size=2, val_fraction=0.25, ids=ids, val_split="tail")
    fitted_here = fit_normalisation(Normalisation(mode="ct"), images[:3], masks[:3])  # the tail split's training part
    assert meta.normalisation == fitted_here
    _, loaded = load_checkpoint(save_checkpoint(tmp_path / "ct.safetensors", model, meta))
    at_inference = TorchPredictor(model, loaded).prepare(images)
    assert torch.equal(at_inference, normalise_batch(images, fitted_here))
