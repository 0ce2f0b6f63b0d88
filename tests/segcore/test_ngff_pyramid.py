"""Mode downsampling of labels (hand-computed blocks, ties, odd edges, a brute-force reference),
chunk-by-chunk == whole-array, and the levels a pyramid plans."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import zarr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from segcore.errors import ConfigError
from segcore.pyramid import downsample_array, downsample_mode, plan_levels


def test_each_2x2_block_keeps_its_most_frequent_label_ties_the_smallest_and_odd_edges_vote_alone() -> None:
    labels = np.array([[1, 1, 2, 3, 3],
                       [2, 1, 2, 2, 4],
                       [5, 5, 0, 0, 7]], np.uint8)
    # blocks: [1 1 2 1] -> 1; [2 3 2 2] -> 2; [3 4] (last column) -> tie -> 3;
    # the last row alone: [5 5] -> 5; [0 0] -> 0; [7] -> 7
    got = downsample_mode(labels, (2, 2))
    np.testing.assert_array_equal(got, [[1, 2, 3], [5, 0, 7]])
    assert got.dtype == np.uint8


def test_a_2x2_tie_goes_to_the_smallest_label_never_to_the_mean() -> None:
    np.testing.assert_array_equal(downsample_mode(np.array([[3, 1], [1, 3]], np.uint16), (2, 2)), [[1]])
    np.testing.assert_array_equal(downsample_mode(np.array([[1, 3], [3, 3]], np.uint16), (2, 2)), [[3]])  # not 2
    np.testing.assert_array_equal(downsample_mode(np.array([[4, 2], [9, 7]], np.uint16), (2, 2)), [[2]])


def test_2x2x2_blocks_and_the_largest_label_values() -> None:
    top = np.uint32(2**32 - 1)
    volume = np.zeros((2, 2, 4), np.uint32)
    volume[:, :, :2] = [[[5, 5], [6, 6]], [[6, 5], [top, 5]]]  # 5 x4, 6 x3, top x1 -> 5
    volume[:, :, 2:] = [[[top, top], [top, top]], [[1, 1], [1, 1]]]  # tie 4-4 -> 1
    np.testing.assert_array_equal(downsample_mode(volume, (2, 2, 2)), [[[5, 1]]])
    only_top = np.full((3, 3, 3), top, np.uint32)
    np.testing.assert_array_equal(downsample_mode(only_top, (2, 2, 2)), np.full((2, 2, 2), top))


def test_a_factor_of_1_keeps_an_axis_the_image_axis_of_a_group() -> None:
    stack = np.array([[[1, 1], [1, 2]], [[3, 4], [4, 4]], [[0, 0], [9, 9]]], np.uint8)  # (3, 2, 2)
    np.testing.assert_array_equal(downsample_mode(stack, (1, 2, 2)), [[[1]], [[4]], [[0]]])


def test_non_integer_labels_and_bad_factors_are_refused() -> None:
    with pytest.raises(ConfigError, match="integers"):
        downsample_mode(np.zeros((2, 2), np.float32), (2, 2))
    with pytest.raises(ConfigError, match="block size"):
        downsample_mode(np.zeros((2, 2), np.uint8), (2,))
    with pytest.raises(ConfigError, match="block size"):
        downsample_mode(np.zeros((2, 2), np.uint8), (0, 2))


def _reference(labels: np.ndarray, factors: tuple[int, ...]) -> np.ndarray:
    """Block by block: np.unique's counts, the first (smallest) label of the largest count."""
    out = np.zeros(tuple(-(-n // f) for n, f in zip(labels.shape, factors)), labels.dtype)
    for index in itertools.product(*(range(n) for n in out.shape)):
        block = labels[tuple(slice(i * f, (i + 1) * f) for i, f in zip(index, factors))]
        values, counts = np.unique(block, return_counts=True)
        out[index] = values[np.argmax(counts)]
    return out


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 3).flatmap(lambda nd: st.tuples(
    arrays(np.uint8, st.tuples(*[st.integers(1, 9)] * nd), elements=st.integers(0, 3)),
    st.tuples(*[st.integers(1, 3)] * nd))))
def test_downsampling_equals_a_block_by_block_reference(case: tuple[np.ndarray, tuple[int, ...]]) -> None:
    labels, factors = case
    np.testing.assert_array_equal(downsample_mode(labels, factors), _reference(labels, factors))


def test_chunk_by_chunk_equals_the_whole_array(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, (3, 37, 53)).astype(np.uint16)
    root = zarr.open_group(str(tmp_path / "p.zarr"), mode="w")
    source = root.create_array("a", shape=labels.shape, chunks=(2, 10, 16), dtype="uint16")
    source[:] = labels
    target = root.create_array("b", shape=(3, 19, 27), chunks=(2, 7, 5), dtype="uint16")  # chunks unlike the source's
    downsample_array(source, target, (1, 2, 2))
    np.testing.assert_array_equal(target[:], downsample_mode(labels, (1, 2, 2)))
    with pytest.raises(ConfigError, match="target of shape"):
        downsample_array(source, root.create_array("c", shape=(3, 18, 27), chunks=(2, 7, 5), dtype="uint16"),
                         (1, 2, 2))


def test_levels_halve_the_spatial_axes_until_the_longest_side_is_small() -> None:
    levels = plan_levels((3, 600, 300), ("image", "y", "x"))
    assert [lv.shape for lv in levels] == [(3, 600, 300), (3, 300, 150), (3, 150, 75)]
    assert [lv.factors for lv in levels] == [(1, 1, 1), (1, 2, 2), (1, 4, 4)]
    assert [lv.path for lv in levels] == ["0", "1", "2"]
    assert [lv.shape for lv in plan_levels((5, 256, 40), ("image", "y", "x"))] == [(5, 256, 40)]
    # a thin axis stops at 1 voxel: its factor stays there
    thin = plan_levels((3, 64, 64), ("z", "y", "x"), max_side=8)
    assert [(lv.shape, lv.factors, lv.step) for lv in thin] == [
        ((3, 64, 64), (1, 1, 1), (1, 1, 1)), ((2, 32, 32), (2, 2, 2), (2, 2, 2)),
        ((1, 16, 16), (4, 4, 4), (2, 2, 2)), ((1, 8, 8), (4, 8, 8), (1, 2, 2))]
    assert len(plan_levels((1, 10_000, 10_000), ("image", "y", "x"), max_levels=3)) == 3
    with pytest.raises(ConfigError, match="does not match"):
        plan_levels((3, 64), ("z", "y", "x"))
