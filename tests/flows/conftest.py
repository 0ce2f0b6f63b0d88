"""A small real collection for flow tests: PNG images and masks, with the kinds of damage users have."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from flows.execution import started_cluster
from segcore.config import ExecutionSpec
from segcore.models.checkpoint import ModelMeta, save_checkpoint
from segcore.collection.imageio import write_png
from segcore.models import create_model
from segcore.normalise import Normalisation

N_SMALL, N_LARGE = 40, 12


@pytest.fixture(autouse=True)
def _harness(prefect_harness):
    yield


def module_cluster(spec: ExecutionSpec, *needs: str):
    """A module's autouse fixture: its flows run with ``spec`` (and its CLI commands with the same
    options) share one local cluster, started once (:func:`flows.execution.started_cluster`) instead
    of once a flow. ``needs`` names fixtures that must be set up first: the workers inherit the
    environment once, at their start (``"s3_server"``'s endpoint, for example). A test that changes
    what the workers must see (an environment variable) gives its flows a cluster of their own:
    ``monkeypatch.setattr(flows.execution, "_started", None)``."""

    @pytest.fixture(scope="module", autouse=True)
    def _module_cluster(request, prefect_harness):
        for name in needs:
            request.getfixturevalue(name)
        with started_cluster(spec):
            yield

    return _module_cluster


@pytest.fixture(scope="session")
def collection(tmp_path_factory) -> dict:
    """``images/`` (40 of 48x48 + 12 of 64x80 8-bit gray PNGs, one corrupt file, one with a wrong-size mask),
    ``masks/`` (class maps 0..2; every 7th image has no mask) and a 3-class UNet checkpoint."""
    root = tmp_path_factory.mktemp("collection")
    rng = np.random.default_rng(1)
    (root / "images").mkdir()
    (root / "masks").mkdir()
    for i in range(N_SMALL + N_LARGE):
        h, w = (48, 48) if i < N_SMALL else (64, 80)
        mask = np.zeros((h, w), np.uint8)
        for _ in range(3):
            y, x, r = rng.integers(0, h), rng.integers(0, w), rng.integers(4, 12)
            yy, xx = np.ogrid[:h, :w]
            mask[(yy - y) ** 2 + (xx - x) ** 2 < r * r] = rng.integers(1, 3)
        img = (mask * 90 + rng.integers(0, 40, (h, w))).astype(np.uint8)
        write_png(root / "images" / f"img-{i:03d}.png", img)
        if i % 7:
            write_png(root / "masks" / f"img-{i:03d}.png", mask)
    (root / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    write_png(root / "images" / "wrongmask.png", np.zeros((48, 48), np.uint8))
    write_png(root / "masks" / "wrongmask.png", np.zeros((30, 30), np.uint8))
    torch.manual_seed(0)
    model = create_model("unet", in_channels=1, num_classes=3, base=4, depth=2)
    meta = ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2}, class_names=("background", "a", "b"),
                     in_channels=1, normalisation=Normalisation(mode="range", scale=255.0))
    ckpt = save_checkpoint(root / "model.safetensors", model, meta)
    return {"root": root, "images": str(root / "images"), "masks": str(root / "masks"), "checkpoint": str(ckpt),
            "n_ok": N_SMALL + N_LARGE + 1}


@pytest.fixture(scope="session")
def fitted_checkpoint(tmp_path_factory) -> str:
    """A small UNet (base 4, depth 2, 3 classes) fitted for a few seconds to images like the collection's
    (intensity = class * 90 + noise), so that its masks have foreground and their chunks are written
    (all-background chunks are not stored)."""
    rng = np.random.default_rng(2)
    images, masks = [], []
    yy, xx = np.ogrid[:48, :48]
    for _ in range(16):
        mask = np.zeros((48, 48), np.int64)
        for _ in range(3):
            y, x, r = rng.integers(0, 48), rng.integers(0, 48), rng.integers(4, 12)
            mask[(yy - y) ** 2 + (xx - x) ** 2 < r * r] = rng.integers(1, 3)
        images.append((mask * 90 + rng.integers(0, 40, (48, 48))).astype(np.float32) / 255.0)
        masks.append(mask)
    torch.manual_seed(0)
    model = create_model("unet", in_channels=1, num_classes=3, base=4, depth=2)
    x, y = torch.from_numpy(np.stack(images)[:, None]), torch.from_numpy(np.stack(masks))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and ten times faster on a busy machine
    try:
        for _ in range(60):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    finally:
        torch.set_num_threads(threads)
    meta = ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2}, class_names=("background", "a", "b"),
                     in_channels=1, normalisation=Normalisation(mode="range", scale=255.0))
    return str(save_checkpoint(tmp_path_factory.mktemp("fitted") / "fitted.safetensors", model.eval(), meta))
