"""Tests for segcore.normalise: percentile/range modes and mean/std by hand on tiny arrays,
layout (N, H, W, C) -> float32 (N, C, H, W) and (N, D, H, W, C) -> (N, C, D, H, W), and validation
of the description."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from pydantic import ValidationError

from segcore.normalise import Normalisation, normalise_batch


def _nhwc(values: list, dtype: str = "uint8") -> np.ndarray:
    """(H, W) nested list -> (1, H, W, 1) array."""
    return np.asarray(values, dtype=dtype)[None, :, :, None]


def test_range_mode_by_hand() -> None:
    out = normalise_batch(_nhwc([[0, 51], [102, 255]]), Normalisation(mode="range", scale=255.0))
    assert out.shape == (1, 1, 2, 2) and out.dtype == torch.float32
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 0.2], [0.4, 1.0]]))


def test_range_mode_16_bit() -> None:
    out = normalise_batch(_nhwc([[0, 65535], [4096, 1]], "uint16"), Normalisation(mode="range", scale=4096.0))
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 65535 / 4096], [1.0, 1 / 4096]]))


def test_percentile_min_max_by_hand() -> None:
    out = normalise_batch(_nhwc([[10, 20], [30, 50]]), Normalisation(low=0.0, high=100.0))
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 0.25], [0.5, 1.0]]))


def test_percentile_interpolates_by_hand() -> None:
    # Sorted 10, 20, 30, 50: p25 at position 0.75 -> 17.5; p75 at position 2.25 -> 35; span 17.5.
    out = normalise_batch(_nhwc([[10, 20], [30, 50]]), Normalisation(low=25.0, high=75.0))
    expected = torch.tensor([[-3 / 7, 1 / 7], [5 / 7, 13 / 7]])
    torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-6)


def test_percentile_is_per_image_and_per_channel() -> None:
    images = np.zeros((2, 1, 2, 2), dtype=np.uint16)
    images[0, 0, :, 0] = [0, 100]
    images[0, 0, :, 1] = [1000, 3000]
    images[1, 0, :, 0] = [5, 7]
    images[1, 0, :, 1] = [60000, 60004]
    out = normalise_batch(images, Normalisation(low=0.0, high=100.0))
    assert out.shape == (2, 2, 1, 2)
    expected = torch.tensor([[0.0, 1.0]]).expand(2, 2, 1, 2)
    torch.testing.assert_close(out, expected)


def test_constant_image_gives_finite_zeros() -> None:
    out = normalise_batch(np.full((1, 3, 3, 2), 42, dtype=np.uint8), Normalisation())
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.zeros(1, 2, 3, 3))


def test_mean_std_by_hand() -> None:
    images = np.array([[[[1.0, 2.0], [3.0, 10.0]]]], dtype=np.float32)  # (1, 1, 2, 2): two channels
    norm = Normalisation(mode="range", scale=1.0, mean=(1.0, 2.0), std=(2.0, 4.0))
    out = normalise_batch(images, norm)
    assert out.shape == (1, 2, 1, 2)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.0, 1.0]))  # (1-1)/2, (3-1)/2
    torch.testing.assert_close(out[0, 1, 0], torch.tensor([0.0, 2.0]))  # (2-2)/4, (10-2)/4


def test_mean_std_after_percentile() -> None:
    norm = Normalisation(low=0.0, high=100.0, mean=(0.5,), std=(0.25,))
    out = normalise_batch(_nhwc([[10, 20], [30, 50]]), norm)
    torch.testing.assert_close(out[0, 0], torch.tensor([[-2.0, -1.0], [0.0, 2.0]]))


@pytest.mark.parametrize("dtype", ["uint8", "uint16", "int32", "float32", "float64"])
def test_layout_is_nchw_float32_contiguous(dtype: str) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 200, size=(2, 3, 5, 4)).astype(dtype)  # (N, H, W, C)
    before = images.copy()
    out = normalise_batch(images, Normalisation(mode="range", scale=1.0))
    assert out.shape == (2, 4, 3, 5)
    assert out.dtype == torch.float32
    assert out.is_contiguous()
    for n, h, w, c in [(0, 0, 0, 0), (1, 2, 4, 3), (0, 1, 3, 2), (1, 0, 2, 1)]:
        assert out[n, c, h, w].item() == float(images[n, h, w, c])
    np.testing.assert_array_equal(images, before)  # the caller's array is not modified


def test_non_contiguous_input() -> None:
    base = np.arange(2 * 4 * 6 * 2, dtype=np.uint8).reshape(2, 4, 6, 2)
    view = base[:, ::2, ::3, :]
    out = normalise_batch(view, Normalisation(mode="range", scale=1.0))
    torch.testing.assert_close(out, torch.from_numpy(np.ascontiguousarray(view)).float().permute(0, 3, 1, 2))


@pytest.mark.parametrize("shape", [(4, 4), (1, 4, 4), (1, 1, 1, 4, 4, 1)])
def test_wrong_rank_is_refused(shape: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match=r"\(N, H, W, C\)"):
        normalise_batch(np.zeros(shape, np.uint8), Normalisation())


def test_volume_percentiles_are_those_of_the_whole_volume_by_hand() -> None:
    # Slice 0 holds 0..3, slice 1 holds 4..7: min 0 and max 7 of the volume, not of each slice.
    volume = np.arange(8, dtype=np.uint8).reshape(1, 2, 2, 2, 1)
    out = normalise_batch(volume, Normalisation(low=0.0, high=100.0))
    assert out.shape == (1, 1, 2, 2, 2) and out.dtype == torch.float32
    torch.testing.assert_close(out[0, 0], torch.arange(8.0).reshape(2, 2, 2) / 7.0)


@pytest.mark.parametrize("norm", [
    Normalisation(), Normalisation(mode="range", scale=255.0, mean=(0.5, 0.1), std=(0.2, 2.0)),
    Normalisation(mode="window", window=(20.0, 200.0)),
    Normalisation(mode="steps", steps=({"op": "scale_range", "low": 5.0, "high": 95.0},
                                       {"op": "zero_mean_unit_variance", "per_channel": False})),
])
def test_a_volume_is_normalised_as_the_image_of_its_stacked_slices(norm: Normalisation) -> None:
    volumes = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 5, 2), dtype=np.uint8)
    out = normalise_batch(volumes, norm)
    assert out.shape == (2, 2, 3, 4, 5) and out.is_contiguous()
    stacked = normalise_batch(volumes.reshape(2, 12, 5, 2), norm)
    torch.testing.assert_close(out, stacked.reshape(2, 2, 3, 4, 5))
    torch.testing.assert_close(out[1:], normalise_batch(volumes[1:], norm))  # per volume, not per batch


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"low": 50.0, "high": 50.0}, "low < high"),
        ({"low": 60.0, "high": 40.0}, "low < high"),
        ({"low": -1.0}, "low < high"),
        ({"high": 100.5}, "low < high"),
        ({"mode": "range", "scale": 0.0}, "scale must be > 0"),
        ({"mode": "range", "scale": -255.0}, "scale must be > 0"),
        ({"mean": (0.5,)}, "both mean and std"),
        ({"std": (0.5,)}, "both mean and std"),
        ({"mean": (0.5, 0.5), "std": (0.5, 0.0)}, "std values must be > 0"),
        ({"mode": "minmax"}, "mode"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_invalid_descriptions_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=message) as info:
        Normalisation(**kwargs)
    assert isinstance(info.value, ValueError)


def test_description_is_frozen_and_round_trips_json() -> None:
    norm = Normalisation(mode="range", scale=4095.0, mean=(0.1, 0.2), std=(1.0, 2.0))
    with pytest.raises(ValidationError):
        norm.scale = 1.0  # type: ignore[misc]
    assert Normalisation.model_validate_json(norm.model_dump_json()) == norm
    assert Normalisation() == Normalisation(mode="percentile", low=1.0, high=99.8)


@settings(max_examples=60, deadline=None, database=None)
@given(hnp.arrays(np.uint16, st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(1, 3))))
def test_min_max_percentile_stays_in_unit_interval(images: np.ndarray) -> None:
    out = normalise_batch(images, Normalisation(low=0.0, high=100.0)).numpy()
    assert out.shape == (images.shape[0], images.shape[3], images.shape[1], images.shape[2])
    assert np.all(out >= -1e-6) and np.all(out <= 1 + 1e-6)
    flat = out.reshape(out.shape[0], out.shape[1], -1)
    varied = np.ptp(images.reshape(images.shape[0], -1, images.shape[3]), axis=1) > 0  # (N, C)
    np.testing.assert_allclose(flat.min(axis=2)[varied], 0.0, atol=1e-6)
    np.testing.assert_allclose(flat.max(axis=2)[varied], 1.0, atol=1e-6)
