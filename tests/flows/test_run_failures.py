"""Failures inside a run: a hung unit is timed out (its worker restarted), retried with back-off and
recorded failed while the others finish; the command exits 2 naming it; the same command again
redoes only that unit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from flows.cli import main
from segcore.collection.imageio import write_png
from segcore.models import create_model
from segcore.models.checkpoint import ModelMeta, save_checkpoint
from segcore.normalise import Normalisation
from segcore.run.rundir import done_records, failed_records, read_run_info
from segcore.synthetic import generate_collection
from tests.segcore.models.test_predict_errors import CappedSize

HUNG = "unit-00001"


def _collection(root: Path) -> tuple[str, str]:
    """Grey images of three sizes (three groups: units unit-00000..02) and a 3-class UNet."""
    generate_collection(root / "col", n_images=4, size=32, seed=0)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 40)] * 3 + [(24, 48)] * 2):
        write_png(root / "col" / "images" / f"extra-{i}.png", rng.integers(0, 255, (h, w), dtype=np.uint8))
    torch.manual_seed(0)
    meta = ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2}, class_names=("background", "a", "b"),
                     in_channels=1, normalisation=Normalisation(mode="range", scale=255.0))
    ckpt = save_checkpoint(root / "m.safetensors", create_model("unet", in_channels=1, num_classes=3, base=4, depth=2),
                           meta)
    return str(root / "col" / "images"), str(ckpt)


def test_a_hung_unit_is_stopped_retried_recorded_and_redone_alone(tmp_path, monkeypatch, capsys):
    images, ckpt = _collection(tmp_path)
    out = str(tmp_path / "run")
    argv = ["run", "--images", images, "--checkpoint", ckpt, "--out", out, "--workers", "1",
            "--threads-per-worker", "1", "--unit-timeout-floor", "5", "--unit-timeout-cap", "5", "--unit-retries", "1"]
    monkeypatch.setenv("SEGFLOW_FAULTS", json.dumps({"hang_units": [HUNG], "hang_s": 600}))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "1 unit(s) failed" in err and HUNG in err and "timed out after 5 s" in err and "2 attempt(s)" in err
    key = read_run_info(out)["key"]
    failed = failed_records(out, key)
    assert list(failed) == [HUNG] and failed[HUNG]["attempts"] == 2 and "timed out" in failed[HUNG]["reason"]
    first = {name: r.timing.started for name, r in done_records(out, key).items()}
    assert sorted(first) == ["unit-00000", "unit-00002"]  # the others finished

    monkeypatch.delenv("SEGFLOW_FAULTS")
    assert main(argv) == 0
    assert "segment: 2/3 units, 2 done by an earlier run\n" in capsys.readouterr().err
    again = {name: r.timing.started for name, r in done_records(out, key).items()}
    assert sorted(again) == ["unit-00000", "unit-00001", "unit-00002"]
    recomputed = sorted(name for name in again if first.get(name) != again[name])
    assert recomputed == [HUNG]
    assert failed_records(out, key) == {}


def test_a_model_that_cannot_take_a_units_images_fails_it_once_without_retries(tmp_path, capsys):
    rng = np.random.default_rng(1)
    for i, side in enumerate([32, 32, 80]):  # two groups: unit-00000 (32 px), unit-00001 (80 px)
        write_png(tmp_path / "images" / f"i{i}.png", rng.integers(0, 255, (side, side), dtype=np.uint8))
    torch.jit.script(CappedSize()).save(str(tmp_path / "capped.pt"))
    record = str(tmp_path / "capped.segflow")
    assert main(["model", "import", str(tmp_path / "capped.pt"), "--out", record, "--in-channels", "1",
                 "--class-names", "bg,fg", "--normalisation", "range"]) == 0  # its probes (up to 61 px) pass
    capsys.readouterr()
    out = str(tmp_path / "run")
    argv = ["run", "--images", str(tmp_path / "images"), "--checkpoint", record, "--out", out, "--workers", "1",
            "--threads-per-worker", "1", "--unit-retries", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "1 unit(s) failed" in err and "unit-00001" in err and "1 attempt(s), not retried" in err
    assert "fix what they name" in err
    # a TorchScript model's error is its script's traceback: the line shown is the error it ends with
    assert "the model failed on a batch of shape (1, 1, 80, 80) (RuntimeError: The size of tensor a (80) must" in err
    failed = failed_records(out, read_run_info(out)["key"])
    assert list(failed) == ["unit-00001"] and failed["unit-00001"]["attempts"] == 1
    assert failed["unit-00001"]["reason"].startswith("ModelError: the model failed")
    assert list(done_records(out, read_run_info(out)["key"])) == ["unit-00000"]
