"""The bad-input corpus (:mod:`tests.flows.bad_inputs`) through one ``segflow run``: no crash, every
valid file segmented and scored, every bad one an error row whose message says what is wrong."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from segcore.collection.store import read_manifest
from segcore.models import create_model
from segcore.models.checkpoint import ModelMeta, save_checkpoint
from segcore.normalise import Normalisation
from segcore.run.results import open_run
from tests.flows.bad_inputs import EXPECTED, make_corpus

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory) -> dict:
    """`segflow run` of the corpus with a 1-channel, 3-class UNet; one worker."""
    root = tmp_path_factory.mktemp("bad-inputs")
    files = make_corpus(root / "col")
    torch.manual_seed(0)
    model = create_model("unet", in_channels=1, num_classes=3, base=4, depth=2)
    meta = ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2}, class_names=("background", "a", "b"),
                     in_channels=1, normalisation=Normalisation(mode="range", scale=255.0))
    checkpoint = save_checkpoint(root / "model.safetensors", model, meta)
    out = root / "run"
    env = dict(os.environ, PYTHONPATH=str(REPO), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--images", str(root / "col" / "images"),
                           "--masks", str(root / "col" / "masks"), "--checkpoint", str(checkpoint), "--out", str(out),
                           "--workers", "1", "--threads-per-worker", "1"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    manifest = {Path(r["source_path"]).name: r for r in read_manifest(str(out / "store.zarr")).to_pylist()}
    return {"proc": proc, "files": files, "manifest": manifest, "out": out}


def test_the_corpus_has_at_least_25_kinds() -> None:
    assert len(EXPECTED) >= 25
    assert {e.status for e in EXPECTED.values()} == {"ok", "error"}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_every_kind_has_its_expected_manifest_status_and_reason(corpus_run, kind: str) -> None:
    expect, row = EXPECTED[kind], corpus_run["manifest"][corpus_run["files"][kind]]
    assert row["status"] == expect.status, row
    if expect.status == "error":
        assert expect.fragment in row["error"], row["error"]
        assert row["source_path"] in row["error"] or "duplicate image id" in row["error"]  # names the file
    elif expect.fragment:
        assert row["mask_status"] == "error" and expect.fragment in row["mask_error"], row


def test_every_file_named_like_an_image_is_in_the_manifest_and_other_files_are_not(corpus_run) -> None:
    names = set(corpus_run["manifest"])
    assert names == set(corpus_run["files"].values()) | {"duplicate_id.png"}  # the first file of a duplicated id
    assert not names & {"notes.txt", "metadata.json", ".hidden.png"}


def test_the_run_finishes_and_scores_every_valid_file_and_names_every_bad_one(corpus_run) -> None:
    proc = corpus_run["proc"]
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = open_run(str(corpus_run["out"])).dice_table().to_pandas()
    for kind, expect in EXPECTED.items():
        image_id = corpus_run["files"][kind].rsplit(".", 1)[0]
        rows = table[table.image_id == image_id]
        if expect.dice is None:
            assert rows.empty, (kind, rows)
            continue
        assert len(rows) == 3 and (rows.status == expect.dice).all(), (kind, rows)
        assert all(expect.dice_fragment in (e if isinstance(e, str) else "") for e in rows.error), (kind, list(rows.error))
    summary = json.loads((corpus_run["out"] / "summary.json").read_text())
    assert summary["gt_label_errors"] == 1
    unreadable = {Path(u["source_path"]).name for u in summary["unreadable_files"]}
    assert unreadable == {corpus_run["files"][k] for k, e in EXPECTED.items() if e.status == "error"}
    # the progress lines count what the results count: images in the store, and segmented (not refused)
    last = {ln.split(":")[0]: ln for ln in proc.stderr.splitlines() if ln.startswith(("ingest: ", "segment: "))}
    images = summary["images_ingested"]
    assert f" chunks, {images} images, " in last["ingest"] and last["ingest"].endswith(" refused"), last
    # segmented: the images scored and those whose ground truth is unusable (every image of the store has a mask)
    gt_broken = table[(table.status == "error") & table.error.str.contains("ground truth")]
    segmented = len(set(table[table.status == "ok"].image_id) | set(gt_broken.image_id))
    assert f" units, {segmented} images, " in last["segment"], (last, segmented)
