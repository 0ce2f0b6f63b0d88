"""A corpus of the files users put in image folders, good and bad, made under a temporary directory.

:func:`make_corpus` writes ``images/`` and ``masks/`` and returns :data:`EXPECTED`'s keys mapped to
the file name each kind has in ``images/``. Every kind is made from a few bytes or a tiny array here:
no binary fixture is checked in.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tifffile
from PIL import Image

from segcore.collection.imageio import write_png

SIZE = 32


class Expect(NamedTuple):
    """What one kind of input must become: the manifest ``status`` and a fragment of its error (or
    of its ``mask_error`` when the image is fine and its mask is not), and the ``status`` of its Dice
    rows (None: no Dice row, as for an image without a usable ground truth file or one that never
    reached a store slot) with a fragment of their error. ``colour``: the model must adapt it."""

    status: str
    fragment: str = ""
    dice: str | None = "ok"
    dice_fragment: str = ""
    colour: bool = False


#: kind -> expected outcome. Kinds with ``dice="ok"`` get a mask of their shape.
EXPECTED: dict[str, Expect] = {
    "grey8": Expect("ok"),
    "grey16": Expect("ok"),
    "bilevel": Expect("ok"),
    "float32": Expect("ok"),
    "one_pixel": Expect("ok"),
    "thin_1x500": Expect("ok"),
    "huge_3000": Expect("ok"),
    "all_zero": Expect("ok"),
    "constant": Expect("ok"),
    "jpeg_named_png": Expect("ok"),  # decoded by content, whatever the suffix says
    "exif_rotated": Expect("ok"),  # pixels as stored: the mask stays aligned
    "unicode_名前_é": Expect("ok"),
    "symlink_to_valid": Expect("ok"),
    "palette": Expect("ok", colour=True),
    "rgba": Expect("ok", colour=True),
    "cmyk_jpeg": Expect("ok", colour=True),
    "gt_other_size": Expect("ok", "differs from image shape", dice="error", dice_fragment="ground truth unusable"),
    "gt_unknown_labels": Expect("ok", dice="error", dice_fragment="ground truth has label 9"),
    "gt_rgb": Expect("ok", "channels differ", dice="error", dice_fragment="ground truth unusable"),
    "zero_byte": Expect("error", "the file is empty (0 bytes)", dice=None),
    "truncated_png": Expect("error", "truncated", dice="error", dice_fragment="truncated"),
    "text_file": Expect("error", "cannot decode", dice=None),
    "random_bytes": Expect("error", "cannot decode", dice=None),
    "bomb_header": Expect("error", "safety limit", dice=None),
    "float_nan": Expect("error", "non-finite pixels (NaN 1,024, Inf 0)", dice="error", dice_fragment="NaN 1,024"),
    "float_inf": Expect("error", "3 non-finite pixels (NaN 0, Inf 3)", dice="error", dice_fragment="Inf 3"),
    "time_series": Expect("error", "split it into one file per plane", dice=None),
    "five_channels": Expect("error", "<= 4 channels", dice=None),
    "dangling_symlink": Expect("error", "which does not exist", dice=None),
    "directory": Expect("error", "a directory, not an image file", dice=None),
    "fifo": Expect("error", "not a regular file", dice=None),
    "duplicate_id": Expect("error", "duplicate image id"),  # its Dice rows: those of the first file of the id
}

#: Files that are not images: skipped and counted, never an error row.
SKIPPED = ("notes.txt", "metadata.json")


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _labels(shape: tuple[int, int], seed: int) -> np.ndarray:
    """``(H, W)`` uint8 labels 0..2: a disc of class 1 and a square of class 2 (if they fit)."""
    h, w = shape
    yy, xx = np.ogrid[:h, :w]
    labels = np.zeros(shape, np.uint8)
    labels[(yy - h // 2) ** 2 + (xx - w // 2) ** 2 < (min(h, w) // 3) ** 2] = 1
    labels[: h // 4, : w // 4] = 2 if seed % 2 else 0
    return labels


def _grey(shape: tuple[int, int], seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (_labels(shape, seed) * 80 + rng.integers(0, 40, shape)).astype(np.uint8)


def _jpeg(image: Image.Image, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def make_corpus(root: Path) -> dict[str, str]:
    """Write the corpus under ``root`` (``images/``, ``masks/``); returns kind -> file name."""
    images, masks = root / "images", root / "masks"
    images.mkdir(parents=True)
    masks.mkdir()
    ids: dict[str, str] = {}

    def put(kind: str, filename: str, shape: tuple[int, int] | None = None) -> Path:
        ids[kind] = filename
        if shape is not None:
            write_png(masks / f"{filename.rsplit('.', 1)[0]}.png", _labels(shape, len(ids)))
        return images / filename

    s = (SIZE, SIZE)
    write_png(put("grey8", "grey8.png", s), _grey(s, 1))
    write_png(put("grey16", "grey16.png", s), _grey(s, 2).astype(np.uint16) * 200)
    Image.fromarray(_grey(s, 3) > 60).convert("1").save(put("bilevel", "bilevel.png", s))
    tifffile.imwrite(put("float32", "float32.tif", s), _grey(s, 4).astype(np.float32))
    write_png(put("one_pixel", "one_pixel.png", (1, 1)), np.full((1, 1), 90, np.uint8))
    write_png(put("thin_1x500", "thin_1x500.png", (1, 500)), _grey((1, 500), 5))
    write_png(put("huge_3000", "huge_3000.png", (3000, 3000)), _grey((3000, 3000), 6))
    write_png(put("all_zero", "all_zero.png", s), np.zeros(s, np.uint8))
    write_png(put("constant", "constant.png", s), np.full(s, 7, np.uint8))
    put("jpeg_named_png", "jpeg_named_png.png", s).write_bytes(_jpeg(Image.fromarray(_grey(s, 7))))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees to display
    put("exif_rotated", "exif_rotated.jpg", (20, 40)).write_bytes(_jpeg(Image.fromarray(_grey((20, 40), 8)),
                                                                         exif=exif.tobytes()))
    write_png(put("unicode_名前_é", "unicode_名前_é.png", s), _grey(s, 9))
    os.symlink(images / "grey8.png", put("symlink_to_valid", "symlink_to_valid.png", s))
    Image.fromarray(_grey(s, 10)).convert("P", palette=Image.Palette.ADAPTIVE, colors=8).save(
        put("palette", "palette.png", s))
    write_png(put("rgba", "rgba.png", s), np.dstack([_grey(s, 11)] * 3 + [np.full(s, 255, np.uint8)]))
    put("cmyk_jpeg", "cmyk_jpeg.jpg", s).write_bytes(_jpeg(Image.fromarray(np.dstack([_grey(s, 12)] * 3))
                                                          .convert("CMYK")))
    write_png(put("gt_other_size", "gt_other_size.png"), _grey(s, 13))
    write_png(masks / "gt_other_size.png", _labels((16, 16), 0))
    write_png(put("gt_unknown_labels", "gt_unknown_labels.png"), _grey(s, 14))
    write_png(masks / "gt_unknown_labels.png", _labels(s, 1) * 9 // 2)  # labels 0, 4, 9
    write_png(put("gt_rgb", "gt_rgb.png"), _grey(s, 15))
    write_png(masks / "gt_rgb.png", np.dstack([_labels(s, 1), _labels(s, 0), _labels(s, 1)]))

    put("zero_byte", "zero_byte.png").write_bytes(b"")
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(16).integers(0, 255, s, dtype=np.uint8)).save(good, format="PNG")
    put("truncated_png", "truncated_png.png", s).write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    put("text_file", "text_file.png").write_text("this is not an image\n")
    put("random_bytes", "random_bytes.tif").write_bytes(np.random.default_rng(17).bytes(4096))
    put("bomb_header", "bomb_header.png").write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0))
        + _chunk(b"IDAT", zlib.compress(bytes(100))) + _chunk(b"IEND", b""))
    tifffile.imwrite(put("float_nan", "float_nan.tif", s), np.full(s, np.nan, np.float32))
    inf = _grey(s, 18).astype(np.float32)
    inf[0, :2], inf[5, 5] = np.inf, -np.inf
    tifffile.imwrite(put("float_inf", "float_inf.tif", s), inf)
    tifffile.imwrite(put("time_series", "time_series.tif"), np.stack([_grey(s, 19)] * 3), imagej=True,
                     metadata={"axes": "TYX"})  # a z-stack would be a volume; a time series is refused
    tifffile.imwrite(put("five_channels", "five_channels.tif"), np.dstack([_grey(s, 20)] * 5), photometric="minisblack",
                     planarconfig="contig")
    os.symlink(images / "gone.png", put("dangling_symlink", "dangling_symlink.png"))
    put("directory", "directory.png").mkdir()
    os.mkfifo(put("fifo", "fifo.png"))
    write_png(images / "duplicate_id.png", _grey(s, 21))
    write_png(masks / "duplicate_id.png", _labels(s, 21))
    tifffile.imwrite(put("duplicate_id", "duplicate_id.tif"), _grey(s, 22))  # a second file of id duplicate_id
    for name in SKIPPED:
        (images / name).write_text("{}\n")
    write_png(images / ".hidden.png", _grey(s, 23))  # hidden: neither listed nor counted
    return ids
