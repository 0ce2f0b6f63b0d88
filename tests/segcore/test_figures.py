"""segcore.figures: PNGs that decode, have the promised size, and colour exactly the masked pixels;
the gallery of a real (tiny) run shows the lowest-Dice images in order."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segcore import figures
from segcore.models.checkpoint import ModelMeta, save_checkpoint
from segcore.collection.imageio import write_png
from segcore.run.start import start_run
from segcore.run.units import segment_unit
from segcore.models import create_model
from segcore.normalise import Normalisation
from segcore.run.results import open_run
from segcore.collection.sources import pair_sources, probe_sources
from segcore.collection.store import chunk_rows, create_store, plan_groups, write_manifest, write_store_chunk
from segcore.metrics.summary import summarise_dice


def _decode(png: bytes) -> np.ndarray:
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(io.BytesIO(png)) as img:
        return np.asarray(img.convert("RGB"))


def test_histogram_is_a_png_of_the_requested_size():
    png = figures.dice_histogram_png({"1 cell": [0.1, 0.5, 0.9, None, float("nan")], "2 nucleus": [1.0]},
                                     width_px=400, height_px=200)
    rgb = _decode(png)
    assert rgb.shape == (200, 400, 3)
    red, green = figures.class_colour(1), figures.class_colour(2)  # the two series' outline colours
    pixels = {tuple(int(v) for v in p) for p in rgb.reshape(-1, 3)}
    assert any(max(abs(a - b) for a, b in zip(p, red)) <= 8 for p in pixels)
    assert any(max(abs(a - b) for a, b in zip(p, green)) <= 8 for p in pixels)


def test_histogram_without_values_still_draws():
    assert _decode(figures.dice_histogram_png({})).shape == (320, 640, 3)


def test_overlay_colours_exactly_the_masked_pixels():
    image = np.zeros((8, 10), np.uint8)
    image[:, 5:] = 200  # stretched to 0 (left) and 255 (right)
    labels = np.zeros((8, 10), np.uint8)
    labels[0:2, :] = 1
    labels[6:, 3:7] = 2
    rgb = _decode(figures.overlay_png(image[..., None], labels, alpha=0.5))
    assert rgb.shape == (8, 10, 3)
    c1, c2 = np.asarray(figures.class_colour(1)), np.asarray(figures.class_colour(2))
    np.testing.assert_array_equal(rgb[0, 0], np.floor(0.5 * c1 + 0.5))              # on black
    np.testing.assert_array_equal(rgb[1, 9], np.floor(0.5 * c1 + 0.5 * 255 + 0.5))  # on white
    np.testing.assert_array_equal(rgb[7, 3], np.floor(0.5 * c2 + 0.5))
    np.testing.assert_array_equal(rgb[7, 6], np.floor(0.5 * c2 + 0.5 * 255 + 0.5))
    unlabelled = labels == 0
    expected = np.where(np.arange(10) < 5, 0, 255)[None, :].repeat(8, 0)
    np.testing.assert_array_equal(rgb[..., 0][unlabelled], expected[unlabelled])
    np.testing.assert_array_equal(rgb[..., 1][unlabelled], expected[unlabelled])
    plain = _decode(figures.overlay_png(image, None))
    np.testing.assert_array_equal(plain[..., 2], expected)


def test_thumbnails_keep_the_aspect_and_at_most_max_side():
    image = np.random.default_rng(0).integers(0, 65535, (300, 600, 3), dtype=np.uint16)
    labels = (image[..., 0] > 30000).astype(np.uint8)
    assert _decode(figures.overlay_png(image, labels, max_side=128)).shape == (64, 128, 3)
    assert _decode(figures.overlay_png(image[:50, :40], None, max_side=128)).shape == (50, 40, 3)
    with pytest.raises(ValueError, match="do not fit"):
        figures.overlay_png(image, labels[:10])


def test_display_rgb_stretches_any_dtype_and_channels():
    ramp = np.linspace(0, 4095, 64 * 64).reshape(64, 64).astype(np.uint16)
    rgb = figures.display_rgb(ramp)
    assert rgb.dtype == np.uint8 and rgb.shape == (64, 64, 3)
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255 and (rgb[..., 0] == rgb[..., 2]).all()
    four = np.stack([ramp, ramp[::-1, ::-1], np.zeros_like(ramp), ramp], axis=-1)
    out = figures.display_rgb(four)
    assert out.shape == (64, 64, 3) and (out[..., 2] == 0).all() and out[0, 0, 1] == 255


def test_colour_legend_names_foreground_classes_only():
    assert figures.colour_legend({0: "background", 2: "square", 1: "disc"}) == "1 disc: red; 2 square: green"


@pytest.fixture
def tiny_run(tmp_path: Path) -> str:
    """Seven 16x16 images segmented by a (random) 2-class UNet, six with ground truth."""
    rng = np.random.default_rng(7)
    for i in range(7):
        img = rng.integers(0, 256, (16, 16), dtype=np.uint8)
        write_png(tmp_path / "img" / f"i{i}.png", img)
        if i != 2:
            write_png(tmp_path / "gt" / f"i{i}.png", (img > 40 * i).astype(np.uint8))
    rows = probe_sources(pair_sources(str(tmp_path / "img"), str(tmp_path / "gt")))
    groups, planned = plan_groups(rows, chunk_pixels=4 * 256, max_chunk_images=64)
    store = str(tmp_path / "s.zarr")
    create_store(store, groups, with_gt=True, mask_kind="class", spec={})
    write_manifest(store, [r for c in chunk_rows(planned, groups) for r in write_store_chunk(store, c, threads=1)])
    meta = ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 1}, class_names=("bg", "fg"), in_channels=1,
                     normalisation=Normalisation(mode="range", scale=255.0))
    ckpt = str(save_checkpoint(tmp_path / "m.safetensors",
                               create_model("unet", in_channels=1, num_classes=2, base=4, depth=1), meta))
    run_dir = str(tmp_path / "run")
    ctx, plan, _, _ = start_run(store, str(ckpt), run_dir, batch_size=4, device="cpu", num_threads=1)
    units = plan.units
    for u in units:
        segment_unit(ctx, u)
    return run_dir


def _rows(markdown: str) -> list[tuple[str, list[str]]]:
    out = []
    for line in markdown.splitlines():
        uris = re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", line)
        if uris:
            out.append((line.split("|")[1].strip(), uris))
    return out


def test_gallery_shows_the_lowest_dice_images_in_order(tiny_run):
    run = open_run(tiny_run)
    worst = summarise_dice(run.dice_table())["worst_images"]
    assert len(worst) == 6 and "i2" not in [w["image_id"] for w in worst]  # i2 has no ground truth
    scores = [w["mean_foreground_dice"] for w in worst]
    assert scores == sorted(scores)
    md = figures.gallery_markdown(run, worst, class_names={0: "bg", 1: "fg"}, n=4)
    rows = _rows(md)
    assert [r[0] for r in rows] == [w["image_id"] for w in worst[:4]]
    for image_id, uris in rows:
        image, gt, pred = (_decode(base64.b64decode(u)) for u in uris)
        assert image.shape == gt.shape == pred.shape == (16, 16, 3)
        assert (image[..., 0] == image[..., 1]).all()  # a grey image, coloured only where labelled
        coloured = (gt[..., 0] != gt[..., 1]) | (gt[..., 1] != gt[..., 2])
        np.testing.assert_array_equal(coloured, run.ground_truth(image_id) == 1)
    assert "1 fg: red" in md


def test_gallery_stays_under_its_byte_budget(tiny_run):
    run = open_run(tiny_run)
    worst = summarise_dice(run.dice_table())["worst_images"]
    md = figures.gallery_markdown(run, worst, class_names={0: "bg", 1: "fg"}, n=6, max_bytes=4000)
    assert len(md) < 4000 + 500
    assert len(_rows(md)) < 6 and "left out to keep this page small" in md
    assert figures.gallery_markdown(run, [], class_names={}).startswith("No image has ground truth")
