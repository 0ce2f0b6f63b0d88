"""Tests for segcore.run.volumes (which images make a volume) and the volume summary."""

from __future__ import annotations

import math

import pyarrow as pa
import pytest

from segcore.errors import ConfigError
from segcore.metrics.summary import preview_slices, render_markdown, summarise_dice, summarise_volumes
from segcore.run.volumes import VOLUME_SCHEMA, check_volume_pattern, find_volumes


def _slice(vid, z, **extra):
    return {"image_id": f"{vid}/z{z:04d}", "volume_id": vid, "slice": z, "spacing_z": 2.0, "spacing_y": 0.5,
            "spacing_x": 0.25, "spacing_unit": "millimeter", **extra}


def test_ingested_volumes_are_found_in_slice_order_with_their_spacing():
    rows = [_slice("b", 1), _slice("a", 2), _slice("a", 0), _slice("a", 1), {"image_id": "flat", "volume_id": None}]
    vols = find_volumes(rows)
    assert [(v.volume_id, v.slices) for v in vols] == [("a", ("a/z0000", "a/z0001", "a/z0002")), ("b", ("b/z0001",))]
    assert vols[0].spacing == (2.0, 0.5, 0.25) and vols[0].unit == "millimeter"


def test_a_pattern_groups_2d_images_by_its_first_group_or_whole_match():
    rows = [{"image_id": i, "volume_id": None} for i in ("p1_z02", "p1_z10", "p2_z01", "p1_z01", "notes", "p3")]
    vols = find_volumes(rows, pattern=r"^(p\d)_z\d+$")
    assert [(v.volume_id, v.slices, v.spacing, v.unit) for v in vols] == [
        ("p1", ("p1_z01", "p1_z02", "p1_z10"), (1.0, 1.0, 1.0), ""), ("p2", ("p2_z01",), (1.0, 1.0, 1.0), "")]
    assert [v.volume_id for v in find_volumes(rows, pattern=r"p\d")] == ["p1", "p2", "p3"]
    assert find_volumes(rows) == []
    unpadded = [{"image_id": i, "volume_id": None} for i in ("s_z10", "s_z9", "s_z1")]  # natural order, not text
    assert find_volumes(unpadded, pattern=r"^(s)_z")[0].slices == ("s_z1", "s_z9", "s_z10")
    with pytest.raises(ConfigError, match="not a regular expression"):
        find_volumes(rows, pattern="(unclosed")


def test_preview_slices_spread_over_the_depth():
    ids = [f"z{i}" for i in range(16)]
    assert preview_slices(ids) == ["z4", "z8", "z12"]
    assert preview_slices(ids[:2]) == ["z0", "z1"] and preview_slices(ids[:1]) == ["z0"] and preview_slices([]) == []


def _row(vid, c, dice, **kw):
    base = {k: None for k in VOLUME_SCHEMA.names}
    base.update(volume_id=vid, class_id=c, class_name=f"c{c}", slices=4, dice=dice, empty_gt=False,
                surface_status="ok", hd95=2.0, assd=1.0, status="ok", spacing_unit="millimeter")
    base.update(kw)
    return base


def test_volume_summary_means_worst_and_errors():
    table = pa.Table.from_pylist([
        _row("a", 0, 0.99, surface_status="skipped", hd95=math.nan), _row("a", 1, 0.8, hd95=3.0, assd=1.5),
        _row("a", 2, 0.6), _row("b", 1, 0.4, hd95=5.0, assd=2.5),
        _row("b", 2, 0.9, empty_gt=True, surface_status="empty_gt", hd95=math.nan, assd=math.nan),
        {**{k: None for k in VOLUME_SCHEMA.names}, "volume_id": "c", "status": "error", "error": "no ground truth"},
    ], schema=VOLUME_SCHEMA)
    s = summarise_volumes(table, slices={"b": [f"b{i}" for i in range(8)]})
    assert s["volumes_evaluated"] == 2 and s["unit"] == "millimeter"
    one, two = s["per_class"]
    # class 1: both volumes; class 2: only a has it in its ground truth, only a has surface distances
    assert one["volumes_with_class"] == 2 and one["mean_dice"] == pytest.approx(0.6)
    assert (one["mean_hd95"], one["mean_assd"]) == (4.0, 2.0)
    assert (two["volumes_with_class"], two["mean_dice"], two["mean_hd95"], two["mean_assd"]) == (1, 0.6, 2.0, 1.0)
    # worst first by mean foreground Dice over all rows: b (0.65) then a (0.7); background left out
    assert [w["volume_id"] for w in s["worst_volumes"]] == ["b", "a"]
    assert [w["mean_foreground_dice"] for w in s["worst_volumes"]] == pytest.approx([0.65, 0.7])
    assert s["worst_volumes"][0]["preview_slices"] == ["b2", "b4", "b6"] and s["worst_volumes"][1]["preview_slices"] == []
    assert s["errors"] == [{"volume_id": "c", "error": "no ground truth"}]


def test_the_markdown_summary_lists_volumes():
    dice = pa.Table.from_pylist([{"image_id": "a/z0000", "class_id": 1, "class_name": "c1", "dice": 0.5,
                                  "empty_gt": False, "status": "ok", "error": None}])
    summary = summarise_dice(dice)
    summary["volumes"] = summarise_volumes(pa.Table.from_pylist([_row("a", 1, 0.5)], schema=VOLUME_SCHEMA))
    text = render_markdown(summary)
    assert "Volumes evaluated: 1 (3-D metrics; distances in millimeter)" in text
    assert "| 1 c1 | 1 | 0.5000 | 2.0000 | 1.0000 |" in text and "| a | 0.5000 |" in text
    # volumes of two distance units: their distances are never averaged together
    two = pa.Table.from_pylist([_row("a", 1, 0.5, hd95=7.0), _row("b", 1, 0.7, hd95=3.0, spacing_unit=None,
                                                                    spacing_z=2.5, spacing_y=1.0, spacing_x=1.0)],
                               schema=VOLUME_SCHEMA)
    summary["volumes"] = summarise_volumes(two)
    assert [(c["unit"], c["mean_hd95"]) for c in summary["volumes"]["per_class"]] == [
        ("millimeter", 7.0), ("spacing units (unit unknown)", 3.0)]
    text = render_markdown(summary)
    assert "| 1 c1 (millimeter) | 1 | 0.5000 | 7.0000 |" in text
    assert "| 1 c1 (spacing units (unit unknown)) | 1 | 0.7000 | 3.0000 |" in text
    # no volume scored: no distance unit to name (the unit comes from the volumes scored)
    unscored = {**{k: None for k in VOLUME_SCHEMA.names}, "volume_id": "a", "status": "error",
                "error": "not every slice has usable ground truth", "spacing_unit": "millimeter"}
    summary["volumes"] = summarise_volumes(pa.Table.from_pylist([unscored], schema=VOLUME_SCHEMA))
    assert summary["volumes"]["unit"] is None
    text = render_markdown(summary)
    assert "Volumes evaluated: 0 (3-D metrics)\n" in text and "distances in" not in text
    assert "- volume `a` not scored: not every slice has usable ground truth" in text


def test_a_volume_pattern_that_groups_no_image_is_refused_by_name():
    rows = [{"image_id": "case1_z0", "volume_id": None}, {"image_id": "case1_z1", "volume_id": None},
            {"image_id": "vol", "volume_id": "vol"}]
    check_volume_pattern(rows, r"^(case\d+)_z")  # groups two images
    check_volume_pattern(rows, None)
    with pytest.raises(ConfigError, match=r"--volume-pattern '\^\(patient\\\\d\+\)' matches none of the store's 2 "
                                          r"2-D image ids \(e.g. 'case1_z0'\)"):
        check_volume_pattern(rows, r"^(patient\d+)")
    check_volume_pattern(rows[2:], r"^(patient\d+)")  # no 2-D image: nothing to group
