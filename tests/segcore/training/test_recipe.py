"""Tests of the recipe pieces: validation splits (a group never straddles), patch sampling with
foreground oversampling, augmentation and the learning-rate schedule, on hand-computed values."""

from __future__ import annotations

import logging

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segcore.errors import ConfigError
from segcore.training.recipe import (PatchSampler, augment, flip_axes, groups_of, lr_factor, natural_key,
                                    split_indices)


@settings(max_examples=60, deadline=None)
@given(groups=st.lists(st.integers(0, 6), min_size=2, max_size=40), n_val_share=st.floats(0.01, 0.99),
       seed=st.integers(0, 2**16))
def test_a_group_never_straddles_the_split(groups, n_val_share, seed) -> None:
    ids = [f"vol{g}_slice{i:03d}" for i, g in enumerate(groups)]
    if len(set(groups)) < 2:
        with pytest.raises(ConfigError, match="one group"):
            split_indices(ids, n_val=1, rng=np.random.default_rng(seed), how="group", group_pattern=r"^(vol\d+)_")
        return
    n_val = min(len(ids) - 1, max(1, int(len(ids) * n_val_share)))
    train, val = split_indices(ids, n_val=n_val, rng=np.random.default_rng(seed), how="group",
                               group_pattern=r"^(vol\d+)_")
    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(ids)))
    assert len(train) and len(val)
    assert not {groups[i] for i in train} & {groups[i] for i in val}


@pytest.mark.parametrize("seed", range(8))
def test_a_large_group_is_not_held_out_when_smaller_ones_come_closer_to_the_fraction(seed, caplog) -> None:
    """Cases of 100, 20 and 20 slices at 15 % (21 images): one 20-slice case, never the 100-slice one."""
    ids = [f"case{c}_z{k:03d}" for c, depth in ((1, 100), (2, 20), (3, 20)) for k in range(depth)]
    train, val = split_indices(ids, n_val=21, rng=np.random.default_rng(seed), how="group",
                               group_pattern=r"^(case\d)_")
    assert len(val) == 20 and len(train) == 120
    two = ["big_z%02d" % k for k in range(10)] + ["a_z00", "b_z00"]  # a 10-slice group and two of one
    train, val = split_indices(two, n_val=2, rng=np.random.default_rng(seed), how="group", group_pattern=r"^(\w+)_z")
    assert len(val) == 2
    with caplog.at_level(logging.WARNING):  # only large groups: the smallest, and a warning of the share
        train, val = split_indices(ids, n_val=5, rng=np.random.default_rng(seed), how="group",
                                   group_pattern=r"^(case\d)_")
    assert len(val) == 20 and "20 of 140 images held out, more than twice the 5" in caplog.text


def test_a_group_pattern_that_matches_no_id_is_refused_and_a_partial_one_warned(caplog) -> None:
    ids = ["case1_z0", "case1_z1", "case2_z0", "case2_z1"]
    with pytest.raises(ConfigError, match=r"matches none of the 4 image ids \(e.g. 'case1_z0'\)"):
        split_indices(ids, n_val=2, rng=np.random.default_rng(0), how="group", group_pattern=r"^(patient\d+)_")
    with caplog.at_level("WARNING", logger="segcore.training.recipe"):
        split_indices(ids + ["other"], n_val=2, rng=np.random.default_rng(0), how="group", group_pattern=r"^(case\d+)_")
    assert "matches 4 of 5 image ids; each of the other 1 (e.g. 'other') is a group of its own" in caplog.text


def test_groups_come_from_the_first_capture_group_or_the_match() -> None:
    assert groups_of(["a_z1", "a_z2", "b_z1", "other"], r"^(\w)_z") == ["a", "a", "b", "other"]
    assert groups_of(["case7-slice1"], r"case\d+") == ["case7"]


def test_tail_holds_out_the_last_ids_in_natural_order() -> None:
    ids = ["z10", "z9", "z1", "z2", "z11"]  # natural order: z1 z2 z9 z10 z11
    train, val = split_indices(ids, n_val=2, rng=np.random.default_rng(0), how="tail")
    assert [ids[i] for i in val] == ["z10", "z11"] and [ids[i] for i in train] == ["z9", "z1", "z2"]
    assert sorted(ids, key=natural_key) == ["z1", "z2", "z9", "z10", "z11"]


def test_a_third_of_each_batch_is_centred_on_a_foreground_pixel() -> None:
    masks = np.zeros((3, 40, 40), dtype=np.int64)
    masks[1, 30, 5] = 2  # one tumour pixel near the border
    masks[2, 10:12, 20:22] = 1
    sampler = PatchSampler(masks, patch=16, num_classes=3)
    rng = np.random.default_rng(0)
    for _ in range(20):
        batch = sampler.batch(rng, 6)
        assert [fg for *_, fg in batch] == [False] * 4 + [True] * 2
        for img, y0, x0, fg in batch:
            assert 0 <= y0 <= 24 and 0 <= x0 <= 24
            if fg:  # the patch holds the labelled pixel, centred unless the border stops it
                assert masks[img, y0:y0 + 16, x0:x0 + 16].any()
    # The single tumour pixel (30, 5): centre 30 - 8 = 22, x 5 - 8 < 0 -> 0.
    tumour = [b for b in sampler.batch(np.random.default_rng(1), 300) if b[0] == 1 and b[3]]
    assert tumour and all((y0, x0) == (22, 0) for _, y0, x0, _ in tumour)


def test_images_no_larger_than_the_patch_are_taken_whole() -> None:
    masks = np.zeros((4, 8, 8), dtype=np.int64)
    masks[3, 2, 2] = 1
    sampler = PatchSampler(masks, patch=32, num_classes=2)
    batch = sampler.batch(np.random.default_rng(0), 3)
    assert (sampler.ph, sampler.pw) == (8, 8) and all(b[1:3] == (0, 0) for b in batch)
    assert batch[-1][0] == 3  # the foreground draw picks the image that holds the class


def test_volume_patches_hold_the_foreground_voxel_they_are_centred_on() -> None:
    masks = np.zeros((2, 10, 20, 30), dtype=np.int64)
    masks[1, 9, 3, 28] = 1  # one voxel in a corner: centred 9 - 2 -> clipped 6, 3 - 4 -> 0, 28 - 5 -> clipped 20
    sampler = PatchSampler(masks, patch=(4, 8, 10), num_classes=2, fg_fraction=0.5)
    assert sampler.patch == (4, 8, 10) and sampler.size == (10, 20, 30) and (sampler.ph, sampler.pw) == (8, 10)
    batch = sampler.batch(np.random.default_rng(0), 4)
    assert [b[-1] for b in batch] == [False, False, True, True]
    assert all(b[:4] == (1, 6, 0, 20) for b in batch[2:])
    for img, z0, y0, x0, _ in batch:
        assert 0 <= z0 <= 6 and 0 <= y0 <= 12 and 0 <= x0 <= 20
    x = torch.arange(2 * 10 * 20 * 30, dtype=torch.float32).reshape(2, 1, 10, 20, 30)
    y = torch.from_numpy(masks)
    xp, yp = sampler.crop(x, y, batch)
    assert xp.shape == (4, 1, 4, 8, 10) and yp.shape == (4, 4, 8, 10)
    assert xp[2, 0, 0, 0, 0] == x[1, 0, 6, 0, 20] and int(yp[2].sum()) == 1 and yp[2, 3, 3, 8] == 1
    whole = PatchSampler(masks, patch=64, num_classes=2)
    assert whole.patch == (10, 20, 30) and all(b[1:4] == (0, 0, 0) for b in whole.batch(np.random.default_rng(1), 5))


@pytest.mark.parametrize("patch", [0, (4, 8), (4, 0, 8)])
def test_bad_patches_are_refused(patch) -> None:
    with pytest.raises(ConfigError, match="patch must be positive"):
        PatchSampler(np.zeros((1, 8, 8, 8), dtype=np.int64), patch=patch, num_classes=2)


def test_flips_move_volumes_and_labels_alike_along_every_axis() -> None:
    x = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 1, 2, 3, 4).repeat(64, 2, 1, 1, 1)
    y = torch.arange(2 * 3 * 4).reshape(1, 2, 3, 4).repeat(64, 1, 1, 1)
    xf, yf = flip_axes(x, y, np.random.default_rng(0))
    assert xf.shape == x.shape and yf.dtype == y.dtype
    torch.testing.assert_close(xf[:, 0], yf.float())
    torch.testing.assert_close(xf[:, 1], yf.float())
    seen = set()
    for yi in yf:  # each sample is one of the 8 flip combinations, and all 8 occur in 64 draws
        combos = [dims for dims in ([], [0], [1], [2], [0, 1], [0, 2], [1, 2], [0, 1, 2])
                  if torch.equal(yi, y[0].flip(dims) if dims else y[0])]
        assert len(combos) == 1
        seen.add(tuple(combos[0]))
    assert len(seen) == 8


def test_schedule_values_by_hand() -> None:
    assert lr_factor(0, total=100, warmup=10, kind="poly") == pytest.approx(0.1)
    assert lr_factor(9, total=100, warmup=10, kind="poly") == pytest.approx(1.0)
    assert lr_factor(10, total=100, warmup=10, kind="poly") == pytest.approx(1.0)
    assert lr_factor(55, total=100, warmup=10, kind="poly") == pytest.approx(0.5**0.9)
    assert lr_factor(55, total=100, warmup=10, kind="cosine") == pytest.approx(0.5)
    assert lr_factor(100, total=100, warmup=10, kind="cosine") == pytest.approx(0.0)
    assert lr_factor(20, total=50, warmup=10, kind="cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))


def test_augment_moves_inputs_and_labels_alike() -> None:
    x = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8).repeat(4, 1, 1, 1)
    y = torch.arange(64).reshape(1, 8, 8).repeat(4, 1, 1)
    xa, ya = augment(x, y, np.random.default_rng(3), full=False)
    torch.testing.assert_close(xa[:, 0], ya.float())  # flips and turns only: the same pixels move together
    xf, yf = augment(x, y, np.random.default_rng(3), full=True)
    assert xf.shape == x.shape and yf.shape == y.shape and yf.dtype == y.dtype
    assert set(yf.unique().tolist()) <= set(range(64))  # labels stay labels (nearest)
