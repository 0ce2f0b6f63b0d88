"""Tests for segcore.tiling: exact coverage of blocks and tiles (Hypothesis), seamless blending
(tiled == whole for pointwise models, blocks == one global sliding window), and instance stitching
that reproduces objects crossing every seam."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segcore.errors import ConfigError
from segcore.tiling import (MIN_WEIGHT, Window, axis_starts, blend_block, chunk_windows, flip_tta,
                            keep_core_objects, lattice, objects_on_seams, paste_objects, read_window, tile_weights,
                            tiles_for)

shapes = st.tuples(st.integers(1, 300), st.integers(1, 300))


@st.composite
def tilings(draw):
    tile = draw(st.integers(4, 96))
    return tile, draw(st.integers(0, tile // 2))


def _to_input(raw: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(raw.astype(np.float32)).permute(0, 3, 1, 2)


@settings(max_examples=100, deadline=None)
@given(shape=shapes, chunk=st.integers(16, 128), tiling=tilings())
def test_blocks_partition_the_image_and_tiles_cover_every_block(shape, chunk, tiling) -> None:
    h, w = shape
    tile, overlap = tiling
    cover = np.zeros((h, w), np.int32)
    for core in chunk_windows(h, w, chunk):
        cover[core.y0:core.y1, core.x0:core.x1] += 1
        tiles = tiles_for(core, h, w, tile, overlap)
        # exactly the lattice tiles touching the core
        assert tiles == [t for t in lattice(h, w, tile, overlap) if t.intersects(core)]
        seen = np.zeros(core.shape, bool)
        for t in tiles:
            assert 0 <= t.y0 < t.y1 <= h and 0 <= t.x0 < t.x1 <= w
            assert t.shape == (min(tile, h), min(tile, w))
            y0, y1, x0, x1 = max(t.y0, core.y0), min(t.y1, core.y1), max(t.x0, core.x0), min(t.x1, core.x1)
            seen[y0 - core.y0:y1 - core.y0, x0 - core.x0:x1 - core.x0] = True
        assert seen.all()
        rw = read_window(tiles)
        assert rw.y0 <= core.y0 and rw.x0 <= core.x0 and rw.y1 >= core.y1 and rw.x1 >= core.x1
    assert (cover == 1).all()  # every output pixel belongs to exactly one unit's core


@settings(max_examples=100, deadline=None)
@given(length=st.integers(1, 500), tiling=tilings())
def test_axis_starts_step_and_end_flush(length, tiling) -> None:
    tile, overlap = tiling
    starts = axis_starts(length, tile, overlap)
    assert starts[0] == 0 and starts == sorted(set(starts))
    assert min(starts[-1] + tile, length) == length
    assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


@settings(max_examples=30, deadline=None)
@given(shape=st.tuples(st.integers(1, 90), st.integers(1, 90)), chunk=st.integers(16, 64), tiling=tilings(),
       blend=st.sampled_from(["gaussian", "linear"]), seed=st.integers(0, 2**16))
def test_tiled_equals_whole_for_a_pointwise_model(shape, chunk, tiling, blend, seed) -> None:
    h, w = shape
    tile, overlap = tiling
    image = np.random.default_rng(seed).integers(0, 255, (h, w, 2)).astype(np.uint8)
    conv = torch.nn.Conv2d(2, 3, 1)
    torch.manual_seed(seed)
    torch.nn.init.normal_(conv.weight)
    with torch.no_grad():
        whole = conv(_to_input(image[None]))[0].numpy()
        out = np.zeros_like(whole)
        for core in chunk_windows(h, w, chunk):
            tiles = tiles_for(core, h, w, tile, overlap)
            rw = read_window(tiles)
            out[:, core.y0:core.y1, core.x0:core.x1] = blend_block(
                conv, image[rw.y0:rw.y1, rw.x0:rw.x1], (rw.y0, rw.x0), core, tiles, to_input=_to_input,
                blend=blend, overlap=overlap, batch_size=3)
    np.testing.assert_allclose(out, whole, rtol=1e-4, atol=1e-3)


def test_blocks_agree_with_one_global_sliding_window() -> None:
    """A contextual model: the blocks' blended logits equal those of one whole-image sliding window."""
    h, w, tile, overlap = 150, 170, 48, 16
    image = np.random.default_rng(0).integers(0, 255, (h, w, 1)).astype(np.uint8)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 5, padding=2), torch.nn.ReLU(), torch.nn.Conv2d(4, 2, 5, padding=2))
    whole_core = Window(0, h, 0, w)
    with torch.no_grad():
        reference = blend_block(model, image, (0, 0), whole_core, lattice(h, w, tile, overlap), to_input=_to_input,
                                overlap=overlap)
        for core in chunk_windows(h, w, 64):
            tiles = tiles_for(core, h, w, tile, overlap)
            rw = read_window(tiles)
            got = blend_block(model, image[rw.y0:rw.y1, rw.x0:rw.x1], (rw.y0, rw.x0), core, tiles,
                              to_input=_to_input, overlap=overlap)
            np.testing.assert_allclose(got, reference[:, core.y0:core.y1, core.x0:core.x1], rtol=1e-5, atol=1e-5)


def test_flip_tta_of_a_pointwise_model_is_the_model() -> None:
    conv = torch.nn.Conv2d(1, 2, 1)
    x = torch.rand(2, 1, 9, 11)
    with torch.no_grad():
        torch.testing.assert_close(flip_tta(conv)(x), conv(x))


@pytest.mark.parametrize("blend", ["gaussian", "linear"])
def test_weights_peak_in_the_middle_and_stay_positive(blend) -> None:
    wts = tile_weights(64, 48, blend=blend, overlap=16)
    assert wts.shape == (64, 48) and wts.dtype == np.float32
    assert wts.max() == pytest.approx(1.0) and wts.min() >= MIN_WEIGHT
    np.testing.assert_allclose(wts, wts[::-1, ::-1])
    assert wts[32, 24] >= wts[0, 0]
    with pytest.raises(ValueError):
        wts[0, 0] = 2.0  # shared (cached) array


def test_bad_tilings_are_refused() -> None:
    for tile, overlap in ((0, 0), (16, 16), (16, -1), (8.5, 0)):
        with pytest.raises(ConfigError):
            axis_starts(100, tile, overlap)
    with pytest.raises(ConfigError, match="blend"):
        tile_weights(8, 8, blend="cosine")


def _discs(h: int, w: int, n: int, seed: int, rmax: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.zeros((h, w), np.uint32)
    yy, xx = np.ogrid[:h, :w]
    for k in range(1, n + 1):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(2, rmax + 1)
        labels[((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r) & (labels == 0)] = k
    return labels


def _perfect_detector(labels: np.ndarray, window: Window) -> tuple[np.ndarray, list[dict]]:
    """What an ideal instance model sees in a window: the objects as cut by the window."""
    crop = labels[window.y0:window.y1, window.x0:window.x1]
    records = []
    for oid in np.unique(crop):
        if oid == 0:
            continue
        ys, xs = np.nonzero(crop == oid)
        records.append({"instance_id": int(oid), "class_id": 1, "score": 0.9,
                        "bbox": (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)})
    return crop, records


@settings(max_examples=25, deadline=None)
@given(shape=st.tuples(st.integers(20, 160), st.integers(20, 160)), chunk=st.integers(24, 80),
       seed=st.integers(0, 2**16))
def test_stitching_reproduces_every_object_when_the_halo_exceeds_it(shape, chunk, seed) -> None:
    h, w = shape
    rmax = 6
    labels = _discs(h, w, n=max(1, h * w // 400), seed=seed, rmax=rmax)
    halo = 2 * rmax + 2
    cores = chunk_windows(h, w, chunk)
    blocks = []
    for core in cores:
        window = core.grow(halo, h, w)
        crop, records = _perfect_detector(labels, window)
        blocks.append(keep_core_objects(crop, records, window, core, h, w))
    assert sum(len(b) for b in blocks) == len(np.unique(labels)) - 1  # each object kept exactly once
    assert not any(b.cut_risk.any() for b in blocks)
    firsts = np.cumsum([1] + [len(b) for b in blocks])[:-1]
    out = np.zeros((h, w), np.uint32)
    for core in cores:
        ids, classes = paste_objects(core, list(zip(firsts.tolist(), blocks)))
        out[core.y0:core.y1, core.x0:core.x1] = ids
        assert ((classes > 0) == (ids > 0)).all()
    # the same partition of the pixels, up to renaming: no object split, none merged, none duplicated
    pairs = {(int(a), int(b)) for a, b in zip(labels.ravel(), out.ravel())}
    assert len({a for a, _ in pairs}) == len(pairs) == len({b for _, b in pairs})
    # objects on seams = objects whose box does not fit in one core
    from scipy.ndimage import find_objects

    crossing = sum(1 for sl in find_objects(labels.astype(np.int32)) if sl is not None
                   and any(s.start // chunk != (s.stop - 1) // chunk for s in sl))
    assert sum(b.on_seams for b in blocks) == sum(objects_on_seams(b, c) for b, c in zip(blocks, cores)) == crossing


def test_objects_larger_than_the_halo_are_reported() -> None:
    h, w = 64, 128
    labels = np.zeros((h, w), np.uint32)
    labels[10:50, 20:110] = 1  # 90 px wide, crosses the seam at x = 64
    cores = chunk_windows(h, w, 64)
    flagged = 0
    for core in cores:
        window = core.grow(8, h, w)
        crop, records = _perfect_detector(labels, window)
        block = keep_core_objects(crop, records, window, core, h, w)
        flagged += int(block.cut_risk.sum())
        assert block.duplicates_dropped + len(block) == len(records)
    assert flagged >= 1
