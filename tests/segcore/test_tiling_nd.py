"""Tests for the N-D semantic tiling of segcore.tiling: exact coverage of cores and tiles in 3-D
(Hypothesis), tiled == whole for a 3-D convolutional model, per-axis weights and flips, the
refusal of bad tilings, and the 2-D results equal to the 2-D implementation that came before
the N-D one, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from segcore.errors import ConfigError
from segcore.tiling import (MIN_WEIGHT, Window, WindowND, axis_starts, blend_block, blend_block_nd, chunk_windows,
                            chunk_windows_nd, flip_tta, lattice, lattice_nd, read_window, read_window_nd,
                            tile_weights, tile_weights_nd, tiles_for, tiles_for_nd)


@st.composite
def tilings_nd(draw, ndim: int, tiles: tuple[int, int] = (3, 12)):
    """Per-axis ``(tile, overlap)``, each once as an int for all axes or as a tuple."""
    tile = tuple(draw(st.integers(*tiles)) for _ in range(ndim))
    overlap = tuple(draw(st.integers(0, t - 1)) for t in tile)
    return (tile[0], overlap[0]) if draw(st.booleans()) else (tile, overlap)


def _to_input(raw: np.ndarray) -> torch.Tensor:
    """``(B, *spatial, C)`` uint8 -> ``(B, C, *spatial)`` float32 in [0, 1]."""
    return torch.from_numpy(raw.astype(np.float32) / 255.0).movedim(-1, 1)


def _conv3d_model(channels: int, classes: int, seed: int) -> torch.nn.Module:
    """A 3x3x3 convolution, ReLU, a 1x1x1 convolution: receptive field 3^3 (1 voxel each side); fixed weights."""
    model = torch.nn.Sequential(torch.nn.Conv3d(channels, 6, 3, padding="same"), torch.nn.ReLU(),
                                torch.nn.Conv3d(6, classes, 1))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.eval()


@settings(max_examples=60, deadline=None)
@given(shape=st.tuples(*[st.integers(1, 24)] * 3), chunk=st.tuples(*[st.integers(3, 16)] * 3), tiling=tilings_nd(3))
def test_3d_cores_partition_the_volume_and_tiles_cover_every_voxel(shape, chunk, tiling) -> None:
    tile, overlap = tiling
    tiles_per_axis = (tile,) * 3 if isinstance(tile, int) else tile
    grid = lattice_nd(shape, tile, overlap)
    covered = np.zeros(shape, bool)
    for t in grid:
        assert all(0 <= a < b <= n for a, b, n in zip(t.start, t.stop, shape))
        assert t.shape == tuple(min(k, n) for k, n in zip(tiles_per_axis, shape))
        covered[t.slices()] = True
    assert covered.all()  # the lattice tiles cover every voxel
    owners = np.zeros(shape, np.int32)
    for core in chunk_windows_nd(shape, chunk):
        owners[core.slices()] += 1
        tiles = tiles_for_nd(core, shape, tile, overlap)
        assert tiles == [t for t in grid if t.intersects(core)]  # exactly the lattice tiles touching it
        seen = np.zeros(core.shape, bool)
        for t in tiles:
            seen[t.intersection(core).slices(core.start)] = True
        assert seen.all()
        rw = read_window_nd(tiles)
        assert rw.intersection(core) == core  # the read window holds the core
    assert (owners == 1).all()  # every voxel belongs to exactly one core


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_3d_tiled_equals_one_whole_volume_sliding_window_and_the_whole_forward(seed) -> None:
    """Cores of a (20, 40, 36) volume blended from (8, 16, 16) tiles overlapping by (4, 8, 8) give the
    logits of one whole-volume sliding window; the receptive field (3 voxels) is smaller than
    the overlap, so the labels are those of one forward pass over the whole volume on >= 99.9 %."""
    shape, tile, overlap, chunk = (20, 40, 36), (8, 16, 16), (4, 8, 8), (7, 16, 20)
    volume = np.random.default_rng(seed).integers(0, 255, shape + (2,)).astype(np.uint8)
    model = _conv3d_model(2, 3, seed=seed)
    with torch.no_grad():
        whole = WindowND((0, 0, 0), shape)
        reference = blend_block_nd(model, volume, (0, 0, 0), whole, lattice_nd(shape, tile, overlap),
                                   to_input=_to_input, overlap=overlap, batch_size=4)
        forward = model(_to_input(volume[None]))[0].numpy()
        tiled = np.full((3,) + shape, np.nan, np.float32)
        cores = chunk_windows_nd(shape, chunk)
        assert len(cores) == 3 * 3 * 2
        for core in cores:
            tiles = tiles_for_nd(core, shape, tile, overlap)
            rw = read_window_nd(tiles)
            got = blend_block_nd(model, volume[rw.slices()], rw.start, core, tiles, to_input=_to_input,
                                 overlap=overlap, batch_size=3)
            assert got.shape == (3,) + core.shape and got.dtype == np.float32
            tiled[(slice(None),) + core.slices()] = got
    np.testing.assert_allclose(tiled, reference, rtol=1e-5, atol=1e-5)
    agree = (tiled.argmax(axis=0) == forward.argmax(axis=0)).mean()
    assert agree >= 0.999, f"tiled and whole-volume labels agree on {agree:.5f} of the voxels"
    # the blend is not a no-op: tiles near their inner edges see zero padding, not the neighbours
    assert not np.allclose(tiled, forward, atol=1e-4)


@pytest.mark.parametrize("blend", ["gaussian", "linear"])
def test_3d_tiled_equals_whole_for_a_pointwise_model(blend) -> None:
    shape = (9, 21, 17)
    volume = np.random.default_rng(1).integers(0, 255, shape + (1,)).astype(np.uint8)
    model = torch.nn.Conv3d(1, 2, 1)
    with torch.no_grad():
        whole = model(_to_input(volume[None]))[0].numpy()
        out = np.zeros_like(whole)
        for core in chunk_windows_nd(shape, (4, 8, 8)):
            tiles = tiles_for_nd(core, shape, (5, 8, 6), (2, 3, 1))
            rw = read_window_nd(tiles)
            out[(slice(None),) + core.slices()] = blend_block_nd(
                model, volume[rw.slices()], rw.start, core, tiles, to_input=_to_input, blend=blend,
                overlap=(2, 3, 1), batch_size=5)
    np.testing.assert_allclose(out, whole, rtol=1e-5, atol=1e-5)


def test_window_nd_grows_intersects_and_slices() -> None:
    w = WindowND((2, 5, 0), (4, 9, 3))
    assert w.ndim == 3 and w.shape == (2, 4, 3)
    assert w.grow(1, (10, 10, 10)) == WindowND((1, 4, 0), (5, 10, 4))
    assert w.grow((0, 2, 5), (4, 20, 6)) == WindowND((2, 3, 0), (4, 11, 6))
    assert w.slices() == (slice(2, 4), slice(5, 9), slice(0, 3))
    assert w.slices((1, 5, 0)) == (slice(1, 3), slice(0, 4), slice(0, 3))
    assert w.intersects(WindowND((3, 8, 2), (9, 9, 9)))
    assert not w.intersects(WindowND((3, 9, 2), (9, 12, 9)))  # touches at y = 9 only: half-open
    assert w.intersection(WindowND((3, 0, 1), (9, 6, 9))) == WindowND((3, 5, 1), (4, 6, 3))
    assert w.intersection(WindowND((5, 0, 0), (6, 1, 1))).shape == (0, 0, 1)  # empty
    assert Window(1, 4, 2, 7).nd == WindowND((1, 2), (4, 7))
    assert Window.from_nd(Window(1, 4, 2, 7).nd) == Window(1, 4, 2, 7)
    with pytest.raises(ConfigError, match="one value per axis"):
        WindowND((0, 0), (1, 1, 1))
    with pytest.raises(ConfigError, match="integers"):
        WindowND((0, 0.5), (1, 1))


def test_3d_lattice_by_hand() -> None:
    # D: 10 voxels, tile 4, step 3 -> 0, 3, 6 (flush); H: 5 <= tile 8 -> one tile;
    # W: 7 voxels, tile 4, overlap 0 -> 0, 3 (moved back to end flush)
    grid = lattice_nd((10, 5, 7), (4, 8, 4), (1, 0, 0))
    assert [t.start for t in grid] == [(0, 0, 0), (0, 0, 3), (3, 0, 0), (3, 0, 3), (6, 0, 0), (6, 0, 3)]
    assert {t.shape for t in grid} == {(4, 5, 4)}
    core = WindowND((4, 0, 0), (5, 5, 3))
    assert [t.start for t in tiles_for_nd(core, (10, 5, 7), (4, 8, 4), (1, 0, 0))] == [(3, 0, 0)]
    assert chunk_windows_nd((5, 3), (2, 3)) == [WindowND((0, 0), (2, 3)), WindowND((2, 0), (4, 3)),
                                                WindowND((4, 0), (5, 3))]


def test_nd_weights_are_the_product_of_per_axis_weights() -> None:
    lin = tile_weights_nd((3, 4, 5), "linear", (1, 1, 2))
    d, h, w = np.array([.5, 1, .5]), np.array([.5, 1, 1, .5]), np.array([1, 2, 3, 2, 1]) / 3
    np.testing.assert_allclose(lin, np.einsum("i,j,k->ijk", d, h, w), rtol=1e-6)
    gauss = tile_weights_nd((8, 16, 12))
    per_axis = [np.exp(-((np.arange(n) - (n - 1) / 2) ** 2) / (2 * (n / 8) ** 2)) for n in (8, 16, 12)]
    product = np.einsum("i,j,k->ijk", *per_axis)
    assert gauss.dtype == np.float32 and gauss.max() == pytest.approx(1.0)
    assert 0 < gauss.min() < MIN_WEIGHT**2  # not floored in 3-D: a face voxel keeps its ratios
    np.testing.assert_allclose(gauss, product / product.max(), rtol=1e-6)
    plane = np.outer(*per_axis[:2])
    np.testing.assert_allclose(tile_weights_nd((8, 16)), np.maximum(plane / plane.max(), MIN_WEIGHT),
                               rtol=1e-6)  # 2-D: floored, as always
    assert tile_weights_nd((8, 16, 12)) is gauss  # cached: shared, read-only
    with pytest.raises(ValueError):
        gauss[0, 0, 0] = 2.0


def test_flip_tta_mirrors_every_spatial_axis_of_a_volume() -> None:
    """A model adding its D coordinate: averaged over D flips, the coordinate becomes (D - 1) / 2."""
    calls = []

    def model(x: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return x + torch.arange(x.shape[2], dtype=x.dtype).view(1, 1, -1, 1, 1)

    x = torch.rand(2, 1, 5, 4, 3)
    torch.testing.assert_close(flip_tta(model)(x), x + 2.0)
    assert len(calls) == 8
    calls.clear()
    torch.testing.assert_close(flip_tta(model, axes=(1, 2))(x), model(x))  # in-plane only: D kept
    assert len(calls) == 4 + 1
    with pytest.raises(ConfigError, match="spatial axes"):
        flip_tta(model, axes=(3,))(x)
    calls.clear()  # a volume of one slice (2-D images through a volumetric model): D flips to itself
    one = torch.rand(2, 1, 1, 4, 3)
    torch.testing.assert_close(flip_tta(model)(one), flip_tta(model, axes=(1, 2))(one))
    assert len(calls) == 4 + 4


def test_bad_nd_tilings_are_refused() -> None:
    shape = (20, 40, 36)
    for tile, overlap, match in (((8, 16), 0, "2 values but the data has 3"), ((8, 0, 8), 0, "axis 1"),
                                 ((8, 16, 16), (4, 16, 8), "axis 1"), ((8, 16, 16), (4, 8, -1), "axis 2"),
                                 ((8, 16, 16), (4, 8, 8, 8), "4 values"), ((8, 16.0, 16), 0, "axis 1"),
                                 ("8", 0, "integer"), (8, 8, "overlap")):
        with pytest.raises(ConfigError, match=match):
            lattice_nd(shape, tile, overlap)
        with pytest.raises(ConfigError, match=match):
            tiles_for_nd(WindowND((0, 0, 0), (1, 1, 1)), shape, tile, overlap)
    for chunk in (0, (4, 0, 4), (4, 4)):
        with pytest.raises(ConfigError, match="chunk size"):
            chunk_windows_nd(shape, chunk)
    with pytest.raises(ConfigError, match="has 2 axes"):
        tiles_for_nd(WindowND((0, 0), (1, 1)), shape, 8, 4)
    with pytest.raises(ConfigError, match="channels last"):  # a volume without its channel axis
        blend_block_nd(torch.nn.Identity(), np.zeros((8, 8, 8)), (0, 0, 0), WindowND((0, 0, 0), (8, 8, 8)),
                       lattice_nd((8, 8, 8), 8, 0), to_input=_to_input)
    with pytest.raises(ConfigError, match="blend"):
        tile_weights_nd((4, 4, 4), blend="cosine")
    with pytest.raises(ConfigError, match="overlap"):
        tile_weights_nd((4, 4, 4), blend="linear", overlap=(1, 1))


# --- The 2-D implementation before the N-D one (reference for bit-identical 2-D results) ---

def _old_tiles_for(core, height, width, tile, overlap):
    ys = [y for y in axis_starts(height, tile, overlap) if y < core.y1 and core.y0 < min(y + tile, height)]
    xs = [x for x in axis_starts(width, tile, overlap) if x < core.x1 and core.x0 < min(x + tile, width)]
    return [Window(y, min(y + tile, height), x, min(x + tile, width)) for y in ys for x in xs]


def _old_tile_weights(height, width, blend, overlap):
    def axis(n):
        i = np.arange(n, dtype=np.float64)
        if blend == "gaussian":
            sigma = max(n / 8.0, 1e-6)
            return np.exp(-((i - (n - 1) / 2.0) ** 2) / (2.0 * sigma**2))
        return np.clip(np.minimum(i + 1, n - i) / (max(int(overlap), 1) + 1), 0.0, 1.0)

    w = np.outer(axis(height), axis(width))
    return np.maximum(w / w.max(), MIN_WEIGHT).astype(np.float32)


def _old_blend_block(logits_of, image, origin, core, tiles, *, to_input, blend, overlap, batch_size):
    oy, ox = origin
    acc = None
    wsum = np.zeros(core.shape, dtype=np.float32)
    by_shape = {}
    for t in tiles:
        by_shape.setdefault(t.shape, []).append(t)
    for shape, group in by_shape.items():
        weights = _old_tile_weights(*shape, blend, overlap)
        for s in range(0, len(group), batch_size):
            batch = group[s:s + batch_size]
            out = logits_of(to_input(np.stack([image[t.y0 - oy:t.y1 - oy, t.x0 - ox:t.x1 - ox] for t in batch])))
            out = out.float().cpu().numpy()
            if acc is None:
                acc = np.zeros((out.shape[1],) + core.shape, dtype=np.float32)
            for t, logits in zip(batch, out):
                y0, y1, x0, x1 = max(t.y0, core.y0), min(t.y1, core.y1), max(t.x0, core.x0), min(t.x1, core.x1)
                w = weights[y0 - t.y0:y1 - t.y0, x0 - t.x0:x1 - t.x0]
                acc[:, y0 - core.y0:y1 - core.y0, x0 - core.x0:x1 - core.x0] += (
                    logits[:, y0 - t.y0:y1 - t.y0, x0 - t.x0:x1 - t.x0] * w)
                wsum[y0 - core.y0:y1 - core.y0, x0 - core.x0:x1 - core.x0] += w
    return acc / wsum


def _old_flip_tta(model):
    def run(x):
        total = model(x).float()
        for dims in ((-1,), (-2,), (-2, -1)):
            total += model(x.flip(dims)).float().flip(dims)
        return total / 4.0

    return run


@settings(max_examples=20, deadline=None)
@given(shape=st.tuples(st.integers(1, 64), st.integers(1, 64)), chunk=st.integers(8, 40),
       tiling=st.integers(4, 40).flatmap(lambda t: st.tuples(st.just(t), st.integers(0, 3 * t // 4))),
       blend=st.sampled_from(["gaussian", "linear"]), seed=st.integers(0, 2**16))
def test_2d_results_equal_the_previous_2d_implementation_bit_for_bit(shape, chunk, tiling, blend, seed) -> None:
    (h, w), (tile, overlap) = shape, tiling
    image = np.random.default_rng(seed).integers(0, 255, (h, w, 2)).astype(np.uint8)
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(3, 2, 3, padding=1))
    old_cores = [Window(y, min(y + chunk, h), x, min(x + chunk, w))
                 for y in range(0, h, chunk) for x in range(0, w, chunk)]
    assert chunk_windows(h, w, chunk) == old_cores
    assert chunk_windows_nd((h, w), chunk) == [c.nd for c in old_cores]
    assert lattice(h, w, tile, overlap) == _old_tiles_for(Window(0, h, 0, w), h, w, tile, overlap)
    th, tw = min(tile, h), min(tile, w)
    assert np.array_equal(tile_weights(th, tw, blend=blend, overlap=overlap), _old_tile_weights(th, tw, blend, overlap))
    with torch.no_grad():
        for core in old_cores:
            old_tiles = _old_tiles_for(core, h, w, tile, overlap)
            tiles = tiles_for(core, h, w, tile, overlap)
            tiles_nd = tiles_for_nd(core.nd, (h, w), tile, (overlap, overlap))
            assert tiles == old_tiles and tiles_nd == [t.nd for t in old_tiles]
            rw = read_window(tiles)
            assert rw == Window(min(t.y0 for t in old_tiles), max(t.y1 for t in old_tiles),
                                min(t.x0 for t in old_tiles), max(t.x1 for t in old_tiles))
            assert read_window_nd(tiles_nd) == rw.nd
            crop, origin = image[rw.y0:rw.y1, rw.x0:rw.x1], (rw.y0, rw.x0)
            kw = dict(to_input=_to_input, blend=blend, overlap=overlap, batch_size=3)
            expected = _old_blend_block(model, crop, origin, core, old_tiles, **kw)
            assert np.array_equal(blend_block(model, crop, origin, core, tiles, **kw), expected)
            assert np.array_equal(blend_block_nd(model, crop, origin, core.nd, tiles_nd, **kw), expected)
        x = torch.from_numpy(image[None].astype(np.float32)).movedim(-1, 1)
        if min(h, w) > 1:
            assert torch.equal(flip_tta(model)(x), _old_flip_tta(model)(x))
        else:  # an axis of size 1 flips to itself: its repeated passes are left out, the mean is the same
            torch.testing.assert_close(flip_tta(model)(x), _old_flip_tta(model)(x))

