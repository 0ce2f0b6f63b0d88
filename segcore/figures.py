"""Small PNG figures of a run: a Dice histogram and image thumbnails with label overlays.

Pure functions from arrays to PNG bytes (matplotlib's Agg backend and pillow; no display), so
they run anywhere the library runs. Thumbnails are made to stay small: the longest side is at
most ``max_side`` pixels and the colours are quantised, so a gallery of a few images fits in a
markdown document of a few hundred kilobytes.
"""

from __future__ import annotations

import base64
import io
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from PIL import Image

from segcore.colours import class_colour, colour_name

# Images above this many pixels are read whole by the run reader, so the gallery leaves them out.
GALLERY_MAX_PIXELS = 16 * 2**20


def display_rgb(image: np.ndarray) -> np.ndarray:
    """``(H, W, 3)`` uint8 view of an ``(H, W)`` or ``(H, W, C)`` image of any dtype.

    One channel is shown grey, three or more as RGB (the first three), two as the first one.
    Each channel is stretched from its 1st to its 99.8th percentile (as the default normalisation
    does), so 16-bit and float images are visible; a constant channel becomes black.
    """
    a = np.asarray(image)
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3:
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {a.shape}")
    a = a[..., :3] if a.shape[2] >= 3 else a[..., :1]
    out = np.empty(a.shape[:2] + (a.shape[2],), np.uint8)
    for c in range(a.shape[2]):
        ch = a[..., c].astype(np.float64)
        lo, hi = np.percentile(ch, [1.0, 99.8])
        out[..., c] = 0 if hi <= lo else np.clip((ch - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return np.repeat(out, 3, axis=2) if out.shape[2] == 1 else out


def overlay_rgb(image: np.ndarray, labels: np.ndarray | None, *, alpha: float = 0.5) -> np.ndarray:
    """``(H, W, 3)`` uint8: ``image`` (see :func:`display_rgb`) with every pixel of class ``k >= 1``
    in ``labels`` (``(H, W)`` integer class ids) blended with :func:`class_colour` at ``alpha``."""
    rgb = display_rgb(image).astype(np.float64)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != rgb.shape[:2]:
            raise ValueError(f"labels of shape {labels.shape} do not fit an image of {rgb.shape[:2]}")
        for k in np.unique(labels):
            if k == 0:
                continue
            where = labels == k
            rgb[where] = (1.0 - alpha) * rgb[where] + alpha * np.asarray(class_colour(int(k)), np.float64)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def png_bytes(rgb: np.ndarray, *, max_side: int | None = None, colours: int | None = 128) -> bytes:
    """PNG of an ``(H, W, 3)`` uint8 array, shrunk so that its longest side is at most ``max_side``
    (area averaging, aspect kept) and quantised to ``colours`` colours (None keeps full RGB)."""
    img = Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8))
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BOX)
    if colours is not None:
        img = img.quantize(colors=colours, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def overlay_png(image: np.ndarray, labels: np.ndarray | None, *, max_side: int = 128, alpha: float = 0.5) -> bytes:
    """Thumbnail PNG (longest side ``<= max_side`` px) of ``image`` with ``labels`` overlaid
    (see :func:`overlay_rgb`); ``labels=None`` gives the plain image."""
    return png_bytes(overlay_rgb(image, labels, alpha=alpha), max_side=max_side)


def dice_histogram_png(values: Mapping[str, Sequence[float]], *, bins: int = 20, width_px: int = 640,
                       height_px: int = 320) -> bytes:
    """PNG histogram of Dice scores in ``[0, 1]``, one outlined series per class name.

    ``values`` maps a class name to its per-image Dice values (None and NaN are left out); the
    i-th name is drawn in :func:`class_colour` ``(i + 1)``. The figure is ``width_px`` by
    ``height_px`` pixels.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    ax = fig.add_subplot()
    edges = np.linspace(0.0, 1.0, bins + 1)
    drawn = 0
    for i, (name, vals) in enumerate(values.items()):
        v = np.asarray([x for x in vals if x is not None], dtype=np.float64)
        v = v[~np.isnan(v)]
        if v.size == 0:
            continue
        colour = tuple(c / 255.0 for c in class_colour(i + 1))
        ax.hist(np.clip(v, 0.0, 1.0), bins=edges, histtype="stepfilled", alpha=0.35, color=colour)
        ax.hist(np.clip(v, 0.0, 1.0), bins=edges, histtype="step", linewidth=1.5, color=colour,
                label=f"{name} (n={v.size}, mean {v.mean():.3f})")
        drawn += 1
    ax.set_xlim(0.0, 1.0)
    ax.set_xlabel("Dice per image")
    ax.set_ylabel("images")
    if drawn:
        ax.legend(loc="upper left", fontsize="small")
    else:
        ax.text(0.5, 0.5, "no Dice values", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def training_curve_png(history: Sequence[Mapping[str, Any]], *, width_px: int = 640, height_px: int = 320) -> bytes:
    """PNG of a training run: the loss per epoch (left axis) and the validation Dice of each class
    (``val_dice``: name -> Dice, background left out) and their foreground mean (right axis, 0..1).

    ``history``: the trainer's epoch records (``epoch``, ``loss``, optionally ``val_dice`` and
    ``val_dice_mean_fg``); the i-th foreground class is drawn in :func:`class_colour` ``(i)``. A
    run that held nothing out (no validation figures, or ``None``) gets the loss alone, no right axis.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(width_px / dpi, height_px / dpi), dpi=dpi)
    ax = fig.add_subplot()
    epochs = [int(r["epoch"]) for r in history]
    ax.plot(epochs, [float(r["loss"]) for r in history], color="black", linewidth=1.5, label="training loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    names = list((history[0].get("val_dice") or {}) if history else {})[1:]
    mean_fg = bool(history) and history[0].get("val_dice_mean_fg") is not None
    handles = ax.get_legend_handles_labels()[0]
    if names or mean_fg:
        right = ax.twinx()
        for i, name in enumerate(names, start=1):
            colour = tuple(c / 255.0 for c in class_colour(i))
            right.plot(epochs, [r["val_dice"][name] for r in history], color=colour, label=f"val Dice {name}")
        if mean_fg:
            right.plot(epochs, [r["val_dice_mean_fg"] for r in history], color="grey", linestyle="--",
                       label="val Dice, foreground mean")
        right.set_ylim(0.0, 1.0)
        right.set_ylabel("validation Dice")
        handles += right.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="center right", fontsize="small")
    with warnings.catch_warnings():  # a legend of many classes may not fit: the plot is drawn as it is
        warnings.filterwarnings("ignore", message="Tight layout not applied")
        fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    return buf.getvalue()


def png_data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` URI of PNG bytes (for embedding in markdown)."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def colour_legend(class_names: Mapping[int, str]) -> str:
    """One line naming the overlay colour of every foreground class, e.g. ``1 disc: red``."""
    return "; ".join(f"{k} {name}: {colour_name(k)}"
                     for k, name in sorted(class_names.items()) if k != 0)


def gallery_markdown(run: Any, worst: Sequence[Mapping[str, Any]], *, class_names: Mapping[int, str], n: int = 6,
                     max_side: int = 128, max_bytes: int = 600_000) -> str:
    """Markdown table of the ``n`` first images of ``worst``: image | ground truth | prediction.

    ``run`` is a :class:`segcore.run.results.RunReader`; ``worst`` is the summary's ``worst_images``
    (``image_id``, ``mean_foreground_dice``; lowest first). Thumbnails are PNG data URIs with a
    longest side of ``max_side`` px. Instance ground truth is shown as foreground (class 1), as
    Dice compares it. Images larger than :data:`GALLERY_MAX_PIXELS`, and rows that would take the
    document past ``max_bytes``, are listed without thumbnails.
    """
    picks = list(worst)[:n]
    if not picks:
        return "No image has ground truth to compare with, so there is no gallery of worst images.\n"
    instance_gt = getattr(run.store, "mask_kind", "class") == "instance"
    lines = [f"Lowest mean foreground Dice first. Overlay colours: {colour_legend(class_names)}.", "",
             "| image | mean foreground Dice | image | ground truth | prediction |",
             "| --- | ---: | :---: | :---: | :---: |"]
    size = sum(len(x) + 1 for x in lines)
    pixels = _pixels(run.manifest, [w["image_id"] for w in picks])
    skipped: list[str] = []
    for w in picks:
        image_id, score = w["image_id"], w["mean_foreground_dice"]
        if pixels.get(image_id, 0) > GALLERY_MAX_PIXELS:
            skipped.append(f"{image_id} (too large for a thumbnail)")
            continue
        image, gt = run.image(image_id), run.ground_truth(image_id)
        if gt is not None and instance_gt:
            gt = (gt > 0).astype(np.uint8)
        cells = [png_data_uri(overlay_png(image, labels, max_side=max_side))
                 for labels in (None, gt, run.mask(image_id))]
        row = (f"| {image_id} | {score:.4f} | ![{image_id}]({cells[0]}) | ![ground truth of {image_id}]({cells[1]}) "
               f"| ![prediction of {image_id}]({cells[2]}) |")
        if size + len(row) + 1 > max_bytes:
            skipped.append(f"{image_id} (Dice {score:.4f}; left out to keep this page small)")
            continue
        lines.append(row)
        size += len(row) + 1
    if skipped:
        lines += ["", "Without thumbnails: " + ", ".join(skipped)]
    return "\n".join(lines) + "\n"


def _pixels(manifest: pa.Table, image_ids: Sequence[str]) -> dict[str, int]:
    """Image id -> height x width, from a store manifest table, for ``image_ids``."""
    rows = manifest.filter(pc.is_in(manifest["image_id"], value_set=pa.array(list(image_ids), pa.string())))
    return {r["image_id"]: int(r["height"] or 0) * int(r["width"] or 0)
            for r in rows.select(["image_id", "height", "width"]).to_pylist()}
