"""`segflow report`: text tables, JSON and plots from a lake; a missing lake, or a location that is not one, is
an error with a message, not an empty report or a traceback."""

from __future__ import annotations

import datetime as dt
import json

from flows.cli import main
from segcore.lake.publish import publish
from tests.segcore.lake.test_lake import _groups, _manifest, _run_info, _write_unit
from tests.segcore.lake.test_report import SECTIONS, _instance_lake


def test_report_prints_tables_and_writes_plots(tmp_path, capsys):
    run_dir, lake = str(tmp_path / "run"), str(tmp_path / "lake")
    _write_unit(run_dir, 0, [0, 1], dice=0.25)
    publish(lake, run_dir=run_dir, run_info=_run_info(), manifest=_manifest(2), unit_groups=_groups(1),
            now=dt.datetime(2026, 11, 2, tzinfo=dt.timezone.utc))
    assert main(["report", "--lake", lake, "--plots", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "2026-11-02" in out and "0.2500" in out
    assert (tmp_path / "plots" / "dice-over-time-unet-cccccccccccc.png").exists()
    assert main(["report", "--lake", lake, "--json", "--plots", str(tmp_path / "again")]) == 0
    captured = capsys.readouterr()
    tables = json.loads(captured.out)  # the plots are told on stderr: stdout stays JSON
    assert captured.err.startswith("plot: ") and (tmp_path / "again" / "dice-over-time-unet-cccccccccccc.png").exists()
    assert list(tables) == SECTIONS and tables["volumes"] == [] and tables["instances"] == []
    assert [r["tables"] for r in tables["models"]] == [["dice"]]
    assert [(r["model"], r["class_name"], r["images"]) for r in tables["current"]] == [
        ("unet@cccccccccccc", "background", 2), ("unet@cccccccccccc", "cell", 2)]
    assert [(r["model"], r["checkpoint_sha256"]) for r in tables["models"]] == [("unet@cccccccccccc", "c" * 64)]


def test_a_lake_of_instance_metrics_only(tmp_path, capsys):
    lake = _instance_lake(tmp_path)
    assert main(["report", "--lake", lake, "--plots", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "Current instance metrics" in out and "maskrcnn@dddddddddddd" in out and "0.7692" in out  # pooled F1
    assert "(no rows: runs publish Dice rows for images with ground truth)" in out
    assert "plot: " in out and (tmp_path / "plots" / "instances-over-time-maskrcnn-dddddddddddd.png").exists()
    assert main(["report", "--lake", lake, "--json"]) == 0
    tables = json.loads(capsys.readouterr().out)
    assert tables["current"] == [] and [r["images"] for r in tables["instances"]] == [3]


def test_a_missing_lake_is_an_error(tmp_path, capsys):
    assert main(["report", "--lake", str(tmp_path / "typo")]) == 2
    assert "no such location" in capsys.readouterr().err


def test_what_is_not_a_lake_is_an_error_with_a_message(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    run_dir = tmp_path / "run"
    _write_unit(str(run_dir), 0, [0, 1])
    (run_dir / "run.json").write_text("{}")
    lake = _instance_lake(tmp_path)
    (next((tmp_path / "lake" / "instance_metrics").rglob("*.parquet")).parent / "x.parquet").write_bytes(b"junk")
    for location, message in ((tmp_path / "empty", "no lake rows here"), (run_dir, "is a run directory"),
                              (lake, "instance_metrics table cannot be read")):
        assert main(["report", "--lake", str(location)]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and "Traceback" not in captured.err and not captured.out


def test_a_reader_that_stops_early_ends_the_report_quietly(tmp_path, monkeypatch):
    """``segflow report --json | head -1``: stdout's reader gone, the command ends with SIGPIPE's status
    (141) instead of a BrokenPipeError traceback."""
    import io
    import os

    run_dir, lake = str(tmp_path / "run"), str(tmp_path / "lake")
    _write_unit(run_dir, 0, [0, 1], dice=0.25)
    publish(lake, run_dir=run_dir, run_info=_run_info(), manifest=_manifest(2), unit_groups=_groups(1),
            now=dt.datetime(2026, 11, 2, tzinfo=dt.timezone.utc))
    read, write = os.pipe()
    os.close(read)  # the reader is gone: every write to the pipe fails with EPIPE
    gone = io.TextIOWrapper(io.FileIO(write, "w"), line_buffering=True)
    monkeypatch.setattr("sys.stdout", gone)
    assert main(["report", "--lake", lake, "--json"]) == 141
    gone.write("x\n")  # stdout now writes to the null device: no second error when Python flushes it
    gone.close()
