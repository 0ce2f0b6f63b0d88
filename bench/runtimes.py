"""Throughput of one semantic model on each runtime: torch, TorchScript, ONNX Runtime.

A segflow UNet (random weights, seeded) is saved, exported to TorchScript and ONNX, and each record
predicts the same images in the same batches through its Predictor (normalisation included).
Prints images/s per runtime and the ratio to torch.

    python bench/runtimes.py [--size 256] [--images 32] [--batch-size 8] [--base 16] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from segcore.models import create_model  # noqa: E402
from segcore.models.checkpoint import ModelMeta, save_checkpoint  # noqa: E402
from segcore.models.export import export_model  # noqa: E402
from segcore.models.predict import open_predictor  # noqa: E402
from segcore.normalise import Normalisation  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--base", type=int, default=16)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    args = ap.parse_args()
    torch.manual_seed(0)
    images = np.random.default_rng(0).integers(0, 256, (args.images, args.size, args.size, 1), dtype=np.uint8)
    meta = ModelMeta(arch="unet", arch_kwargs={"base": args.base, "depth": 4}, class_names=("bg", "fg"),
                     in_channels=1, normalisation=Normalisation(mode="range", scale=255.0))
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = save_checkpoint(Path(tmp) / "u.safetensors", create_model("unet", base=args.base, depth=4), meta)
        records = {"torch": str(ckpt)}
        for to in ("torchscript", "onnx"):
            records[to] = str(Path(tmp) / f"u-{to}.segflow")
            export_model(ckpt, to=to, out=records[to])
        rates = {}
        for name, rec in records.items():
            predictor = open_predictor(rec, device=args.device, precision=args.precision)
            predictor.labels(images[:args.batch_size], batch_size=args.batch_size)  # warm-up
            t0 = time.perf_counter()
            predictor.labels(images, batch_size=args.batch_size)
            rates[name] = args.images / (time.perf_counter() - t0)
    print(f"UNet base {args.base} depth 4, {args.images} images {args.size}x{args.size}, batch {args.batch_size}, "
          f"{args.device}, {args.precision}, torch threads {torch.get_num_threads()}")
    for name, rate in rates.items():
        print(f"{name:12} {rate:7.2f} images/s  ({rate / rates['torch']:.2f}x torch)")


if __name__ == "__main__":
    main()
