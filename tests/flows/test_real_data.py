"""Real data through the whole pipeline: a 16-bit nuclei image with instance ground truth."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from flows.pipeline import run_flow, with_runner
from segcore.models.checkpoint import ModelMeta, save_checkpoint
from segcore.config import ExecutionSpec, IngestSpec, RunSpec, SegmentSpec
from segcore.collection.imageio import read_image, read_mask
from segcore.models import create_model
from segcore.normalise import Normalisation
from segcore.run.results import open_run

NUCLEI = Path(__file__).resolve().parents[1] / "data" / "nuclei"


def test_nuclei_instance_ground_truth_flows_through_unchanged(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    shutil.copy(NUCLEI / "img2d.tif", tmp_path / "images" / "nuclei.tif")
    shutil.copy(NUCLEI / "mask2d.tif", tmp_path / "masks" / "nuclei.tif")
    torch.manual_seed(0)
    model = create_model("unet", in_channels=1, num_classes=2, base=4, depth=2)
    ckpt = save_checkpoint(tmp_path / "fg.safetensors", model,
                           ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2},
                                     class_names=("background", "nucleus"), in_channels=1,
                                     normalisation=Normalisation(mode="percentile")))
    store, out = str(tmp_path / "store.zarr"), str(tmp_path / "run")
    execution = ExecutionSpec(n_workers=1, threads_per_worker=1)
    spec = RunSpec(ingest=IngestSpec(images=str(tmp_path / "images"), masks=str(tmp_path / "masks"), store=store,
                                     mask_kind="instance"),
                   segment=SegmentSpec(store=store, checkpoint=str(ckpt), out=out, execution=execution))
    with_runner(run_flow, execution)(spec)

    run = open_run(out)
    assert run.image_ids == ["nuclei"]
    image = run.image("nuclei")
    assert image.dtype == np.uint16 and image.shape == (512, 512, 1)
    np.testing.assert_array_equal(image, read_image(NUCLEI / "img2d.tif"))
    gt = run.ground_truth("nuclei")
    np.testing.assert_array_equal(gt, read_mask(NUCLEI / "mask2d.tif"))
    assert len(np.unique(gt)) - 1 == 125 and gt.max() == 183
    rows = run.dice("nuclei")
    assert [r["class_name"] for r in rows] == ["background", "nucleus"]
    pred = run.mask("nuclei")
    fg_gt, fg_pred = gt > 0, pred == 1
    expected = 2 * (fg_gt & fg_pred).sum() / (fg_gt.sum() + fg_pred.sum())
    assert abs(rows[1]["dice"] - expected) <= 1e-9
    assert rows[1]["gt_pixels"] == int(fg_gt.sum())
