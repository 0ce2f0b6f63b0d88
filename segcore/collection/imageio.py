"""Reading images and label masks from disk into plain numpy arrays.

Images come back as ``(H, W, C)`` arrays in their native dtype (uint8 stays uint8, 16-bit
stays uint16, float TIFF stays float32); masks come back as ``(H, W)`` unsigned integer label
arrays. TIFF files are decoded by tifffile, everything else by Pillow. Every failure is a
:class:`~segcore.errors.SegflowError` naming the file: :class:`~segcore.errors.NotFound` for a
missing file, :class:`~segcore.errors.ImageReadError` for anything that cannot be decoded.

Pixels are returned as stored: EXIF orientation is not applied, so images and their masks
stay aligned whatever viewer metadata says.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from segcore.errors import ConfigError, ImageReadError, NotFound, SegflowError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: frozenset[str] = frozenset({".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"})
"""Lower-case file suffixes that :func:`read_image` and :func:`read_mask` accept."""

VOLUME_SUFFIXES: frozenset[str] = frozenset({".nii", ".nii.gz", ".zarr"})
"""Suffixes of sources that are always volumes (:mod:`segcore.collection.volumes`; ``.zarr``: a
directory); a TIFF may be one too."""

SOURCE_SUFFIXES: frozenset[str] = IMAGE_SUFFIXES | VOLUME_SUFFIXES
"""Suffixes a collection's listing takes: 2-D images and volumes."""

_TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
_MAX_CHANNELS = 4

# What the decoders raise on a bad file. Kept explicit (not ``Exception``) so that a bug in
# this module is not reported as a bad image.
_DECODER_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes PIL.UnidentifiedImageError and "image file is truncated"
    ValueError,  # includes tifffile.TiffFileError and short reads
    SyntaxError,  # some Pillow plugins signal a broken header this way
    EOFError,
    struct.error,
    zlib.error,
    KeyError,
    IndexError,
    TypeError,
    RuntimeError,  # imagecodecs decoder errors
    Image.DecompressionBombError,
)

# Pillow mode -> (mode to convert to or None, dtype name, channels) for read_image.
# "P" becomes "RGBA" instead when its palette carries transparency (see _pillow_layout).
_PIL_IMAGE_MODES: dict[str, tuple[str | None, str, int]] = {
    "1": ("L", "uint8", 1),
    "L": (None, "uint8", 1),
    "LA": (None, "uint8", 2),
    "La": ("LA", "uint8", 2),
    "P": ("RGB", "uint8", 3),
    "PA": ("RGBA", "uint8", 4),
    "RGB": (None, "uint8", 3),
    "RGBA": (None, "uint8", 4),
    "RGBa": ("RGBA", "uint8", 4),
    "RGBX": ("RGB", "uint8", 3),
    "CMYK": ("RGB", "uint8", 3),
    "YCbCr": ("RGB", "uint8", 3),
    "I;16": (None, "uint16", 1),
    "I;16L": (None, "uint16", 1),
    "I;16B": (None, "uint16", 1),
    "I;16N": (None, "uint16", 1),
    "I": (None, "int32", 1),  # a PNG never exceeds 16 bits: uint16 there
    "F": (None, "float32", 1),
}

# Pillow modes whose raw array (no palette lookup) is a label map plus an alpha channel.
_PIL_MASK_ALPHA_MODES = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})

# dtype a non-native mask dtype becomes once its values are checked (unsigned, fixed width).
_LABEL_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32))


def file_suffix(path: str | os.PathLike[str]) -> str:
    """The lower-case suffix of a file name, ``".nii.gz"`` counted as one (``"a.NII.GZ"`` -> ``".nii.gz"``)."""
    name = os.fspath(path).replace("\\", "/").rsplit("/", 1)[-1].lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def without_suffix(name: str) -> str:
    """``name`` less its :func:`file_suffix` (``"sub/ct.nii.gz"`` -> ``"sub/ct"``, ``"a.ome.tif"`` -> ``"a.ome"``)."""
    suffix = file_suffix(name)
    return name[: len(name) - len(suffix)] if suffix else name


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """What :func:`read_image` would return for a file, known from its header alone.

    ``height`` and ``width`` are in pixels, ``channels`` is the size of the last axis of the
    ``(H, W, C)`` array, and ``dtype`` is a numpy dtype name such as ``"uint8"``.
    """

    height: int
    width: int
    channels: int
    dtype: str

    @property
    def shape(self) -> tuple[int, int, int]:
        """The ``(H, W, C)`` shape of the array :func:`read_image` returns."""
        return (self.height, self.width, self.channels)


def probe_image(path: str | os.PathLike[str]) -> ImageInfo:
    """Return the shape and dtype :func:`read_image` would give, reading only the header.

    Pixel data is not decoded, so a file whose pixels are truncated may probe fine and still
    fail in :func:`read_image`. Raises :class:`NotFound` or :class:`ImageReadError`.
    """
    p = _checked_path(path)
    if p.suffix.lower() in _TIFF_SUFFIXES:
        with decoder_errors(p), tifffile.TiffFile(p) as tif:
            series = tif.series[0]
            shape, axes, dtype = tuple(series.shape), series.axes, np.dtype(series.dtype)
        height, width, channels, _ = _tiff_layout(shape, axes, p)
        return ImageInfo(height, width, channels, _tiff_image_dtype(dtype, p).name)
    with decoder_errors(p), Image.open(p) as im:
        _check_single_frame(im, p)
        width, height = im.size
        _, dtype_name, channels = _pillow_layout(im, p)
    return ImageInfo(height, width, channels, dtype_name)


def read_image(path: str | os.PathLike[str], *, allow_non_finite: bool = False) -> np.ndarray:
    """Read an image file as an ``(H, W, C)`` array in its native dtype.

    Grayscale gives C=1, grayscale+alpha C=2, RGB C=3, RGBA C=4 (alpha kept). Palette images
    become RGB (RGBA if the palette has transparency); 1-bit images become uint8 0/255; 16-bit
    grayscale PNG stays uint16 (Pillow reduces 16-bit *colour* PNG to uint8). TIFF: a 2-D
    page gives C=1, channel-last ``(H, W, C<=4)`` data is kept, planar RGB and ImageJ/OME
    channel-first ``(C<=4, H, W)`` data is moved channel-last, and any other stack is refused.

    A float image with NaN or infinite values is refused (:func:`non_finite_counts` says how
    many) unless ``allow_non_finite``: no model output means anything for those pixels.

    Raises :class:`NotFound` for a missing file and :class:`ImageReadError` for an
    unsupported suffix, a file that cannot be decoded, or non-finite values.
    """
    p = _checked_path(path)
    if p.suffix.lower() in _TIFF_SUFFIXES:
        array = _read_tiff(p)
        if array.dtype == np.bool_:
            return array.astype(np.uint8) * np.uint8(255)
        array = np.ascontiguousarray(array, dtype=_tiff_image_dtype(array.dtype, p))
    else:
        with decoder_errors(p), Image.open(p) as im:
            _check_single_frame(im, p)
            convert_to, dtype_name, channels = _pillow_layout(im, p)
            im.load()
            if convert_to is not None:
                im = im.convert(convert_to)
            decoded = np.array(im)  # a writable copy, owned by the caller
        array = np.ascontiguousarray(decoded, dtype=dtype_name).reshape(decoded.shape[0], decoded.shape[1], channels)
    if not allow_non_finite:
        nan, inf = non_finite_counts(array)
        if nan or inf:
            raise ImageReadError(
                f"cannot use {p}: it has {nan + inf:,} non-finite pixels (NaN {nan:,}, Inf {inf:,}) of "
                f"{array.shape[0] * array.shape[1]:,}; replace them (e.g. by 0 or the image's minimum) or drop the file"
            )
    return array


def non_finite_counts(image: np.ndarray) -> tuple[int, int]:
    """``(nan, inf)``: pixels of an ``(H, W, C)`` image with a NaN in some channel, and pixels with
    +Inf or -Inf (and no NaN); ``(0, 0)`` for integer images."""
    a = np.asarray(image)
    if a.dtype.kind not in "fc":
        return 0, 0
    a = a.reshape(a.shape[0], a.shape[1], -1) if a.ndim >= 2 else a.reshape(1, -1, 1)
    nan = np.isnan(a).any(axis=-1)
    inf = np.isinf(a).any(axis=-1) & ~nan
    return int(nan.sum()), int(inf.sum())


def read_mask(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a label mask as an ``(H, W)`` unsigned integer array (uint8, uint16 or uint32).

    Palette PNGs give their palette *indices* (VOC style), grayscale and 16-bit files give
    their values, and 1-bit files give 0/1. An RGB(A)/LA file is accepted only when its colour
    channels are all equal (and its alpha, if any, is constant or equal to them): it is then
    read as grayscale. Signed or float labels are accepted when every value is a non-negative
    integer; int8 and int16 become uint8 and uint16, everything wider becomes uint32.

    Raises :class:`NotFound` for a missing file and :class:`ImageReadError` for an unreadable
    file, a colour mask, or labels that are negative, fractional or above 2**32 - 1.
    """
    p = _checked_path(path)
    if p.suffix.lower() in _TIFF_SUFFIXES:
        array = _read_tiff(p)
        labels = _collapse_channels(array, has_alpha=array.shape[2] in (2, 4), path=p)
        return as_label_array(labels, p)
    with decoder_errors(p), Image.open(p) as im:
        _check_single_frame(im, p)
        _pillow_layout(im, p)  # refuses modes read_image does not know either
        mode, fmt = im.mode, im.format
        im.load()
        if mode in {"CMYK", "YCbCr", "RGBX"}:
            im = im.convert("RGB")
        array = np.array(im)  # a writable copy, owned by the caller
    if mode == "I" and fmt == "PNG":
        array = array.astype(np.uint16)
    if array.ndim == 3:
        array = _collapse_channels(array, has_alpha=mode in _PIL_MASK_ALPHA_MODES, path=p)
    return as_label_array(array, p)


def write_png(path: str | os.PathLike[str], array: np.ndarray) -> Path:
    """Write a uint8 ``(H, W)`` / ``(H, W, C<=4)`` or uint16 ``(H, W)`` / ``(H, W, 1)`` PNG.

    C=1 is grayscale, 2 grayscale+alpha, 3 RGB, 4 RGBA; uint16 is written as 16-bit grayscale
    (PNG through Pillow has no 16-bit colour). Missing parent folders are created. Returns the
    path written. Raises :class:`ConfigError` for any other dtype, shape or suffix.
    """
    p = Path(path)
    if p.suffix.lower() != ".png":
        raise ConfigError(f"write_png writes .png files, got {p}; change the suffix to .png")
    data = np.asarray(array)
    if data.dtype not in (np.dtype(np.uint8), np.dtype(np.uint16)):
        raise ConfigError(f"write_png takes uint8 or uint16 arrays, got {data.dtype}; cast the array first")
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[:, :, 0]
    if data.ndim not in (2, 3) or (data.ndim == 3 and not 2 <= data.shape[2] <= _MAX_CHANNELS):
        raise ConfigError(f"write_png takes (H, W) or (H, W, C) arrays with C <= 4, got shape {data.shape}")
    if data.dtype == np.uint16 and data.ndim == 3:
        raise ConfigError(f"uint16 PNGs must be single-channel, got shape {data.shape}; write uint8 colour instead")
    p.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(data)).save(p, format="PNG")
    return p


# --------------------------------------------------------------------------------------------
# helpers


def _checked_path(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if not p.exists():
        raise NotFound(f"image file {p} does not exist; check the path")
    if not p.is_file():
        raise ImageReadError(f"{p} is not a file; give the path of an image file")
    if p.suffix.lower() not in IMAGE_SUFFIXES:
        suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
        raise ImageReadError(f"cannot read {p}: unsupported suffix {p.suffix!r}; convert it to one of {suffixes}")
    if p.stat().st_size == 0:
        raise ImageReadError(f"cannot decode {p}: the file is empty (0 bytes); copy or export it again")
    return p


@contextmanager
def decoder_errors(path: Path) -> Iterator[None]:
    """Turn what Pillow/tifffile raise on a bad file into a segflow error naming the file."""
    try:
        yield
    except SegflowError:
        raise
    except FileNotFoundError as exc:  # removed between the check and the read
        raise NotFound(f"image file {path} does not exist; check the path") from exc
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"cannot decode {path}: its header claims more pixels than the decoder's safety limit "
                             f"({exc}); a real image that large must be split into tiles first") from exc
    except _DECODER_ERRORS as exc:
        reason = str(exc) or type(exc).__name__
        raise ImageReadError(f"cannot decode {path}: {reason}; the file is corrupt, truncated or not an image") from exc


def _check_single_frame(im: Image.Image, path: Path) -> None:
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        raise ImageReadError(f"cannot read {path}: it has {frames} frames; only 2-D single-frame images are supported")


def _pillow_layout(im: Image.Image, path: Path) -> tuple[str | None, str, int]:
    """(mode to convert to, dtype name, channels) that read_image gives for an opened image."""
    if im.mode not in _PIL_IMAGE_MODES:
        raise ImageReadError(f"cannot read {path}: unsupported pixel mode {im.mode!r}; convert it to RGB or grayscale")
    convert_to, dtype_name, channels = _PIL_IMAGE_MODES[im.mode]
    if im.mode == "P" and _has_palette_transparency(im):
        return "RGBA", "uint8", 4
    if im.mode == "I" and im.format == "PNG":
        return None, "uint16", 1
    return convert_to, dtype_name, channels


def _has_palette_transparency(im: Image.Image) -> bool:
    palette = im.palette
    return "transparency" in im.info or (palette is not None and palette.mode == "RGBA")


def _read_tiff(path: Path) -> np.ndarray:
    """The first series of a TIFF file as an ``(H, W, C)`` array in the stored dtype."""
    with decoder_errors(path), tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes = series.axes
        array = series.asarray()
    height, width, channels, channel_first = _tiff_layout(array.shape, axes, path)
    if channel_first:
        return np.moveaxis(array.reshape(channels, height, width), 0, -1)
    return array.reshape(height, width, channels)


def _tiff_layout(shape: tuple[int, ...], axes: str, path: Path) -> tuple[int, int, int, bool]:
    """(height, width, channels, channel_first) for a TIFF series, or ImageReadError.

    Length-1 axes other than Y, X and S (samples) are dropped first. tifffile names samples
    ``S`` and ImageJ/OME channels ``C``: when one of those leads a 3-D series (planar RGB,
    channel-first stacks) with <= 4 of them, they become the channels; otherwise a last axis
    of <= 4 is taken as channels.
    """
    kept = [(n, a) for n, a in zip(shape, axes, strict=True) if n != 1 or a in "YXS"]
    dims = tuple(n for n, _ in kept)
    letters = "".join(a for _, a in kept)
    if len(dims) == 2:
        return dims[0], dims[1], 1, False
    if len(dims) == 3 and letters[0] in "SC" and letters[2] != "S" and dims[0] <= _MAX_CHANNELS:
        return dims[1], dims[2], dims[0], True
    if len(dims) == 3 and dims[2] <= _MAX_CHANNELS:
        return dims[0], dims[1], dims[2], False
    raise ImageReadError(
        f"cannot read {path}: only 2-D images are supported (optionally with <= {_MAX_CHANNELS} channels), "
        f"got a series of shape {tuple(shape)} (axes {axes!r}), which is not a z-stack (a volume); split it into one "
        "file per plane"
    )


def _tiff_image_dtype(dtype: np.dtype, path: Path) -> np.dtype:
    """Native-byte-order dtype read_image returns for a TIFF sample dtype (bool -> uint8)."""
    if dtype.kind == "b":
        return np.dtype(np.uint8)
    if dtype.kind not in "uif":
        raise ImageReadError(f"cannot read {path}: unsupported sample type {dtype}; save it as integer or float")
    return dtype.newbyteorder("=")


def _collapse_channels(array: np.ndarray, *, has_alpha: bool, path: Path) -> np.ndarray:
    """``(H, W, C)`` -> ``(H, W)`` when the channels carry one label map, else ImageReadError."""
    if array.shape[2] == 1:
        return array[:, :, 0]
    colour = array[:, :, :-1] if has_alpha else array
    first = colour[:, :, 0]
    same_colour = bool((colour == first[:, :, None]).all())
    if has_alpha:
        alpha = array[:, :, -1]
        same_colour = same_colour and bool((alpha == alpha.flat[0]).all() or (alpha == first).all())
    if not same_colour:
        raise ImageReadError(
            f"cannot read mask {path}: its {array.shape[2]} channels differ; masks must be single-channel "
            "label images (grayscale, 16-bit, palette PNG or 2-D TIFF) whose values are the labels"
        )
    return first


def as_label_array(labels: np.ndarray, path: Path) -> np.ndarray:
    """Check and cast ``(H, W)`` labels to uint8/uint16/uint32 (native byte order)."""
    native = labels.dtype.newbyteorder("=")
    if native in _LABEL_DTYPES:
        return np.ascontiguousarray(labels, dtype=native)
    if labels.dtype.kind == "b":
        return np.ascontiguousarray(labels, dtype=np.uint8)
    if labels.dtype.kind not in "uif":
        raise ImageReadError(f"cannot read mask {path}: unsupported label type {labels.dtype}")
    if labels.dtype.kind == "f" and not bool(np.isfinite(labels).all()):
        raise ImageReadError(f"cannot read mask {path}: it holds {int((~np.isfinite(labels)).sum()):,} NaN or "
                             "infinite values; labels must be whole numbers")
    if labels.dtype.kind == "f" and not bool((labels == np.round(labels)).all()):
        raise ImageReadError(f"cannot read mask {path}: it holds non-integer values; labels must be whole numbers")
    if labels.size and labels.min() < 0:
        raise ImageReadError(
            f"cannot read mask {path}: it holds negative values (min {labels.min()}); labels must be >= 0"
        )
    target = {1: np.dtype(np.uint8), 2: np.dtype(np.uint16)}.get(labels.dtype.itemsize, np.dtype(np.uint32))
    if labels.dtype.kind == "f":
        target = np.dtype(np.uint32)
    if labels.size and labels.max() > np.iinfo(target).max:
        raise ImageReadError(f"cannot read mask {path}: label {labels.max()} exceeds {np.iinfo(target).max}")
    return np.ascontiguousarray(labels, dtype=target)
