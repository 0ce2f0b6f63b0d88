"""`segflow report`: text tables, JSON and plots from a lake; a missing lake is an error, not an empty report."""

from __future__ import annotations

import datetime as dt
import json

from flows.cli import main
from segcore.lake.publish import publish
from tests.segcore.lake.test_lake import _groups, _manifest, _run_info, _write_unit


def test_report_prints_tables_and_writes_plots(tmp_path, capsys):
    run_dir, lake = str(tmp_path / "run"), str(tmp_path / "lake")
    _write_unit(run_dir, 0, [0, 1], dice=0.25)
    publish(lake, run_dir=run_dir, run_info=_run_info(), manifest=_manifest(2), unit_groups=_groups(1),
            now=dt.datetime(2026, 11, 2, tzinfo=dt.timezone.utc))
    assert main(["report", "--lake", lake, "--plots", str(tmp_path / "plots")]) == 0
    out = capsys.readouterr().out
    assert "2026-11-02" in out and "0.2500" in out and (tmp_path / "plots" / "dice-over-time-unet.png").exists()
    assert main(["report", "--lake", lake, "--json"]) == 0
    tables = json.loads(capsys.readouterr().out)
    assert [(r["class_name"], r["images"]) for r in tables["current"]] == [("background", 2), ("cell", 2)]


def test_a_missing_lake_is_an_error(tmp_path, capsys):
    assert main(["report", "--lake", str(tmp_path / "typo")]) == 2
    assert "no such location" in capsys.readouterr().err


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
