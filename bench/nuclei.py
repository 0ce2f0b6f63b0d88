"""Real data: Mask R-CNN trained by `segflow train` on random crops of the LEFT half of the nuclei
image, evaluated by the pipeline (`segflow run`) on the RIGHT half. Prints the figures for
bench/RESULTS.md.

    .venv/bin/python bench/nuclei.py [--epochs 150] [--crop 128]
    .venv/bin/python bench/nuclei.py --init pretrain --epochs 50   # fine-tuning
    .venv/bin/python bench/nuclei.py --init pretrain --pretrain-epochs 10 --epochs 50 --lr 3e-4
    .venv/bin/python bench/nuclei.py --init pretrain --pretrain-epochs 10 --pretrain-scale auto --epochs 50 --lr 3e-4
    .venv/bin/python bench/nuclei.py --init pretrain --pretrain-epochs 10 --pretrain-scale 1:auto --epochs 50 --lr 3e-4

``--init pretrain`` first trains ``maskrcnn_r18`` on the synthetic instance demo collection
(:func:`segcore.synthetic.generate_instance_collection`, the demo's settings, percentile
normalisation as here) and fine-tunes that model on the left half (``segflow train --init``);
``--init PATH`` fine-tunes an existing instance checkpoint instead. ``--pretrain-scale`` enlarges the
synthetic nuclei (:func:`segcore.synthetic.make_instance_sample`'s ``scale``); ``auto`` matches their
median area to that of the left half's nuclei (the training labels; the right half is not looked at);
``LO:HI`` (e.g. ``1:auto``) gives each nucleus its own size from that range.

Data: tests/data/nuclei (512x512 uint16, 125 nuclei; see its README). Left = columns 0-255,
right = columns 256-511, each stored whole (512x256) so that percentile normalisation sees the
same kind of field in training and evaluation. Objects cut by the split belong to each half as
cut. Training uses every left-half pixel (`--val-fraction 0`: the last epoch is kept; the right
half is never seen before the evaluation).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.cli import main as segflow  # noqa: E402
from segcore.collection.imageio import read_image, read_mask  # noqa: E402
from segcore.run.results import open_run  # noqa: E402


def matching_scale(labels: np.ndarray, *, seed: int, samples: int = 60) -> float:
    """The ``scale`` at which the synthetic nuclei's median area equals that of ``labels``' objects."""
    from segcore.synthetic import make_instance_sample
    from segcore.training import instance as ti

    def areas(lab: np.ndarray) -> np.ndarray:
        return np.unique(lab[lab > 0], return_counts=True)[1]

    size = ti.DEMO_INSTANCE_IMAGE_SIZE
    synthetic = np.concatenate([areas(make_instance_sample(np.random.default_rng(s), size=size)[1])
                                for s in np.random.SeedSequence(seed).spawn(samples)])
    return float(np.sqrt(np.median(areas(labels)) / np.median(synthetic)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=150,
                    help="passes over the left half (each ceil(512*256/crop^2) random crops)")
    ap.add_argument("--crop", type=int, default=128, help="training crop side in px")
    ap.add_argument("--time-budget", type=float, help="stop training after the epoch passing this (s)")
    ap.add_argument("--lr", type=float)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "nuclei"))
    ap.add_argument("--init", help="'pretrain' (train on the synthetic instance demo first) or a maskrcnn_r18 "
                                   "checkpoint to fine-tune")
    ap.add_argument("--pretrain-epochs", type=int, help="epochs of the synthetic pre-training (default: the demo's)")
    ap.add_argument("--pretrain-scale", default="1",
                    help="size of the synthetic nuclei (segcore.synthetic's scale): a number, 'auto' (their "
                         "median area matched to the left half's nuclei), or a range LO:HI of those (each "
                         "nucleus draws its own size, e.g. 1:auto); default 1, the demo's")
    args = ap.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    image = read_image(ROOT / "tests" / "data" / "nuclei" / "img2d.tif")[..., 0]
    mask = read_mask(ROOT / "tests" / "data" / "nuclei" / "mask2d.tif")
    half = image.shape[1] // 2
    for side, cols in (("left", slice(0, half)), ("right", slice(half, None))):
        for kind, array in (("images", image), ("masks", mask)):
            (work / side / kind).mkdir(parents=True)
            tifffile.imwrite(work / side / kind / f"{side}.tif", array[:, cols])
    n_left, n_right = (len(set(mask[:, cols].ravel().tolist())) - 1 for cols in (slice(0, half), slice(half, None)))
    print(f"left half {image.shape[0]}x{half}: {n_left} objects (training); right half: {n_right} objects (evaluation)")

    ckpt = work / "nuclei-maskrcnn.safetensors"
    init: list[str] = []
    if args.init == "pretrain":
        from segcore.synthetic import generate_instance_collection
        from segcore.training import instance as ti

        synthetic = work / "synthetic"
        ends = sorted(matching_scale(mask[:, :half], seed=args.seed) if end == "auto" else float(end)
                      for end in args.pretrain_scale.split(":"))  # 1:auto with auto < 1 is auto:1
        scale = ends[0] if len(ends) == 1 else tuple(ends)
        print("synthetic nuclei at scale " + " to ".join(f"{end:.3f}" for end in ends), flush=True)
        generate_instance_collection(synthetic, n_images=ti.DEMO_INSTANCE_N_IMAGES,
                                     size=ti.DEMO_INSTANCE_IMAGE_SIZE, seed=args.seed, scale=scale)
        parent = work / "synthetic-maskrcnn.safetensors"
        pretrain = [
            ["ingest", "--images", str(synthetic / "images"), "--masks", str(synthetic / "masks"),
             "--mask-kind", "instance", "--store", str(work / "synthetic.zarr")],
            ["train", "--store", str(work / "synthetic.zarr"), "--model", ti.DEMO_INSTANCE_ARCH, "--out", str(parent),
             "--epochs", str(args.pretrain_epochs or ti.DEMO_INSTANCE_EPOCHS), "--batch-size", str(ti.DEMO_INSTANCE_BATCH_SIZE),
             "--normalisation", "percentile", "--class-names", "background,nucleus", "--seed", str(args.seed)],
        ]
        for cmd in pretrain:
            print("$ segflow " + " ".join(cmd), flush=True)
            t = time.perf_counter()
            assert segflow(cmd) == 0, f"segflow {cmd[0]} failed"
            print(f"  {time.perf_counter() - t:.0f} s", flush=True)
        init = ["--init", str(parent)]
    elif args.init:
        init = ["--init", args.init]
    commands = [
        ["ingest", "--images", str(work / "left" / "images"), "--masks", str(work / "left" / "masks"),
         "--mask-kind", "instance", "--store", str(work / "left.zarr")],
        ["train", "--store", str(work / "left.zarr"), "--model", "maskrcnn_r18", "--out", str(ckpt),
         "--epochs", str(args.epochs), "--val-fraction", "0", "--crop-size", str(args.crop),
         "--normalisation", "percentile",
         "--class-names", "background,nucleus", "--seed", str(args.seed)] + init
        + (["--lr", str(args.lr)] if args.lr else []) + (["--batch-size", str(args.batch_size)] if args.batch_size else [])
        + (["--time-budget", str(args.time_budget)] if args.time_budget else []),
        ["run", "--images", str(work / "right" / "images"), "--masks", str(work / "right" / "masks"),
         "--mask-kind", "instance", "--checkpoint", str(ckpt), "--out", str(work / "run"), "--batch-size", "1"],
    ]
    seconds = {}
    for cmd in commands:
        print("$ segflow " + " ".join(cmd), flush=True)
        t = time.perf_counter()
        assert segflow(cmd) == 0, f"segflow {cmd[0]} failed"
        seconds[cmd[0]] = time.perf_counter() - t
    summary = json.loads((work / "run" / "summary.json").read_text())
    metrics = open_run(work / "run").instance_metrics_table().to_pylist()[0]
    fg = [c for c in summary["per_class"] if c["class_id"] == 1][0]
    print(json.dumps({"f1": metrics["f1"], "precision": metrics["precision"], "recall": metrics["recall"],
                      "ap": metrics["ap"], "ap50": metrics["ap50"], "pq": metrics["panoptic_quality"],
                      "tp": metrics["tp"], "fp": metrics["fp"], "fn": metrics["fn"], "n_gt": metrics["n_gt"],
                      "foreground_dice": fg["mean_dice"], "train_seconds": round(seconds["train"], 1),
                      "crop": args.crop, "epochs": args.epochs, "init": args.init, "command": "bench/nuclei.py " + " ".join(sys.argv[1:])},
                     indent=2))


if __name__ == "__main__":
    main()
