"""CUDA path of UNet and Mask R-CNN training (bf16 autocast, pinned batches). Marked `gpu`: deselected by default and
skipped where torch sees no CUDA device. Run with `pytest -m gpu` on a GPU machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcore.normalise import Normalisation
from segcore.synthetic import CLASS_NAMES, make_sample
from segcore.training.semantic import train_semantic
from segcore.training.settings import Recipe

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _data(n: int, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    pairs = [make_sample(rng, size=size) for _ in range(n)]
    return np.stack([p[0] for p in pairs])[..., None], np.stack([p[1] for p in pairs])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_seeded_cuda_training_reaches_the_cpu_validation_dice(precision):
    images, masks = _data(48)
    kwargs = dict(class_names=CLASS_NAMES, arch_kwargs={"base": 8, "depth": 3},
                  normalisation=Normalisation(mode="range", scale=255.0), epochs=8, batch_size=8, lr=3e-3,
                  val_fraction=0.25, seed=0)
    _, cpu, _ = train_semantic(images, masks, recipe=Recipe(device="cpu"), **kwargs)
    model, gpu, history = train_semantic(images, masks, recipe=Recipe(device="cuda:0", precision=precision), **kwargs)
    assert gpu.provenance["device"] == "cuda:0" and next(model.parameters()).device.type == "cpu"
    assert all(np.isfinite(r["loss"]) for r in history)
    assert cpu.provenance["val_dice_mean_fg"] > 0.5
    assert abs(gpu.provenance["val_dice_mean_fg"] - cpu.provenance["val_dice_mean_fg"]) < 0.1


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mask_rcnn_trains_on_cuda_and_comes_back_on_the_cpu(precision):
    from segcore.synthetic import INSTANCE_CLASS_NAMES, make_instance_sample
    from segcore.training.instance import train_instance

    rng = np.random.default_rng(0)
    pairs = [make_instance_sample(rng, size=64) for _ in range(6)]
    images, labels = np.stack([p[0] for p in pairs])[..., None], np.stack([p[1] for p in pairs])
    model, meta, history = train_instance(
        images, labels, class_names=INSTANCE_CLASS_NAMES, arch_kwargs={"box_detections_per_img": 5},
        normalisation=Normalisation(mode="range", scale=255.0), epochs=2, batch_size=2, val_fraction=0.34, seed=0,
        device="cuda:0", precision=precision, schedule="cosine")
    assert (meta.provenance["device"], meta.provenance["precision"]) == ("cuda:0", precision)
    assert next(model.parameters()).device.type == "cpu" and all(np.isfinite(r["loss"]) for r in history)
