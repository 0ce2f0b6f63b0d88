"""Cost of telling a model's own failures apart at the prediction seam (``forward_errors``).

Every forward pass of a Predictor runs inside ``segcore.models.failures.forward_errors``, which turns
a model failing on its input into a ModelError (not retried by a run). Prints the cost of entering
and leaving it next to one forward pass of a small UNet, and their ratio.

    python bench/forward_errors.py [--size 256] [--batch-size 8] [--calls 200000]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from segcore.models import create_model  # noqa: E402
from segcore.models.checkpoint import ModelMeta  # noqa: E402
from segcore.models.failures import forward_errors  # noqa: E402
from segcore.models.predict import TorchPredictor  # noqa: E402
from segcore.normalise import Normalisation  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--calls", type=int, default=200_000)
    args = ap.parse_args()
    shape = (args.batch_size, 1, args.size, args.size)
    t0 = time.perf_counter()
    for _ in range(args.calls):
        with forward_errors(shape):
            pass
    seam = (time.perf_counter() - t0) / args.calls
    torch.manual_seed(0)
    meta = ModelMeta(arch="unet", arch_kwargs={"base": 16, "depth": 3}, class_names=("bg", "fg"), in_channels=1,
                     normalisation=Normalisation(mode="range", scale=255.0))
    predictor = TorchPredictor(create_model("unet", base=16, depth=3).eval(), meta, precision="fp32")
    x = torch.rand(*shape)
    with torch.inference_mode():
        predictor.logits(x)  # warm-up
        t0 = time.perf_counter()
        for _ in range(5):
            predictor.logits(x)
    forward = (time.perf_counter() - t0) / 5
    print(f"forward_errors, entered and left: {seam * 1e6:.2f} us; one forward pass of {shape} (UNet base 16, "
          f"depth 3, {torch.get_num_threads()} torch threads): {forward * 1e3:.1f} ms; ratio {seam / forward:.1e}")


if __name__ == "__main__":
    main()
