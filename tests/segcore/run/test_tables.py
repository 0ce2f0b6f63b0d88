"""Tests for segcore.run.tables: Dice rows, error rows, atomic part writes and reading the
Hive-partitioned dataset back (``run_id`` always a string)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import segcore.run.tables as tables
from segcore.run.tables import DICE_COLUMNS, DICE_SCHEMA, dice_table, read_dice, write_part

CLASSES = ("background", "cell", "edge")
TP = np.array([[5, 2, 0], [7, 0, 1]])
FP = np.array([[1, 0, 0], [0, 3, 1]])
FN = np.array([[0, 1, 0], [2, 0, 0]])


def _table(unit: str = "unit-00000", ids: tuple[str, ...] = ("a", "b"), errors: tuple = ()) -> pa.Table:
    n = len(ids)
    return dice_table(
        image_ids=list(ids), class_names=CLASSES, tp=TP[:n], fp=FP[:n], fn=FN[:n],
        dice=np.array([[10 / 11, 0.8, 1.0], [14 / 16, 0.0, 2 / 3]])[:n],
        empty_gt=np.array([[False, False, True], [False, True, False]])[:n],
        model="unet", checkpoint_sha256="ab" * 32, unit=unit, errors=list(errors),
    )


def test_one_row_per_image_and_class() -> None:
    t = _table()
    assert t.schema == DICE_SCHEMA
    assert t.num_rows == 2 * 3
    rows = t.to_pylist()
    assert [(r["image_id"], r["class_id"], r["class_name"]) for r in rows] == [
        ("a", 0, "background"), ("a", 1, "cell"), ("a", 2, "edge"),
        ("b", 0, "background"), ("b", 1, "cell"), ("b", 2, "edge"),
    ]
    assert [r["tp"] for r in rows] == [5, 2, 0, 7, 0, 1]
    assert [r["fp"] for r in rows] == [1, 0, 0, 0, 3, 1]
    assert [r["fn"] for r in rows] == [0, 1, 0, 2, 0, 0]
    assert [r["gt_pixels"] for r in rows] == [5, 3, 0, 9, 0, 1]
    assert [r["pred_pixels"] for r in rows] == [6, 2, 0, 7, 3, 2]
    assert [r["empty_gt"] for r in rows] == [False, False, True, False, True, False]
    assert rows[1]["dice"] == pytest.approx(0.8) and rows[4]["dice"] == 0.0
    assert {(r["status"], r["error"], r["model"], r["unit"], r["checkpoint_sha256"]) for r in rows} == {
        ("ok", None, "unet", "unit-00000", "ab" * 32)
    }


def test_error_rows_have_null_dice() -> None:
    t = _table(ids=("a",), errors=(("broken", "ImageReadError: truncated"),))
    assert t.schema == DICE_SCHEMA
    assert t.num_rows == 3 + 3
    err = [r for r in t.to_pylist() if r["status"] == "error"]
    assert [(r["image_id"], r["class_id"], r["class_name"]) for r in err] == [
        ("broken", 0, "background"), ("broken", 1, "cell"), ("broken", 2, "edge")
    ]
    for r in err:
        assert r["error"] == "ImageReadError: truncated"
        assert r["dice"] is None and r["tp"] is None and r["fp"] is None and r["fn"] is None
        assert r["empty_gt"] is None
        assert (r["model"], r["unit"]) == ("unet", "unit-00000")


def test_only_error_rows() -> None:
    t = dice_table(image_ids=[], class_names=CLASSES, tp=np.zeros((0, 3)), fp=np.zeros((0, 3)),
                   fn=np.zeros((0, 3)), dice=np.zeros((0, 3)), empty_gt=np.zeros((0, 3), bool), model="unet",
                   checkpoint_sha256="x", unit="unit-00001", errors=[("a", "bad"), ("b", "worse")])
    assert t.num_rows == 6
    assert pc.all(pc.equal(t["status"], "error")).as_py()
    assert t["dice"].null_count == 6


def test_write_part_is_complete_and_leaves_no_temporary(tmp_path: Path) -> None:
    d = tmp_path / "dice" / "run_id=r1"
    dest = write_part(_table(), d, "unit-00000.parquet")
    assert Path(dest) == d / "unit-00000.parquet"
    assert [p.name for p in d.iterdir()] == ["unit-00000.parquet"]
    assert pq.read_table(dest).equals(_table())


def test_writing_twice_replaces(tmp_path: Path) -> None:
    write_part(_table(ids=("a", "b")), tmp_path, "unit-00000.parquet")
    second = _table(ids=("a",), errors=(("c", "oops"),))
    write_part(second, tmp_path, "unit-00000.parquet")
    assert [p.name for p in tmp_path.iterdir()] == ["unit-00000.parquet"]
    assert pq.read_table(tmp_path / "unit-00000.parquet").equals(second)


def _failing_write(monkeypatch: pytest.MonkeyPatch) -> None:
    real = pq.write_table

    def half_then_fail(table: pa.Table, where: object, **kwargs: object) -> None:
        real(table.slice(0, 1), where, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(tables.pq, "write_table", half_then_fail)


def test_failed_write_keeps_the_previous_part(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "dice" / "run_id=r1"
    write_part(_table(), d, "unit-00000.parquet")
    _failing_write(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        write_part(_table(ids=("a",)), d, "unit-00000.parquet")
    assert pq.read_table(d / "unit-00000.parquet").equals(_table())
    assert read_dice(tmp_path / "dice").num_rows == 6  # a leftover temporary file is not read


def test_failed_write_removes_its_temporary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _failing_write(monkeypatch)
    with pytest.raises(OSError):
        write_part(_table(), tmp_path, "unit-00000.parquet")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("make_dir", [False, True])
def test_read_dice_without_parts_has_documented_columns(tmp_path: Path, make_dir: bool) -> None:
    path = tmp_path / "dice"
    if make_dir:
        (path / "run_id=r1").mkdir(parents=True)
    t = read_dice(path)
    assert t.num_rows == 0
    assert tuple(t.column_names) == DICE_COLUMNS
    assert t.schema.field("run_id").type == pa.string()
    assert t.schema.field("dice").type == pa.float64()


@pytest.mark.parametrize("run_id", ["20261124", "20261124T101500-a1b2c3", "7"])
def test_read_dice_gives_run_id_as_string(tmp_path: Path, run_id: str) -> None:
    base = tmp_path / "dice"
    write_part(_table("unit-00000"), base / f"run_id={run_id}", "unit-00000.parquet")
    write_part(_table("unit-00001", ids=("c",), errors=(("d", "bad"),)), base / f"run_id={run_id}",
               "unit-00001.parquet")
    t = read_dice(base)
    assert tuple(t.column_names) == DICE_COLUMNS
    assert t.schema.field("run_id").type == pa.string()
    assert t.num_rows == 6 + 3 + 3
    assert set(t["run_id"].to_pylist()) == {run_id}
    assert sorted(set(t["unit"].to_pylist())) == ["unit-00000", "unit-00001"]
    assert t.schema.field("class_id").type == pa.int32()


def test_read_dice_filters_by_run(tmp_path: Path) -> None:
    base = tmp_path / "dice"
    write_part(_table(ids=("a", "b")), base / "run_id=20261124", "unit-00000.parquet")
    write_part(_table(ids=("a",)), base / "run_id=20261125", "unit-00000.parquet")
    assert read_dice(base).num_rows == 9
    only = read_dice(base, filter=pc.field("run_id") == "20261125")
    assert only.num_rows == 3
    assert set(only["run_id"].to_pylist()) == {"20261125"}


def test_channels_adapted_is_per_image_and_empty_on_error_rows():
    table = dice_table(image_ids=["a", "b"], class_names=CLASSES, tp=TP, fp=FP, fn=FN, dice=np.zeros((2, 3)),
                       empty_gt=np.zeros((2, 3), bool), model="unet", checkpoint_sha256="ab" * 32, unit="u",
                       errors=[("c", "5-channel image")], channels_adapted=["rgb->grey", ""])
    assert table.column("channels_adapted").to_pylist() == ["rgb->grey"] * 3 + [""] * 3 + [""] * 3
    assert _table().column("channels_adapted").to_pylist() == [""] * 6


def test_parts_written_before_channels_adapted_existed_read_back_as_null(tmp_path):
    old = _table("unit-00000").drop_columns(["channels_adapted"])
    assert "channels_adapted" not in old.column_names
    write_part(old, tmp_path / "dice" / "run_id=r1", "unit-00000.parquet")
    write_part(_table("unit-00001", ids=("c",)), tmp_path / "dice" / "run_id=r1", "unit-00001.parquet")
    back = read_dice(tmp_path / "dice").sort_by([("unit", "ascending")])
    assert tuple(back.column_names) == DICE_COLUMNS
    assert back.column("channels_adapted").to_pylist() == [None] * 6 + [""] * 3
