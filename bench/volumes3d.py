"""Volumes: a 3-D UNet (`unet3d`) trained on synthetic 3-D shapes, scored on held-out volumes.

Training volumes come from `segcore.synthetic_volumes.make_volume_sample` (ellipsoids with a
smooth dome and boxes with 3-D stripes, textured background, noise) drawn from seed 0; the
held-out volumes from seed 1, never seen in training or validation. Training is
`segcore.training.volumes.train_volumes` (random 3-D patches, flips along z, y and x, the 2-D
trainer's loss, loop, validation and best-epoch weights). Prints the Dice per class pooled over
the held-out volumes (2 ΣTP / (2 ΣTP + ΣFP + ΣFN)), their mean over the foreground classes, and
the training time, wall-clock and CPU (the process's CPU seconds: on a shared machine the
wall-clock depends on the other jobs, the CPU time much less), for bench/RESULTS.md.

    .venv/bin/python bench/volumes3d.py [--train 40] [--test 8] [--epochs 14] [--checkpoint PATH]

The bar: mean foreground Dice >= 0.90 on the held-out volumes, on 2 CPU threads within a few
minutes of training.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segcore.metrics.dice import confusion_counts, dice_from_counts  # noqa: E402
from segcore.models.checkpoint import save_checkpoint  # noqa: E402
from segcore.models.predict import TorchPredictor  # noqa: E402
from segcore.normalise import Normalisation  # noqa: E402
from segcore.synthetic_volumes import VOLUME_CLASS_NAMES, make_volume_sample  # noqa: E402
from segcore.training.settings import Recipe  # noqa: E402
from segcore.training.volumes import train_volumes  # noqa: E402


def volumes(n: int, *, seed: int, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """``n`` synthetic ``(D, H, W)`` volumes and class maps, one random stream each."""
    pairs = [make_volume_sample(np.random.default_rng(s), shape=shape) for s in np.random.SeedSequence(seed).spawn(n)]
    return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])


def pooled_dice(pred: np.ndarray, truth: np.ndarray, num_classes: int) -> np.ndarray:
    """Dice per class pooled over ``(N, D, H, W)`` label volumes."""
    n, width = len(pred), pred.shape[-1]
    tp, fp, fn = (c.sum(axis=0) for c in confusion_counts(pred.reshape(n, -1, width), truth.reshape(n, -1, width),
                                                          num_classes))
    return dice_from_counts(tp, fp, fn)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", type=int, default=40, help="training volumes (validation split included)")
    ap.add_argument("--test", type=int, default=8, help="held-out volumes (seed 1)")
    ap.add_argument("--shape", type=int, nargs=3, default=[32, 64, 64], metavar=("D", "H", "W"))
    ap.add_argument("--epochs", type=int, default=14)
    ap.add_argument("--base", type=int, default=8)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--patch", type=int, nargs=3, default=[32, 32, 32], metavar=("D", "H", "W"))
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lr", type=float, default=6e-3)
    ap.add_argument("--fg-fraction", type=float, default=0.5)
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--checkpoint", type=Path, help="also save the trained model here")
    args = ap.parse_args()

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    shape = tuple(args.shape)
    x_train, y_train = volumes(args.train, seed=0, shape=shape)
    x_test, y_test = volumes(args.test, seed=1, shape=shape)
    wall, cpu = time.perf_counter(), time.process_time()
    model, meta, history = train_volumes(
        x_train, y_train, class_names=VOLUME_CLASS_NAMES, arch_kwargs={"base": args.base, "depth": args.depth},
        normalisation=Normalisation(mode="range", scale=255.0), epochs=args.epochs, patch_size=tuple(args.patch),
        batch_size=args.batch_size, lr=args.lr, val_fraction=args.val_fraction, seed=0,
        recipe=Recipe(fg_fraction=args.fg_fraction))
    train_wall, train_cpu = time.perf_counter() - wall, time.process_time() - cpu
    wall, cpu = time.perf_counter(), time.process_time()
    pred = TorchPredictor(model, meta, precision="fp32").labels(x_test[..., None], batch_size=1)
    predict_wall, predict_cpu = time.perf_counter() - wall, time.process_time() - cpu
    dice = pooled_dice(pred, y_test, len(VOLUME_CLASS_NAMES))
    if args.checkpoint is not None:
        save_checkpoint(args.checkpoint, model, meta)
    report = {
        "held_out_dice": {name: round(float(d), 4) for name, d in zip(VOLUME_CLASS_NAMES, dice)},
        "held_out_mean_fg": round(float(dice[1:].mean()), 4),
        "train_wall_s": round(train_wall, 1),
        "train_cpu_s": round(train_cpu, 1),
        "predict_wall_s_per_volume": round(predict_wall / args.test, 2),
        "predict_cpu_s_per_volume": round(predict_cpu / args.test, 2),
        "epochs_run": len(history),
        "best_epoch": meta.provenance["best_epoch"],
        "val_dice_mean_fg": round(meta.provenance["val_dice_mean_fg"], 4),
        "n_train": meta.provenance["n_train"],
        "n_val": meta.provenance["n_val"],
        "n_test": args.test,
        "shape": list(shape),
        "parameters": sum(p.numel() for p in model.parameters()),
        "settings": {k: v for k, v in vars(args).items() if k != "checkpoint"},
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(report, indent=1))
    print(f"held-out mean foreground Dice {report['held_out_mean_fg']:.4f} "
          f"({', '.join(f'{k} {v:.4f}' for k, v in report['held_out_dice'].items())}); "
          f"training {train_wall:.0f} s wall, {train_cpu:.0f} s CPU")


if __name__ == "__main__":
    main()
