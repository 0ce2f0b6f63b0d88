"""Real CT: a UNet trained by `segflow train` with defaults only on slices z 0-63 of the abdominal CT
(liver and tumour), evaluated by the pipeline (`segflow run`) on slices z 64-95. Prints the
per-class Dice pooled over the evaluated slices, what `--normalisation auto` chose and the
training time, for bench/RESULTS.md.

    .venv/bin/python bench/ct_liver.py [--data ../shared/data/ct-liver] [--workdir DIR] [-- TRAIN OPTIONS]

Options after ``--`` are added to `segflow train` (recipe experiments, e.g. ``-- --depth 4``); the
bar's figure is the run without any.

Pooled Dice of a class = 2 sum TP / (2 sum TP + sum FP + sum FN) over the evaluated slices, from
the run's Dice table (per image and class counts).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from flows.cli import main as segflow  # noqa: E402
from segcore.models.checkpoint import read_meta  # noqa: E402
from segcore.run.results import open_run  # noqa: E402

TRAIN = range(0, 64)
EVAL = range(64, 96)


def pooled_dice(dice_rows: list[dict]) -> dict[str, float]:
    """Per class name: 2 sum TP / (2 sum TP + sum FP + sum FN) over the rows."""
    sums: dict[str, list[int]] = {}
    for r in dice_rows:
        s = sums.setdefault(r["class_name"], [0, 0, 0])
        s[0] += r["tp"]
        s[1] += r["fp"]
        s[2] += r["fn"]
    return {name: 2 * tp / max(1, 2 * tp + fp + fn) for name, (tp, fp, fn) in sums.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "ct-liver"))
    ap.add_argument("--workdir", default=str(ROOT / "bench" / "out" / "ct-liver"))
    ap.add_argument("train_args", nargs=argparse.REMAINDER,
                    help="after --: options added to segflow train (default: none, the defaults-only figure)")
    args = ap.parse_args()
    extra = args.train_args[1:] if args.train_args[:1] == ["--"] else args.train_args

    data, work = Path(args.data), Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    for part, zs in (("train", TRAIN), ("eval", EVAL)):
        for kind in ("images", "masks"):
            (work / part / kind).mkdir(parents=True)
            for z in zs:
                shutil.copy(data / kind / f"ct_z{z:03d}.tif", work / part / kind / f"ct_z{z:03d}.tif")
    ckpt = work / "ct-unet.safetensors"
    steps = [
        ["ingest", "--images", str(work / "train" / "images"), "--masks", str(work / "train" / "masks"),
         "--store", str(work / "train.zarr")],
        ["train", "--store", str(work / "train.zarr"), "--out", str(ckpt), *extra],
        ["run", "--images", str(work / "eval" / "images"), "--masks", str(work / "eval" / "masks"),
         "--checkpoint", str(ckpt), "--out", str(work / "run")],
    ]
    seconds = {}
    for argv in steps:
        print("segflow " + " ".join(argv), flush=True)
        t0 = time.perf_counter()
        if segflow(argv) != 0:
            raise SystemExit(f"segflow {argv[0]} failed")
        seconds[argv[0]] = time.perf_counter() - t0

    meta = read_meta(ckpt)
    p = meta.provenance
    rows = open_run(str(work / "run")).dice_table().to_pylist()
    pooled = pooled_dice([r for r in rows if r["class_id"] > 0])
    print(json.dumps({
        "train_options": extra,
        "pooled_dice_z64_95": {k: round(v, 4) for k, v in pooled.items()},
        "normalisation_auto": p.get("normalisation_choice"),
        "normalisation": p.get("normalisation"),
        "training_seconds": p.get("seconds"), "train_command_seconds": round(seconds["train"], 1),
        "epochs_run": p.get("epochs_run"), "best_epoch": p.get("best_epoch"),
        "val_split": p.get("val_split"), "val_ids": [p["val_ids"][0], p["val_ids"][-1]],
        "val_dice_best_epoch": p.get("val_dice"), "largest_region": p.get("largest_region"),
        **({"refit": p["refit"]} if "refit" in p else {}),
        "torch_threads": p.get("torch_threads"),
    }, indent=2))


if __name__ == "__main__":
    main()
