"""CUDA path of inference (autocast + pinned transfers). Marked `gpu`: deselected by default and
skipped where torch sees no CUDA device. Run with `pytest -m gpu` on a GPU machine."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segcore.models.checkpoint import ModelMeta
from segcore.models.predict import TorchPredictor, resolve_device
from segcore.models import create_model
from segcore.normalise import Normalisation

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("precision", ["bf16", "fp16", "fp32"])
def test_cuda_autocast_agrees_with_cpu(precision):
    torch.manual_seed(0)
    model = create_model("unet", in_channels=1, num_classes=3, base=8, depth=3).eval()
    meta = ModelMeta(arch="unet", arch_kwargs={"base": 8, "depth": 3}, class_names=("bg", "a", "b"), in_channels=1,
                     normalisation=Normalisation(mode="range", scale=255.0))
    images = np.random.default_rng(0).integers(0, 255, (4, 96, 80, 1), dtype=np.uint8)
    cpu = TorchPredictor(model, meta, device="cpu").labels(images)
    device = resolve_device("auto")
    assert device.startswith("cuda")
    gpu = TorchPredictor(model.to(device), meta, device=device, precision=precision).labels(images)
    assert gpu.shape == cpu.shape and gpu.dtype == cpu.dtype
    assert (gpu == cpu).mean() >= (0.999 if precision == "fp32" else 0.98)


def test_worker_index_picks_a_gpu():
    n = torch.cuda.device_count()
    assert resolve_device("auto", worker_index=n + 1) == f"cuda:{(n + 1) % n}"
