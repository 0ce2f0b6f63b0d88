"""The workload of the throughput benchmarks (bench/throughput.py, bench/peers.py).

A synthetic collection of ``n`` 8-bit grey ``size`` x ``size`` PNG images with class masks
(:func:`segcore.synthetic.make_sample`, seeded), its Zarr store ingested by ``segflow ingest``,
and an untrained UNet checkpoint (throughput does not depend on the weights) whose head is
centred so that every class is predicted somewhere: the masks of two ways of doing the work can
then differ, and comparing them means something. Collection and store are kept under the work
directory and reused by later runs of the same size.
"""

from __future__ import annotations

import multiprocessing
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from flows.cli import main as segflow  # noqa: E402
from segcore.collection.imageio import write_png  # noqa: E402
from segcore.models import create_model  # noqa: E402
from segcore.models.checkpoint import ModelMeta, save_checkpoint  # noqa: E402
from segcore.models.predict import TorchPredictor  # noqa: E402
from segcore.synthetic import CLASS_NAMES, make_sample  # noqa: E402
from segcore.training.semantic import DEMO_NORMALISATION  # noqa: E402


def _write_sample(root: Path, i: int, stream: np.random.SeedSequence, size: int) -> None:
    img, mask = make_sample(np.random.default_rng(stream), size=size)
    write_png(root / "images" / f"img-{i:05d}.png", img)
    write_png(root / "masks" / f"img-{i:05d}.png", mask)


def make_collection(root: Path, n: int, size: int, jobs: int = 1) -> None:
    """``root/images/img-00000.png`` ... and the masks of the same names under ``root/masks``; image
    ``i`` is the same whatever the number of ``jobs`` (processes) that make them."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    streams = np.random.SeedSequence(7).spawn(n)
    if jobs <= 1:
        for i, s in enumerate(streams):
            _write_sample(root, i, s, size)
        return
    # fork: the children need only numpy and the PNG writer, and CUDA is not initialised yet.
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        pool.starmap(_write_sample, [(root, i, s, size) for i, s in enumerate(streams)], chunksize=4)


def ensure_store(work: Path, n: int, size: int, *, jobs: int = 1, timings: dict | None = None) -> Path:
    """The ingested store of ``n`` images of ``size`` x ``size`` under ``work`` (made when missing, the
    collection by ``jobs`` processes); the seconds each step took go into ``timings``
    (``generate_s``, ``ingest_s``) when given."""
    timings = {} if timings is None else timings
    coll = work / f"collection-{n}-{size}"
    store = work / f"store-{n}-{size}.zarr"
    if not (coll / "images").exists() or len(list((coll / "images").glob("*.png"))) != n:
        shutil.rmtree(coll, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)
        t = time.perf_counter()
        make_collection(coll, n, size, jobs=jobs)
        timings["generate_s"] = time.perf_counter() - t
        print(f"generated {n} images of {size}x{size} in {time.perf_counter() - t:.1f} s")
    if not store.exists():
        t = time.perf_counter()
        rc = segflow(["ingest", "--images", str(coll / "images"), "--masks", str(coll / "masks"), "--store", str(store)])
        assert rc == 0, "ingest failed"
        timings["ingest_s"] = time.perf_counter() - t
        print(f"ingest: {time.perf_counter() - t:.1f} s ({n / (time.perf_counter() - t):.1f} images/s)")
    return store


def make_checkpoint(work: Path, base: int, depth: int) -> str:
    """An untrained UNet of ``base`` and ``depth`` (seed 0) for the synthetic classes, saved under
    ``work``. Untrained, it tends to give one class everywhere; its head's bias is shifted by minus
    each class's mean logit over four synthetic 64 x 64 images, so that every class wins somewhere."""
    work.mkdir(parents=True, exist_ok=True)
    checkpoint = str(work / f"bench-unet-{base}-{depth}.safetensors")
    torch.manual_seed(0)
    arch = {"base": base, "depth": depth}
    model = create_model("unet", in_channels=1, num_classes=len(CLASS_NAMES), **arch).eval()
    meta = ModelMeta(arch="unet", arch_kwargs=arch, class_names=CLASS_NAMES, in_channels=1,
                     normalisation=DEMO_NORMALISATION)
    images = np.stack([make_sample(np.random.default_rng(i), size=64)[0] for i in range(4)])[..., None]
    predictor = TorchPredictor(model, meta, device="cpu")
    with torch.inference_mode():
        mean_logits = predictor.logits(predictor.prepare(images)).mean(dim=(0, 2, 3))
    with torch.no_grad():
        model.head.bias -= mean_logits
    save_checkpoint(checkpoint, model, meta)
    return checkpoint
