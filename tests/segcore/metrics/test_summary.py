"""Tests for segcore.metrics.summary on a hand-made Dice table: per-class statistics over images whose
ground truth holds the class, worst-image order, error counts, and the Markdown rendering."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from segcore.collection.store import MANIFEST_SCHEMA
from segcore.metrics.summary import render_markdown, summarise_dice
from segcore.run.tables import DICE_COLUMNS, dice_table, read_dice

CLASSES = ("background", "cell", "nucleus")
IDS = ("a", "b", "c", "e")
DICE = np.array([
    [0.9, 0.8, 0.6],
    [0.95, 0.4, 1.0],  # nucleus absent from GT and prediction
    [0.7, 0.0, 0.5],  # cell absent from GT but predicted
    [0.8, 0.9, 0.2],
])
EMPTY = np.array([
    [False, False, False],
    [False, False, True],
    [False, True, False],
    [False, False, False],
])
# Per class over non-empty GT: background 0.9, 0.95, 0.7, 0.8 -> mean 0.8375, median 0.85
#                              cell 0.8, 0.4, 0.9            -> mean 0.7,    median 0.8 (all rows 0.525)
#                              nucleus 0.6, 0.5, 0.2         -> mean 1.3/3,  median 0.5 (all rows 0.575)
# Mean foreground Dice: (0.7 + 1.3/3) / 2. Per image (classes 1, 2 in its truth or prediction; b's
# nucleus, absent from both, left out): a 0.7, b 0.4, c 0.25, e 0.55 -> worst c, b, e, a.
FP = np.zeros(DICE.shape, dtype=np.int64)
FP[2, 1] = 5  # c: cell predicted where the truth has none


def _dice() -> pa.Table:
    zeros = np.zeros(DICE.shape, dtype=np.int64)
    return dice_table(image_ids=IDS, class_names=CLASSES, tp=zeros, fp=FP, fn=zeros, dice=DICE,
                      empty_gt=EMPTY, model="unet", checkpoint_sha256="0" * 64, unit="unit-00000",
                      errors=[("broken", "ImageReadError: cannot decode")])


def _manifest() -> pa.Table:
    def row(image_id: str, status: str, mask_status: str, error: str | None = None) -> dict:
        r = {name: None for name in MANIFEST_SCHEMA.names}
        r.update(image_id=image_id, source_path=f"/data/{image_id}.png", status=status, error=error,
                 mask_status=mask_status)
        return r

    rows = [row(i, "ok", "ok") for i in IDS] + [
        row("nomask", "ok", "missing"),
        row("badmask", "ok", "error"),
        row("broken", "error", "missing", "ImageReadError: cannot decode"),
    ]
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def test_per_class_statistics_over_non_empty_gt() -> None:
    s = summarise_dice(_dice())
    by_id = {c["class_id"]: c for c in s["per_class"]}
    assert [c["class_id"] for c in s["per_class"]] == [0, 1, 2]
    assert [c["class_name"] for c in s["per_class"]] == list(CLASSES)
    assert [c["images"] for c in s["per_class"]] == [4, 4, 4]
    assert [c["images_with_class"] for c in s["per_class"]] == [4, 3, 3]
    assert by_id[0]["mean_dice"] == pytest.approx(0.8375)
    assert by_id[0]["median_dice"] == pytest.approx(0.85)
    assert by_id[1]["mean_dice"] == pytest.approx(0.7)
    assert by_id[1]["median_dice"] == pytest.approx(0.8)
    assert by_id[1]["mean_dice_all_rows"] == pytest.approx(0.525)
    assert by_id[2]["mean_dice"] == pytest.approx(1.3 / 3)
    assert by_id[2]["median_dice"] == pytest.approx(0.5)
    assert by_id[2]["mean_dice_all_rows"] == pytest.approx(0.575)
    assert s["mean_foreground_dice"] == pytest.approx((0.7 + 1.3 / 3) / 2)


def test_counts_and_errors() -> None:
    s = summarise_dice(_dice())
    assert s["images_evaluated"] == 4
    assert s["dice_rows"] == 4 * 3 + 3
    assert s["error_images"] == 1
    assert "images_ingested" not in s


def test_worst_images_in_order() -> None:
    s = summarise_dice(_dice())
    worst = s["worst_images"]
    assert [w["image_id"] for w in worst] == ["c", "b", "e", "a"]
    assert [w["mean_foreground_dice"] for w in worst] == pytest.approx([0.25, 0.4, 0.55, 0.7])
    assert [w["image_id"] for w in summarise_dice(_dice(), worst=2)["worst_images"]] == ["c", "b"]


def test_class_absent_from_every_gt_has_no_mean() -> None:
    t = dice_table(image_ids=["a"], class_names=("bg", "fg"), tp=np.zeros((1, 2)), fp=np.zeros((1, 2)),
                   fn=np.zeros((1, 2)), dice=np.array([[1.0, 0.0]]), empty_gt=np.array([[False, True]]),
                   model="m", checkpoint_sha256="", unit="u")
    s = summarise_dice(t)
    fg = s["per_class"][1]
    assert fg["images_with_class"] == 0
    assert fg["mean_dice"] is None and fg["median_dice"] is None
    assert fg["mean_dice_all_rows"] == 0.0
    assert s["mean_foreground_dice"] is None
    assert "| 1 fg | 0 | – | – |" in render_markdown(s)


def test_manifest_counts() -> None:
    s = summarise_dice(_dice(), manifest=_manifest())
    assert s["images_ingested"] == 6
    assert s["unreadable_files"] == [{"source_path": "/data/broken.png", "error": "ImageReadError: cannot decode"}]
    assert s["masks_missing"] == 1
    assert s["masks_unusable"] == 1
    # a volume's file that could not be read is one unreadable file, however many slices it has
    rows = _manifest().to_pylist()
    slices = [dict(rows[-1], image_id=f"ct/z{k:04d}", source_path="/data/ct.nii.gz", error="truncated")
              for k in range(30)]
    others = [dict(rows[-1], image_id=f"b{k}", source_path=f"/data/b{k}.png") for k in range(21)]
    many = summarise_dice(_dice(), manifest=pa.Table.from_pylist(rows + slices + others, schema=MANIFEST_SCHEMA))
    assert [u["source_path"] for u in many["unreadable_files"]][:2] == ["/data/broken.png", "/data/ct.nii.gz"]
    assert len(many["unreadable_files"]) == 23
    text = render_markdown(many)
    assert "unreadable files: 23;" in text and text.count("`/data/ct.nii.gz`") == 1
    assert "- ... and 3 more (the manifest's rows with status `error`)" in text


def test_empty_table(tmp_path: Path) -> None:
    empty = read_dice(tmp_path / "dice")
    assert empty.column_names == list(DICE_COLUMNS)
    s = summarise_dice(empty)
    assert s["images_evaluated"] == 0 and s["dice_rows"] == 0 and s["error_images"] == 0
    assert s["per_class"] == [] and s["worst_images"] == []
    assert s["mean_foreground_dice"] is None
    md = render_markdown(s)
    assert "mean foreground Dice: **–**" in md


def test_markdown_contains_the_numbers() -> None:
    s = summarise_dice(_dice(), manifest=_manifest())
    s.update(run_id="20261124T101500-abc123", model="unet", outputs={"masks": "/runs/r1/masks.zarr"})
    md = render_markdown(s, title="nuclei run")
    assert md.startswith("# nuclei run\n")
    assert md.endswith("\n")
    assert "Run `20261124T101500-abc123` · model `unet`" in md
    assert "- images in the store: 6" in md
    assert "- images evaluated (with ground truth): 4" in md
    assert f"**{(0.7 + 1.3 / 3) / 2:.4f}**" in md and "**0.5667**" in md
    assert "images with errors: 1; unreadable files: 1; masks missing: 1; masks unusable: 1" in md
    assert "| 0 background | 4 | 0.8375 | 0.8500 |" in md
    assert "| 1 cell | 3 | 0.7000 | 0.8000 |" in md
    assert "| 2 nucleus | 3 | 0.4333 | 0.5000 |" in md
    lines = md.splitlines()
    worst = [ln for ln in lines if ln.startswith("| c |") or ln.startswith("| e |")]
    assert worst == ["| c | 0.2500 |", "| e | 0.5500 |"]
    assert "- `/data/broken.png`: ImageReadError: cannot decode" in md
    assert "- masks: `/runs/r1/masks.zarr`" in md


def test_markdown_without_manifest_marks_unknowns() -> None:
    md = render_markdown(summarise_dice(_dice()))
    assert md.startswith("# segflow run\n")
    assert "- images in the store: –" in md
    assert "masks missing: –" in md
    assert "Unreadable files" not in md and "Outputs:" not in md


def test_ground_truth_with_unknown_labels_is_counted_from_the_evaluation_policys_rows() -> None:
    from segcore.models.checkpoint import ModelMeta
    from segcore.normalise import Normalisation
    from segcore.run.evaluate import count_against_gt, dice_rows

    meta = ModelMeta(arch="unet", arch_kwargs={}, class_names=CLASSES, in_channels=1,
                     normalisation=Normalisation(mode="range", scale=255.0))
    gt = np.array([[[0, 1], [2, 0]], [[0, 5], [0, 0]], [[0, 3], [0, 0]]], dtype=np.uint32)  # labels 5, 3: unknown
    ids = ("ok", "five", "three")
    counts = dict(zip(ids, count_against_gt(np.zeros((3, 2, 2), np.int64), gt, mask_kind="class", meta=meta)))
    rows = [{"image_id": i, "status": "ok", "error": None, "mask_status": "ok", "mask_error": None} for i in ids]
    broken = {"image_id": "broken", "status": "ok", "error": None, "mask_status": "error", "mask_error": "30x30"}
    table = dice_rows(rows + [broken], counts, meta=meta, checkpoint_sha256="0" * 64, unit="unit-00000")
    s = summarise_dice(table)
    assert (s["images_evaluated"], s["error_images"], s["gt_label_errors"]) == (1, 3, 2)
    assert "ground truth with labels the model lacks: 2" in render_markdown(s)


def test_distances_are_named_by_the_spacing_they_were_measured_in():
    from segcore.metrics.summary import UNKNOWN_UNIT, distance_unit

    assert distance_unit("millimeter", (2.5, 0.8, 0.8)) == "millimeter"
    assert distance_unit(None, (1.0, 1.0, 1.0)) == distance_unit("", (None, None, None)) == "voxel"
    assert distance_unit(None, (2.5, 0.8, 0.8)) == UNKNOWN_UNIT == "spacing units (unit unknown)"


def test_instance_summary_takes_precision_and_recall_from_the_counts() -> None:
    """Rows written before the empty-case rule changed say 1.0 where nothing was counted; the summary
    reads each image's counts, so such rows count as today's (segcore.metrics.instance.detection_ratios)."""
    from segcore.metrics.summary import summarise_instances

    def row(tp: int, fp: int, fn: int, old_precision: float, old_recall: float) -> dict:
        return {"tp": tp, "fp": fp, "fn": fn, "precision": old_precision, "recall": old_recall, "f1": 0.0,
                "ap": float("nan"), "ap50": float("nan"), "panoptic_quality": 0.0, "mean_matched_iou": float("nan")}

    metrics = pa.Table.from_pylist([row(0, 0, 3, 1.0, 0.0),  # nothing found of 3 objects: precision 0 today
                                    row(0, 2, 0, 0.0, 1.0),  # 2 found where there is nothing: recall 0 today
                                    row(2, 0, 0, 1.0, 1.0), row(0, 0, 0, 1.0, 1.0)])
    s = summarise_instances(metrics, pa.table({"instance_id": [1, 2, 3, 4]}))
    assert (s["mean_precision"], s["mean_recall"]) == (pytest.approx(2 / 4), pytest.approx(2 / 4))
    assert (s["total_tp"], s["total_fp"], s["total_fn"]) == (2, 2, 3) and s["pooled_f1"] == pytest.approx(4 / 9)
    assert s["instances_predicted"] == 4


def test_markdown_says_when_units_failed_or_images_reached_the_detection_cap() -> None:
    s = summarise_dice(_dice())
    assert "failed" not in render_markdown(s) and "cap" not in render_markdown(s)
    md = render_markdown({**s, "units": 8, "units_failed": 8, "images_at_detection_cap": 2})
    assert "**8 of 8 work unit(s) failed**: their images are neither segmented nor counted below" in md
    assert "**2 image(s) reached the model's cap on detections**" in md
