"""The embedded demo: a small, fast variant in the default suite; the full one is `slow`."""

from __future__ import annotations

import json

import pytest

from flows.cli import main


def test_small_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--images", "40", "--epochs", "1", "--size", "64", "--workers", "1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "mean foreground Dice" in printed and str(out) in printed
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["images_evaluated"] == 40 - round(40 * 2 / 3)
    assert (out / "unet-demo.safetensors").is_file()
    assert {c["class_name"] for c in summary["per_class"]} == {"background", "disc", "square"}
    assert (out / ".segflow-demo").is_file()  # marks what the next demo with this --out may replace


def test_small_instance_demo_runs_end_to_end(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / ".segflow-demo").write_text("")  # an earlier demo's directory: replaced whole
    (out / "stale.txt").write_text("old")
    rc = main(["demo", "--model", "maskrcnn", "--out", str(out), "--images", "24", "--epochs", "1", "--size", "64"])
    assert rc == 0
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert (out / "maskrcnn-demo.safetensors").is_file()
    assert summary["model"] == "maskrcnn_r18" and "instance" in summary
    assert summary["images_evaluated"] == 24 - round(24 * 180 / 240)
    assert (out / "run" / "instances.zarr").exists() and not (out / "stale.txt").exists()


def test_demo_refuses_to_replace_a_foreign_directory(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    (tmp_path / "collection").mkdir()  # a folder of the user's that happens to have a demo's folder name
    assert main(["demo", "--out", str(tmp_path)]) == 2
    assert "not a segflow demo directory" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_full_demo_reaches_the_dice_bar(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["mean_foreground_dice"] >= 0.90


@pytest.mark.slow
def test_full_instance_demo_reaches_the_f1_bar(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--model", "maskrcnn", "--out", str(out)]) == 0
    summary = json.loads((out / "run" / "summary.json").read_text())
    assert summary["instance"]["pooled_f1"] >= 0.85
