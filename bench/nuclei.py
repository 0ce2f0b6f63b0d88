"""Real data: Mask R-CNN trained by `segflow train` on tiles of the LEFT half of the nuclei image,
evaluated by the pipeline (`segflow run`) on the RIGHT half. Prints the figures for bench/RESULTS.md.

    .venv/bin/python bench/nuclei.py [--epochs 30] [--tile 128] [--stride 64]

Data: tests/data/nuclei (512x512 uint16, 125 nuclei; see its README). Left = columns 0-255,
right = columns 256-511 (whole, 512x256). Objects cut by the split belong to each half as cut.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import tifffile

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.cli import main as segflow  # noqa: E402
from segcore.imageio import read_image, read_mask  # noqa: E402
from segcore.results import open_run  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--stride", type=int, default=64)
    ap.add_argument("--lr", type=float)
    ap.add_argument("--batch-size", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "nuclei"))
    args = ap.parse_args()

    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    image = read_image(ROOT / "tests" / "data" / "nuclei" / "img2d.tif")[..., 0]
    mask = read_mask(ROOT / "tests" / "data" / "nuclei" / "mask2d.tif")
    left_img, left_mask = image[:, :256], mask[:, :256]
    for kind in ("images", "masks"):
        (work / "left" / kind).mkdir(parents=True)
        (work / "right" / kind).mkdir(parents=True)
    n = 0
    for y in range(0, left_img.shape[0] - args.tile + 1, args.stride):
        for x in range(0, left_img.shape[1] - args.tile + 1, args.stride):
            tifffile.imwrite(work / "left" / "images" / f"tile-{n:03d}.tif", left_img[y:y + args.tile, x:x + args.tile])
            tifffile.imwrite(work / "left" / "masks" / f"tile-{n:03d}.tif", left_mask[y:y + args.tile, x:x + args.tile])
            n += 1
    tifffile.imwrite(work / "right" / "images" / "right.tif", image[:, 256:])
    tifffile.imwrite(work / "right" / "masks" / "right.tif", mask[:, 256:])
    print(f"{n} training tiles of {args.tile} px (stride {args.stride}) from the left half; right half 512x256")

    ckpt = work / "nuclei-maskrcnn.safetensors"
    commands = [
        ["ingest", "--images", str(work / "left" / "images"), "--masks", str(work / "left" / "masks"),
         "--mask-kind", "instance", "--store", str(work / "left.zarr")],
        ["train", "--store", str(work / "left.zarr"), "--model", "maskrcnn_r18", "--out", str(ckpt),
         "--epochs", str(args.epochs), "--val-fraction", "0.1", "--normalisation", "percentile",
         "--class-names", "background,nucleus", "--seed", str(args.seed)]
        + (["--lr", str(args.lr)] if args.lr else []) + (["--batch-size", str(args.batch_size)] if args.batch_size else []),
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
                      "tiles": n, "epochs": args.epochs}, indent=2))


if __name__ == "__main__":
    main()
