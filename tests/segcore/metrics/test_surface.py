"""Tests for segcore.metrics.surface: surfaces and distances by hand on tiny masks with anisotropic
spacing, the empty policies, volume Dice == Dice of summed per-slice counts, a brute-force
reference for the distances, and agreement with MONAI's HD95 and ASSD."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from scipy import ndimage
from scipy.spatial.distance import cdist

from segcore.errors import ConfigError
from segcore.metrics.dice import confusion_counts, dice_from_counts
from segcore.metrics.surface import (SURFACE_STATUSES, assd, hd95, surface_distances, surface_mask,
                                     volume_counts, volume_metrics)

SPACING = (2.5, 0.7, 0.9)


def _reference_surface(mask: np.ndarray) -> np.ndarray:
    """Surface by explicit face neighbours of a False-padded copy (independent of erosion)."""
    padded = np.pad(mask.astype(bool), 1)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    outside = np.zeros(mask.shape, dtype=bool)
    for axis in range(mask.ndim):
        for step in (-1, 1):
            outside |= ~np.roll(padded, step, axis=axis)[inner]
    return mask.astype(bool) & outside


def _reference_distances(pred: np.ndarray, gt: np.ndarray, spacing) -> tuple[np.ndarray, np.ndarray]:
    """All-pairs distances between surface voxel centres in physical units (no transform, no crop)."""
    ps = np.argwhere(_reference_surface(pred)) * np.asarray(spacing, dtype=np.float64)
    gs = np.argwhere(_reference_surface(gt)) * np.asarray(spacing, dtype=np.float64)
    d = cdist(ps, gs)
    return d.min(axis=1), d.min(axis=0)


def _blobs(rng: np.random.Generator, shape: tuple[int, ...], num_classes: int, sigma: float = 2.0) -> np.ndarray:
    """Random label map of smooth blobs: classes 0..num_classes-1 at quantiles of smoothed noise."""
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma)
    return np.digitize(field, np.quantile(field, np.linspace(0, 1, num_classes + 1)[1:-1])).astype(np.int64)


# --- surfaces and distances by hand --------------------------------------------------------------

def test_surface_of_a_block_is_its_rim_and_the_array_edge_counts_as_outside() -> None:
    mask = np.zeros((5, 5), dtype=bool)
    mask[1:4, 1:4] = True
    expected = mask.copy()
    expected[2, 2] = False
    np.testing.assert_array_equal(surface_mask(mask), expected)
    # A mask filling the whole array: the edge is outside, so all but the centre are surface.
    full = np.ones((3, 3, 3), dtype=bool)
    expected3 = full.copy()
    expected3[1, 1, 1] = False
    np.testing.assert_array_equal(surface_mask(full), expected3)
    # Face neighbours only: the centre of a plus sign has its 4 face neighbours inside (its 4 corner
    # neighbours are outside); every arm voxel has a face neighbour outside.
    plus = np.pad(np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool), 1)
    arms = plus.copy()
    arms[2, 2] = False
    np.testing.assert_array_equal(surface_mask(plus), arms)


def test_two_single_voxels_a_known_distance_apart() -> None:
    pred = np.zeros((5, 6, 7), dtype=bool)
    gt = np.zeros_like(pred)
    pred[1, 1, 1] = True
    gt[3, 4, 1] = True
    d = math.sqrt((2 * 2.5) ** 2 + (3 * 0.7) ** 2)  # two steps along axis 0, three along axis 1
    pg, gp = surface_distances(pred, gt, spacing=SPACING)
    np.testing.assert_allclose(pg, [d], rtol=0, atol=1e-12)
    np.testing.assert_allclose(gp, [d], rtol=0, atol=1e-12)
    assert pg.dtype == gp.dtype == np.float64
    assert hd95(pred, gt, spacing=SPACING) == pytest.approx(d, abs=1e-12)
    assert assd(pred, gt, spacing=SPACING) == pytest.approx(d, abs=1e-12)
    # Spacing is ordered like the axes: swapping it changes the answer.
    assert hd95(pred, gt, spacing=SPACING[::-1]) == pytest.approx(math.sqrt((2 * 0.9) ** 2 + (3 * 0.7) ** 2))


def test_cube_against_the_same_cube_shifted_by_one_voxel() -> None:
    gt = np.zeros((8, 8, 8), dtype=bool)
    gt[2:5, 2:5, 2:5] = True
    pred = np.roll(gt, 1, axis=0)  # z 3..5
    # Either direction (by symmetry): 16 surface voxels lie on the other surface (0), one lies on
    # the other's hidden centre (nearest surface one step along axis 1: 0.7), and the far face's
    # 9 voxels are one step along axis 0 from the other's face (2.5). 26 surface voxels each.
    expected = np.sort(np.r_[np.zeros(16), 0.7, np.full(9, 2.5)])
    pg, gp = surface_distances(pred, gt, spacing=SPACING)
    np.testing.assert_allclose(np.sort(pg), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.sort(gp), expected, rtol=0, atol=1e-12)
    assert hd95(pred, gt, spacing=SPACING) == pytest.approx(2.5, abs=1e-12)  # q95 at rank 23.75 of 0..25
    assert assd(pred, gt, spacing=SPACING) == pytest.approx((0.7 + 9 * 2.5) / 26, abs=1e-12)


def test_hd95_is_the_larger_directed_percentile_with_linear_interpolation() -> None:
    # 2-D, spacing (1.5, 0.5): one pixel against a line of five, two rows below.
    pred = np.zeros((3, 5), dtype=bool)
    gt = np.zeros_like(pred)
    pred[0, 0] = True
    gt[2, :] = True
    spacing = (1.5, 0.5)
    line = np.sqrt(3.0 ** 2 + (0.5 * np.arange(5)) ** 2)  # gt -> pred, ascending
    pg, gp = surface_distances(pred, gt, spacing=spacing)
    np.testing.assert_allclose(pg, [3.0], rtol=0, atol=1e-12)
    np.testing.assert_allclose(gp, line, rtol=0, atol=1e-12)
    q95 = line[3] + 0.8 * (line[4] - line[3])  # rank 0.95 * 4 = 3.8
    pooled = np.sort(np.r_[3.0, line])
    assert hd95(pred, gt, spacing=spacing) == pytest.approx(q95, abs=1e-12)
    assert abs(q95 - (pooled[4] + 0.75 * (pooled[5] - pooled[4]))) > 1e-3  # not the pooled percentile
    assert assd(pred, gt, spacing=spacing) == pytest.approx((3.0 + line.sum()) / 6, abs=1e-12)


def test_metrics_are_symmetric_and_scale_with_spacing() -> None:
    rng = np.random.default_rng(3)
    a, b = _blobs(rng, (9, 12, 10), 2) == 1, _blobs(rng, (9, 12, 10), 2) == 1
    for fn in (hd95, assd):
        assert fn(a, b, spacing=SPACING) == pytest.approx(fn(b, a, spacing=SPACING), rel=1e-12)
        assert fn(a, b, spacing=np.multiply(SPACING, 3.0)) == pytest.approx(3 * fn(a, b, spacing=SPACING), rel=1e-12)
        assert fn(a, a, spacing=SPACING) == 0.0
    # One number is isotropic spacing.
    assert hd95(a, b, spacing=2.0) == pytest.approx(hd95(a, b, spacing=(2.0, 2.0, 2.0)), rel=1e-12)


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("seed", range(4))
def test_distances_equal_a_brute_force_reference(ndim: int, seed: int) -> None:
    """Cropped transforms == all-pairs distances of the whole arrays (masks touch the array edge)."""
    rng = np.random.default_rng(seed)
    shape = (11, 13, 9)[:ndim]
    spacing = SPACING[:ndim]
    pred = _blobs(rng, shape, 3, sigma=1.5) == 2
    gt = _blobs(rng, shape, 3, sigma=1.5) == 2
    np.testing.assert_array_equal(surface_mask(pred), _reference_surface(pred))
    pg, gp = surface_distances(pred, gt, spacing=spacing)
    rpg, rgp = _reference_distances(pred, gt, spacing)
    np.testing.assert_allclose(pg, rpg, rtol=0, atol=1e-12)
    np.testing.assert_allclose(gp, rgp, rtol=0, atol=1e-12)
    # Embedded far inside a larger array, nothing changes: the array edge counts as outside.
    pad = [(3, 17)] * ndim
    ppg, pgp = surface_distances(np.pad(pred, pad), np.pad(gt, pad), spacing=spacing)
    np.testing.assert_array_equal(ppg, pg)
    np.testing.assert_array_equal(pgp, gp)


# --- empty policies --------------------------------------------------------------------------------

def test_empty_masks_give_nan_and_inf_distances() -> None:
    gt = np.zeros((4, 4, 4), dtype=bool)
    gt[1:3, 1:3, 1:3] = True  # 8 voxels, all surface
    empty = np.zeros_like(gt)
    pg, gp = surface_distances(empty, gt, spacing=SPACING)
    assert pg.shape == (0,) and gp.shape == (8,) and np.all(np.isinf(gp))
    pg, gp = surface_distances(gt, empty, spacing=SPACING)
    assert pg.shape == (8,) and np.all(np.isinf(pg)) and gp.shape == (0,)
    pg, gp = surface_distances(empty, empty, spacing=SPACING)
    assert pg.shape == gp.shape == (0,)
    for p, g in ((empty, gt), (gt, empty), (empty, empty)):
        assert math.isnan(hd95(p, g, spacing=SPACING))
        assert math.isnan(assd(p, g, spacing=SPACING))


def test_volume_metrics_flags_each_empty_case() -> None:
    # Class 1 in both; class 2 only in the prediction; class 3 only in the ground truth; class 4 nowhere.
    gt = np.zeros((3, 4, 4), dtype=np.uint8)
    pred = np.zeros_like(gt)
    gt[1, 1:3, 1:3] = 1
    pred[1, 1:3, 1:3] = 1
    pred[0, 0, 0] = 2
    gt[2, 3, 3] = 3
    m = volume_metrics(pred, gt, num_classes=5, spacing=SPACING)
    assert list(m["surface_status"]) == ["skipped", "ok", "empty_gt", "empty_pred", "both_empty"]
    np.testing.assert_array_equal(m["empty_gt"], [False, False, True, False, True])
    np.testing.assert_array_equal(m["empty_pred"], [False, False, False, True, True])
    np.testing.assert_array_equal(m["tp"], [42, 4, 0, 0, 0])
    np.testing.assert_array_equal(m["fp"], [1, 0, 1, 0, 0])
    np.testing.assert_array_equal(m["fn"], [1, 0, 0, 1, 0])
    np.testing.assert_allclose(m["dice"], [84 / 86, 1.0, 0.0, 0.0, 1.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(m["iou"], [42 / 44, 1.0, 0.0, 0.0, 1.0], rtol=0, atol=1e-15)
    np.testing.assert_array_equal(m["hd95"][1], 0.0)
    np.testing.assert_array_equal(m["assd"][1], 0.0)
    assert np.all(np.isnan(m["hd95"][[0, 2, 3, 4]])) and np.all(np.isnan(m["assd"][[0, 2, 3, 4]]))
    assert set(m["surface_status"]) <= set(SURFACE_STATUSES)
    # With the background: its surface is computed too.
    mb = volume_metrics(pred, gt, num_classes=5, spacing=SPACING, include_background=True)
    assert mb["surface_status"][0] == "ok" and np.isfinite(mb["hd95"][0]) and np.isfinite(mb["assd"][0])
    for key in ("tp", "fp", "fn", "dice", "iou", "hd95", "assd"):
        np.testing.assert_array_equal(mb[key][1:], m[key][1:])


def test_volume_metrics_by_hand_on_a_tiny_volume() -> None:
    gt = np.zeros((2, 3, 3), dtype=np.int64)
    pred = np.zeros_like(gt)
    gt[0, 0, :2] = 1   # (0,0,0), (0,0,1)
    pred[0, 0, 1:] = 1  # (0,0,1), (0,0,2)
    gt[1, 2, 2] = 2
    pred[1, 2, 2] = 2
    m = volume_metrics(pred, gt, num_classes=3, spacing=SPACING)
    assert set(m) == {"class_id", "tp", "fp", "fn", "dice", "iou", "empty_gt", "empty_pred", "hd95", "assd",
                      "surface_status"}
    assert all(v.shape == (3,) for v in m.values())
    np.testing.assert_array_equal(m["class_id"], [0, 1, 2])
    np.testing.assert_array_equal(m["tp"], [14, 1, 1])
    np.testing.assert_array_equal(m["fp"], [1, 1, 0])
    np.testing.assert_array_equal(m["fn"], [1, 1, 0])
    np.testing.assert_allclose(m["dice"], [28 / 30, 2 / 4, 1.0], rtol=0, atol=1e-15)
    np.testing.assert_allclose(m["iou"], [14 / 16, 1 / 3, 1.0], rtol=0, atol=1e-15)
    # Class 1: each voxel is on its mask's surface; (0,0,1) is shared, the others are 2 x 0.9 apart
    # from the nearest of the other: distances {0, 0.9} each way -> HD95 0.9 x 0.95, ASSD 0.45.
    assert m["hd95"][1] == pytest.approx(0.9 * 0.95, abs=1e-12)
    assert m["assd"][1] == pytest.approx(0.45, abs=1e-12)
    assert m["hd95"][2] == 0.0 and m["assd"][2] == 0.0
    for key, kind in (("tp", "i"), ("fp", "i"), ("fn", "i"), ("dice", "f"), ("iou", "f"), ("hd95", "f"),
                      ("assd", "f"), ("empty_gt", "b"), ("empty_pred", "b"), ("surface_status", "U")):
        assert m[key].dtype.kind == kind, key
    assert m["tp"].dtype == np.int64 and m["dice"].dtype == np.float64


# --- per-slice counts and Dice -----------------------------------------------------------------

_volumes = st.integers(1, 4).flatmap(
    lambda c: st.tuples(
        st.just(c),
        st.tuples(st.integers(1, 4), st.integers(1, 5), st.integers(1, 5)).flatmap(
            lambda shape: st.tuples(
                hnp.arrays(np.int64, shape, elements=st.integers(0, c - 1)),
                hnp.arrays(np.int64, shape, elements=st.integers(0, c - 1)),
            )
        ),
    )
)


@settings(max_examples=80, deadline=None, database=None)
@given(_volumes)
def test_volume_dice_equals_dice_of_summed_per_slice_counts(case) -> None:
    c, (pred, gt) = case
    m = volume_metrics(pred, gt, num_classes=c, spacing=SPACING)
    for axis in range(3):  # slices along every axis
        per_slice = confusion_counts(np.moveaxis(pred, axis, 0), np.moveaxis(gt, axis, 0), c)
        tp, fp, fn = (k.sum(axis=0) for k in per_slice)
        np.testing.assert_array_equal(m["tp"], tp)
        np.testing.assert_array_equal(m["fp"], fp)
        np.testing.assert_array_equal(m["fn"], fn)
        dice, empty_gt = dice_from_counts(tp, fp, fn)
        np.testing.assert_array_equal(m["dice"], dice)
        np.testing.assert_array_equal(m["empty_gt"], empty_gt)
    np.testing.assert_allclose(m["iou"], m["dice"] / (2 - m["dice"]), rtol=1e-12, atol=0)
    np.testing.assert_array_equal(m["tp"] + m["fn"], [np.sum(gt == k) for k in range(c)])
    np.testing.assert_array_equal(m["tp"] + m["fp"], [np.sum(pred == k) for k in range(c)])
    ok = m["surface_status"] == "ok"
    np.testing.assert_array_equal(ok[1:], ~m["empty_gt"][1:] & ~m["empty_pred"][1:])
    assert np.all(np.isfinite(m["hd95"][ok])) and np.all(np.isnan(m["hd95"][~ok]))


def test_counts_in_chunks_equal_counts_in_one_piece(monkeypatch: pytest.MonkeyPatch) -> None:
    import segcore.metrics.surface as surface

    rng = np.random.default_rng(5)
    pred, gt = rng.integers(0, 4, size=(6, 7, 8)), rng.integers(0, 4, size=(6, 7, 8))
    whole = volume_counts(pred, gt, num_classes=4)
    monkeypatch.setattr(surface, "_COUNT_CHUNK", 37)  # 336 voxels: ten chunks, the last one short
    for a, b in zip(whole, volume_counts(pred, gt, num_classes=4)):
        np.testing.assert_array_equal(a, b)
    ref = confusion_counts(pred[None].reshape(1, 6, 56), gt[None].reshape(1, 6, 56), 4)
    for a, b in zip(whole, ref):
        np.testing.assert_array_equal(a, b[0])


# --- validation ------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"spacing": (1.0, 1.0)}, "does not fit 3-D"),
        ({"spacing": (1.0, -1.0, 1.0)}, "finite and positive"),
        ({"spacing": (1.0, float("nan"), 1.0)}, "finite and positive"),
        ({"spacing": None}, "spacing is required"),
        ({"spacing": "1mm"}, "not a number"),
        ({"spacing": 1.0, "num_classes": 0}, "positive integer"),
        ({"spacing": 1.0, "num_classes": 2}, r"outside \[0, 2\)"),
    ],
)
def test_bad_arguments_raise_config_errors(kwargs: dict, match: str) -> None:
    labels = np.zeros((2, 3, 4), dtype=np.int64)
    labels[0, 0, 0] = 2
    with pytest.raises(ConfigError, match=match):
        volume_metrics(labels, labels, **{"num_classes": 3, **kwargs})


def test_bad_label_maps_raise_config_errors() -> None:
    with pytest.raises(ConfigError, match="same size"):
        volume_metrics(np.zeros((2, 3)), np.zeros((3, 2)), num_classes=2, spacing=1.0)
    with pytest.raises(ConfigError, match="integers"):
        volume_metrics(np.zeros((2, 3)), np.zeros((2, 3)), num_classes=2, spacing=1.0)
    with pytest.raises(ValueError, match="same size"):  # ConfigError is also a ValueError
        surface_distances(np.zeros((2, 3), bool), np.zeros((2, 4), bool), spacing=1.0)


# --- MONAI cross-check --------------------------------------------------------------------------
# MONAI works in float32: its distances are float32 (relative rounding <= 6e-8), and its
# torch.quantile runs in float32, where the rank 0.95 * (n - 1) and the interpolation weight carry
# errors of about (n - 1) x 6e-8, times the gap between two neighbouring order statistics (up to
# 2e-6 relative on these shapes). So: distances and ASSD are compared at 1e-6 relative; HD95 at
# 1e-6 against MONAI's own formula (max of both directions' torch.quantile) evaluated in float64 on
# MONAI's own distances, and at 1e-5 against the float32 figure that compute_hausdorff_distance
# returns.

def _monai(pred: np.ndarray, gt: np.ndarray, c: int, spacing) -> dict[str, np.ndarray | list]:
    """MONAI's HD95, symmetric ASSD and per-direction surface distances of classes 1..c-1."""
    torch = pytest.importorskip("torch")
    metrics = pytest.importorskip("monai.metrics")
    utils = pytest.importorskip("monai.metrics.utils")

    def one_hot(labels: np.ndarray):
        return torch.from_numpy(np.moveaxis(np.eye(c, dtype=np.float32)[labels], -1, 0)[None].copy())

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI's own deprecation notices
        hd = metrics.compute_hausdorff_distance(one_hot(pred), one_hot(gt), percentile=95, spacing=list(spacing))
        asd = metrics.compute_average_surface_distance(one_hot(pred), one_hot(gt), symmetric=True,
                                                       spacing=list(spacing))
        distances = []
        for k in range(1, c):
            _, both, _ = utils.get_edge_surface_distance(torch.from_numpy(pred == k).float(),
                                                         torch.from_numpy(gt == k).float(),
                                                         spacing=list(spacing), symmetric=True)
            distances.append(tuple(d.double() for d in both))
    hd64 = [max(float(torch.quantile(d, 0.95)) for d in both) for both in distances]
    return {"hd95": hd.numpy()[0].astype(np.float64), "assd": asd.numpy()[0].astype(np.float64),
            "hd95_float64": np.asarray(hd64), "distances": [tuple(d.numpy() for d in b) for b in distances]}


def _check_against_monai(pred: np.ndarray, gt: np.ndarray, c: int, spacing) -> None:
    m = volume_metrics(pred, gt, num_classes=c, spacing=spacing)
    assert np.all(m["surface_status"][1:] == "ok")
    ref = _monai(pred, gt, c, spacing)
    for k in range(1, c):
        ours = surface_distances(pred == k, gt == k, spacing=spacing)
        for a, b in zip(ours, ref["distances"][k - 1]):
            assert a.shape == b.shape  # the same surface voxels
            np.testing.assert_allclose(np.sort(a), np.sort(b), rtol=1e-6, atol=0)
    np.testing.assert_allclose(m["assd"][1:], ref["assd"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(m["hd95"][1:], ref["hd95_float64"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(m["hd95"][1:], ref["hd95"], rtol=1e-5, atol=0)
    for k in range(1, c):  # the mask functions agree with the table
        assert hd95(pred == k, gt == k, spacing=spacing) == m["hd95"][k]
        assert assd(pred == k, gt == k, spacing=spacing) == m["assd"][k]


@pytest.mark.parametrize("seed", range(5))
def test_hd95_and_assd_match_monai_in_3d(seed: int) -> None:
    pytest.importorskip("monai")
    rng = np.random.default_rng(seed)
    c = 4
    gt = _blobs(rng, (18, 26, 22), c)
    # Half the seeds: an independent prediction; the others: the ground truth shifted, with holes.
    pred = _blobs(rng, gt.shape, c) if seed % 2 else np.roll(np.where(rng.random(gt.shape) < 0.1, 0, gt), 2, axis=1)
    _check_against_monai(pred, gt, c, SPACING)


@pytest.mark.parametrize("seed", range(3))
def test_hd95_and_assd_match_monai_in_2d(seed: int) -> None:
    pytest.importorskip("monai")
    rng = np.random.default_rng(100 + seed)
    c = 3
    gt = _blobs(rng, (40, 48), c, sigma=3.0)
    _check_against_monai(_blobs(rng, gt.shape, c, sigma=3.0), gt, c, (0.8, 0.35))
