"""Tests for segcore.collection.imageio: files written with Pillow/tifffile under tmp_path, read back."""

from __future__ import annotations

import hashlib
import struct
import zlib
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from segcore.errors import ConfigError, ImageReadError, NotFound, SegflowError
from segcore.collection.imageio import (
    IMAGE_SUFFIXES,
    ImageInfo,
    _pillow_layout,
    non_finite_counts,
    probe_image,
    read_image,
    read_mask,
    write_png,
)

NUCLEI = Path(__file__).resolve().parents[2] / "data" / "nuclei"

GRAY8 = np.array([[0, 1, 2, 3], [10, 20, 30, 40], [100, 200, 254, 255]], dtype=np.uint8)  # (3, 4)
GRAY16 = np.array([[0, 1, 256, 1000], [4095, 4096, 30000, 40000], [60000, 65534, 65535, 7]], dtype=np.uint16)
RGB8 = np.stack([GRAY8, 255 - GRAY8, np.full_like(GRAY8, 7)], axis=-1)  # (3, 4, 3)
RGBA8 = np.concatenate([RGB8, np.full((3, 4, 1), 128, np.uint8)], axis=-1)  # (3, 4, 4)
LA8 = np.stack([GRAY8, np.full_like(GRAY8, 9)], axis=-1)  # (3, 4, 2)
PALETTE = [0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255]  # index 0 black, 1 red, 2 green, 3 blue
INDICES = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [1, 1, 0, 2]], dtype=np.uint8)
BITS = np.array([[1, 0, 0, 1], [0, 1, 1, 0], [0, 0, 0, 1]], dtype=bool)
FLOAT = np.array([[0.0, -1.5, 2.25, 1e6], [3.0, 0.125, -0.0, 7.5], [1.0, 2.0, 3.0, 4.0]], dtype=np.float32)


def _palette_png(path: Path, *, transparency: int | None = None) -> Path:
    im = Image.frombytes("P", (INDICES.shape[1], INDICES.shape[0]), INDICES.tobytes())
    im.putpalette(PALETTE)
    extra = {} if transparency is None else {"transparency": transparency}
    im.save(path, **extra)
    return path


def _png(path: Path, array: np.ndarray) -> Path:
    Image.fromarray(array).save(path)
    return path


def _bits_png(path: Path) -> Path:
    Image.fromarray(BITS.astype(np.uint8) * 255).convert("1").save(path)
    return path


def _tiff(path: Path, array: np.ndarray, **kwargs: object) -> Path:
    tifffile.imwrite(path, array, **kwargs)
    return path


# name -> (writer(tmp_path) -> path, expected (H, W, C) array of read_image)
EXACT_CASES: dict[str, tuple[Callable[[Path], Path], np.ndarray]] = {
    "png_gray8": (lambda d: _png(d / "g8.png", GRAY8), GRAY8[..., None]),
    "png_gray16": (lambda d: _png(d / "g16.png", GRAY16), GRAY16[..., None]),
    "png_rgb": (lambda d: _png(d / "rgb.png", RGB8), RGB8),
    "png_rgba": (lambda d: _png(d / "rgba.png", RGBA8), RGBA8),
    "png_la": (lambda d: _png(d / "la.png", LA8), LA8),
    "png_palette": (
        lambda d: _palette_png(d / "p.png"),
        np.array(PALETTE, np.uint8).reshape(4, 3)[INDICES],
    ),
    "png_palette_transparent": (
        lambda d: _palette_png(d / "pt.png", transparency=0),
        np.concatenate(
            [np.array(PALETTE, np.uint8).reshape(4, 3)[INDICES], np.where(INDICES == 0, 0, 255)[..., None]], axis=-1
        ).astype(np.uint8),
    ),
    "png_1bit": (lambda d: _bits_png(d / "b.png"), (BITS.astype(np.uint8) * 255)[..., None]),
    "bmp_rgb": (lambda d: _png(d / "rgb.bmp", RGB8), RGB8),
    "tif_uint16_2d": (lambda d: _tiff(d / "g16.tif", GRAY16), GRAY16[..., None]),
    "tif_uint16_bigendian": (lambda d: _tiff(d / "be.tiff", GRAY16, byteorder=">"), GRAY16[..., None]),
    "tif_rgb": (lambda d: _tiff(d / "rgb.tif", RGB8, photometric="rgb"), RGB8),
    "tif_rgb_planar": (
        lambda d: _tiff(d / "planar.tif", np.moveaxis(RGB8, -1, 0), photometric="rgb", planarconfig="separate"),
        RGB8,
    ),
    "tif_float32": (lambda d: _tiff(d / "f.tif", FLOAT), FLOAT[..., None]),
    "tif_float32_2ch": (
        lambda d: _tiff(d / "f2.tif", np.stack([FLOAT, -FLOAT], -1), photometric="minisblack"),
        np.stack([FLOAT, -FLOAT], -1),
    ),
    "tif_bool": (lambda d: _tiff(d / "bits.tif", BITS), (BITS.astype(np.uint8) * 255)[..., None]),
    "tif_single_page_stack": (
        lambda d: _tiff(d / "one.tif", np.tile(GRAY16, (2, 2))[None], photometric="minisblack"),
        np.tile(GRAY16, (2, 2))[..., None],
    ),
    "tif_imagej_channels_first": (
        lambda d: _tiff(d / "ij.tif", np.stack([GRAY16, GRAY16 // 2]), imagej=True, metadata={"axes": "CYX"}),
        np.stack([GRAY16, GRAY16 // 2], axis=-1),
    ),
}

# JPEG is lossy: exact shape and dtype, values within a tolerance.
JPEG_CASES: dict[str, tuple[np.ndarray, str]] = {
    "gray": (np.full((16, 16), 120, np.uint8), "L"),
    "rgb": (np.broadcast_to(np.array([200, 60, 20], np.uint8), (16, 16, 3)).copy(), "RGB"),
}


@pytest.mark.parametrize("name", sorted(EXACT_CASES))
def test_read_image_round_trip(tmp_path: Path, name: str) -> None:
    writer, expected = EXACT_CASES[name]
    path = writer(tmp_path)
    got = read_image(path)
    assert got.dtype == expected.dtype
    assert got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    assert got.dtype.isnative and got.flags.writeable and got.flags.c_contiguous


@pytest.mark.parametrize("name", sorted(EXACT_CASES))
def test_probe_image_agrees_with_read_image(tmp_path: Path, name: str) -> None:
    path = EXACT_CASES[name][0](tmp_path)
    got = read_image(path)
    info = probe_image(path)
    assert info == ImageInfo(height=got.shape[0], width=got.shape[1], channels=got.shape[2], dtype=got.dtype.name)
    assert info.shape == got.shape


@pytest.mark.parametrize("name", sorted(JPEG_CASES))
@pytest.mark.parametrize("suffix", [".jpg", ".JPEG"])
def test_read_jpeg_approximately(tmp_path: Path, name: str, suffix: str) -> None:
    array, mode = JPEG_CASES[name]
    path = tmp_path / f"{name}{suffix}"
    image = Image.fromarray(array)
    assert image.mode == mode
    image.save(path, format="JPEG", quality=95)
    got = read_image(path)
    expected = array.reshape(16, 16, -1)
    assert got.shape == expected.shape and got.dtype == np.uint8
    assert np.abs(got.astype(int) - expected.astype(int)).max() <= 3
    assert probe_image(path) == ImageInfo(height=16, width=16, channels=expected.shape[2], dtype="uint8")


def test_png_mode_i_is_read_as_uint16() -> None:
    # Older Pillow versions open 16-bit grayscale PNG in mode "I"; a PNG never exceeds 16 bits.
    im = Image.fromarray(GRAY16.astype(np.int32))
    assert im.mode == "I"
    assert _pillow_layout(im, Path("x.tif")) == (None, "int32", 1)
    im.format = "PNG"
    assert _pillow_layout(im, Path("x.png")) == (None, "uint16", 1)


# ---------------------------------------------------------------- failures


@pytest.mark.parametrize("reader", [read_image, read_mask, probe_image])
def test_missing_file_is_not_found(tmp_path: Path, reader: Callable[[Path], object]) -> None:
    path = tmp_path / "nope.png"
    with pytest.raises(NotFound, match="nope.png") as info:
        reader(path)
    assert isinstance(info.value, FileNotFoundError)


@pytest.mark.parametrize("reader", [read_image, read_mask, probe_image])
def test_unknown_suffix_and_directory_are_refused(tmp_path: Path, reader: Callable[[Path], object]) -> None:
    gif = tmp_path / "anim.gif"
    Image.fromarray(GRAY8).save(gif)
    with pytest.raises(ImageReadError, match=r"unsupported suffix '\.gif'"):
        reader(gif)
    folder = tmp_path / "folder.png"
    folder.mkdir()
    with pytest.raises(ImageReadError, match="not a file"):
        reader(folder)


@pytest.mark.parametrize("name", ["junk.png", "junk.tif", "junk.jpg", "empty.tiff"])
@pytest.mark.parametrize("reader", [read_image, read_mask, probe_image])
def test_corrupt_file_is_image_read_error(tmp_path: Path, name: str, reader: Callable[[Path], object]) -> None:
    path = tmp_path / name
    path.write_bytes(b"" if name.startswith("empty") else b"this is not an image at all")
    with pytest.raises(ImageReadError, match=re.escape(str(path))) as info:
        reader(path)
    assert isinstance(info.value, OSError)
    if name.startswith("empty"):  # refused before any decoder sees it
        assert "the file is empty (0 bytes)" in str(info.value)
    else:
        assert info.value.__cause__ is not None  # converted at the seam, original kept


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("reader", [read_image, read_mask])
def test_truncated_file_is_image_read_error(tmp_path: Path, suffix: str, reader: Callable[[Path], object]) -> None:
    rng = np.random.default_rng(0)
    full, cut = tmp_path / f"full{suffix}", tmp_path / f"cut{suffix}"
    noise = rng.integers(0, 255, (64, 64), dtype=np.uint8)  # noise does not compress: truncation bites
    if suffix == ".png":
        Image.fromarray(noise).save(full)
    else:
        tifffile.imwrite(full, noise)
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(ImageReadError, match="cut"):
        reader(cut)


@pytest.mark.parametrize("reader", [read_image, read_mask, probe_image])
def test_3d_stack_is_refused_with_its_shape(tmp_path: Path, reader: Callable[[Path], object]) -> None:
    path = _tiff(tmp_path / "stack.tif", np.zeros((3, 8, 8), np.uint16), photometric="minisblack")
    with pytest.raises(ImageReadError, match=r"only 2-D images.*\(3, 8, 8\)"):
        reader(path)


def test_multi_frame_png_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "anim.png"
    frames = [Image.fromarray(GRAY8), Image.fromarray(255 - GRAY8)]
    frames[0].save(path, save_all=True, append_images=frames[1:])
    with pytest.raises(ImageReadError, match="2 frames"):
        read_image(path)
    with pytest.raises(ImageReadError, match="2 frames"):
        probe_image(path)


# ---------------------------------------------------------------- masks


def test_palette_mask_gives_indices_not_colours(tmp_path: Path) -> None:
    path = _palette_png(tmp_path / "voc.png", transparency=0)
    got = read_mask(path)
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, INDICES)


@pytest.mark.parametrize(
    ("writer", "expected"),
    [
        (lambda d: _png(d / "g8.png", GRAY8), GRAY8),
        (lambda d: _png(d / "g16.png", GRAY16), GRAY16),
        (lambda d: _png(d / "grey_rgb.png", np.repeat(GRAY8[..., None], 3, -1)), GRAY8),
        (lambda d: _png(d / "grey_rgba.png", np.dstack([GRAY8, GRAY8, GRAY8, np.full_like(GRAY8, 255)])), GRAY8),
        (lambda d: _png(d / "grey_la.png", np.dstack([GRAY8, np.full_like(GRAY8, 255)])), GRAY8),
        (lambda d: _bits_png(d / "b.png"), BITS.astype(np.uint8)),
        (lambda d: _tiff(d / "m16.tif", GRAY16), GRAY16),
        (lambda d: _tiff(d / "m16_hw1.tif", GRAY16[..., None], photometric="minisblack"), GRAY16),
        (lambda d: _tiff(d / "m32.tif", GRAY16.astype(np.uint32) * 70000), GRAY16.astype(np.uint32) * 70000),
        (lambda d: _tiff(d / "i16.tif", GRAY8.astype(np.int16)), GRAY8.astype(np.uint16)),
        (lambda d: _tiff(d / "f32.tif", GRAY16.astype(np.float32)), GRAY16.astype(np.uint32)),
        (lambda d: _tiff(d / "bool.tif", BITS), BITS.astype(np.uint8)),
    ],
    ids=["gray8", "gray16", "grey_rgb", "grey_rgba", "grey_la", "1bit", "tif16", "tif_hw1", "tif32", "int16",
         "float32", "bool"],
)
def test_read_mask_values_and_dtype(tmp_path: Path, writer: Callable[[Path], Path], expected: np.ndarray) -> None:
    got = read_mask(writer(tmp_path))
    assert got.dtype == expected.dtype and got.dtype.isnative and got.flags.writeable and got.flags.c_contiguous
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize(
    ("writer", "message"),
    [
        (lambda d: _png(d / "colour.png", RGB8), "single-channel"),
        (lambda d: _png(d / "alpha.png", np.dstack([GRAY8, GRAY8, GRAY8, 255 - GRAY8])), "single-channel"),
        (lambda d: _tiff(d / "neg.tif", np.array([[0, -1], [2, 3]], np.int32)), "negative"),
        (lambda d: _tiff(d / "frac.tif", np.array([[0, 0.5], [2, 3]], np.float32)), "non-integer"),
        (lambda d: _tiff(d / "nan.tif", np.array([[0, np.nan], [2, 3]], np.float32)), "holds 1 NaN or infinite"),
        (lambda d: _tiff(d / "huge.tif", np.array([[0, 2**32], [2, 3]], np.int64)), "exceeds"),
    ],
    ids=["rgb_colours", "rgba_varying_alpha", "negative", "fraction", "nan", "too_large"],
)
def test_bad_masks_are_refused(tmp_path: Path, writer: Callable[[Path], Path], message: str) -> None:
    with pytest.raises(ImageReadError, match=message):
        read_mask(writer(tmp_path))


# ---------------------------------------------------------------- real data


def test_nuclei_files_match_their_recorded_digests() -> None:
    readme = (NUCLEI / "README.md").read_text()
    for name in ("img2d.tif", "mask2d.tif"):
        digest = hashlib.sha256((NUCLEI / name).read_bytes()).hexdigest()
        assert f"{digest}  {name}" in readme


def test_real_nuclei_image_and_mask() -> None:
    image = read_image(NUCLEI / "img2d.tif")
    assert image.shape == (512, 512, 1) and image.dtype == np.uint16
    assert (int(image.min()), int(image.max())) == (0, 235)
    assert probe_image(NUCLEI / "img2d.tif") == ImageInfo(height=512, width=512, channels=1, dtype="uint16")
    mask = read_mask(NUCLEI / "mask2d.tif")
    assert mask.shape == (512, 512) and mask.dtype == np.uint16
    labels = np.unique(mask)
    assert labels[0] == 0 and len(labels) - 1 == 125 and labels[-1] == 183


# ---------------------------------------------------------------- listing and ids


def test_image_suffixes_are_lower_case_with_dot() -> None:
    assert {".png", ".tif", ".tiff", ".jpg", ".jpeg"} <= IMAGE_SUFFIXES
    assert all(s == s.lower() and s.startswith(".") for s in IMAGE_SUFFIXES)


# ---------------------------------------------------------------- write_png


@settings(max_examples=30, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    array=st.one_of(
        hnp.arrays(np.uint8, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=9)),
        hnp.arrays(
            np.uint8,
            st.tuples(st.integers(1, 9), st.integers(1, 9), st.integers(1, 4)),
        ),
        hnp.arrays(np.uint16, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=9)),
    )
)
def test_write_png_round_trips_exactly(tmp_path: Path, array: np.ndarray) -> None:
    path = write_png(tmp_path / "nested" / "x.png", array)
    got = read_image(path)
    expected = array.reshape(array.shape[0], array.shape[1], -1)
    assert got.dtype == array.dtype
    np.testing.assert_array_equal(got, expected)
    assert probe_image(path).shape == expected.shape


@pytest.mark.parametrize(
    ("name", "array", "message"),
    [
        ("f.png", np.zeros((2, 2), np.float32), "uint8 or uint16"),
        ("c.png", np.zeros((2, 2, 3), np.uint16), "single-channel"),
        ("w.png", np.zeros((2, 2, 5), np.uint8), "C <= 4"),
        ("v.png", np.zeros(4, np.uint8), "shape"),
        ("t.tif", np.zeros((2, 2), np.uint8), r"\.png"),
    ],
)
def test_write_png_refuses_what_it_cannot_write(tmp_path: Path, name: str, array: np.ndarray, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        write_png(tmp_path / name, array)
    assert not (tmp_path / name).exists()


def test_errors_are_segflow_errors(tmp_path: Path) -> None:
    with pytest.raises(SegflowError):
        read_image(tmp_path / "missing.tif")


def test_non_finite_pixels_are_counted_per_pixel() -> None:
    image = np.zeros((2, 3, 2), np.float32)
    image[0, 0, 0] = np.nan
    image[0, 0, 1] = np.inf  # same pixel: counted once, as NaN
    image[1, 2, 1] = -np.inf
    image[1, 1, :] = np.inf
    assert non_finite_counts(image) == (1, 2)
    assert non_finite_counts(np.zeros((2, 2, 1), np.uint16)) == (0, 0)


def test_an_image_with_non_finite_pixels_is_refused_with_the_counts(tmp_path: Path) -> None:
    image = np.ones((64, 64), np.float32)
    image[:2] = np.nan  # 128 pixels
    image[2, :3] = -np.inf  # 3 pixels
    path = tmp_path / "nan.tif"
    tifffile.imwrite(path, image)
    with pytest.raises(ImageReadError, match=r"it has 131 non-finite pixels \(NaN 128, Inf 3\) of 4,096; replace them"):
        read_image(path)
    np.testing.assert_array_equal(read_image(path, allow_non_finite=True)[..., 0], image)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    """One PNG chunk: length, type, data, CRC."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_a_decompression_bomb_header_is_refused_without_decoding(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0))
                     + png_chunk(b"IDAT", zlib.compress(bytes(100))) + png_chunk(b"IEND", b""))
    with pytest.raises(ImageReadError, match="more pixels than the decoder's safety limit"):
        probe_image(path)
