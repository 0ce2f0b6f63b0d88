"""Mask R-CNN through the same Prefect + Dask path: instance arrays and tables, instance metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from flows.pipeline import run_flow, with_runner
from segcore.models.checkpoint import ModelMeta, save_checkpoint
from segcore.config import ExecutionSpec, IngestSpec, RunSpec, SegmentSpec
from segcore.collection.imageio import write_png
from segcore.metrics.instance import instance_scores
from segcore.models import create_model
from segcore.normalise import Normalisation
from segcore.run.results import open_run


def test_instance_model_writes_instances_and_metrics(tmp_path: Path):
    rng = np.random.default_rng(5)
    for i in range(5):
        labels = np.zeros((48, 48), np.uint16)
        yy, xx = np.ogrid[:48, :48]
        for k, obj_id in enumerate((3, 7, 40)):  # ids with gaps
            cy, cx = rng.integers(8, 40, 2)
            labels[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = obj_id
        img = (labels > 0).astype(np.uint8) * 150 + rng.integers(0, 60, (48, 48)).astype(np.uint8)
        write_png(tmp_path / "images" / f"n{i}.png", img)
        if i != 4:
            write_png(tmp_path / "masks" / f"n{i}.png", labels)
    torch.manual_seed(0)
    arch = {"score_threshold": 0.0, "box_detections_per_img": 25, "proposals_per_img": 100}  # 48 x 48 images, 3 objects
    model = create_model("maskrcnn_r18", in_channels=1, num_classes=2, **arch)
    ckpt = save_checkpoint(tmp_path / "mrcnn.safetensors", model,
                           ModelMeta(arch="maskrcnn_r18", arch_kwargs=arch, class_names=("background", "nucleus"),
                                     in_channels=1, normalisation=Normalisation(mode="range", scale=255.0)))
    store, out = str(tmp_path / "store.zarr"), str(tmp_path / "run")
    execution = ExecutionSpec(n_workers=1, threads_per_worker=2)
    spec = RunSpec(ingest=IngestSpec(images=str(tmp_path / "images"), masks=str(tmp_path / "masks"), store=store,
                                     mask_kind="instance", max_chunk_images=3),
                   segment=SegmentSpec(store=store, checkpoint=str(ckpt), out=out, batch_size=2, execution=execution))
    summary = with_runner(run_flow, execution)(spec)

    run = open_run(out)
    inst = run.instance_table().to_pandas()
    metrics = run.instance_metrics_table().to_pandas()
    assert summary["instance"]["instances_predicted"] == len(inst)
    named = summary["outputs"]
    assert (named["instance labels"], named["instance table"], named["instance metrics"]) == (
        f"{out}/instances.zarr", f"{out}/instances", f"{out}/instance_metrics")
    assert all(Path(named[k]).exists() for k in ("instance labels", "instance table", "instance metrics"))
    assert sorted(metrics.image_id) == ["n0", "n1", "n2", "n3"]  # n4 has no ground truth
    assert not inst.duplicated(["image_id", "instance_id"]).any()
    for image_id in run.image_ids:
        labels = run.instances(image_id)
        rows = inst[inst.image_id == image_id]
        assert sorted(rows.instance_id) == sorted(set(np.unique(labels)) - {0})
        for _, r in rows.iterrows():
            x0, y0, x1, y1 = r.bbox
            own = labels == r.instance_id
            assert own.sum() == r.area and not own[:y0].any() and not own[y1:].any()
            assert not own[:, :x0].any() and not own[:, x1:].any()
        np.testing.assert_array_equal(run.mask(image_id), (labels > 0).astype(np.uint8))
    for _, m in metrics.iterrows():
        scores = {r.instance_id: r.score for _, r in inst[inst.image_id == m.image_id].iterrows()}
        ref = instance_scores(run.instances(m.image_id), run.ground_truth(m.image_id), scores=scores)
        assert (m.tp, m.fp, m.fn, m.n_gt) == (ref["tp"], ref["fp"], ref["fn"], 3)
        assert np.isclose(m.f1, ref["f1"]) and np.isclose(m.ap, ref["ap"], equal_nan=True)
    dice = run.dice_table().to_pandas()
    assert len(dice[dice.status == "ok"]) == 4 * 2
