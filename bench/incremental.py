"""Cost of scheduled incremental runs: a first run, a run with nothing new, and a run with a few new files.

    .venv/bin/python bench/incremental.py [--images 2000] [--new 50] [--size 128]

Each run is ``segflow run --incremental`` as its own process, with a tiny UNet (the point is the
ingest side: listing and hashing the landing zone, appending to the store, publishing to the lake).
Prints seconds per run and the ratio of a "nothing new" run to the first run.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segcore.models.checkpoint import ModelMeta, save_checkpoint  # noqa: E402
from segcore.collection.imageio import write_png  # noqa: E402
from segcore.models import create_model  # noqa: E402
from segcore.normalise import Normalisation  # noqa: E402
from segcore.synthetic import CLASS_NAMES, make_sample  # noqa: E402


def _drop(landing: Path, masks: Path, first: int, count: int, size: int) -> None:
    for i in range(first, first + count):
        image, mask = make_sample(np.random.default_rng(i), size=size)
        write_png(landing / f"img-{i:06d}.png", image)
        write_png(masks / f"img-{i:06d}.png", mask)


def _run(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([str(Path(sys.executable).parent / "segflow"), "run", "--incremental", *args], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--new", type=int, default=50)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--out", default=str(ROOT / "bench" / "out" / "incremental"))
    a = p.parse_args()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    (out / "landing").mkdir(parents=True)
    (out / "masks").mkdir()
    torch.manual_seed(0)
    ckpt = save_checkpoint(out / "tiny.safetensors", create_model("unet", in_channels=1, num_classes=3, base=4, depth=2),
                           ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2}, class_names=CLASS_NAMES,
                                     in_channels=1, normalisation=Normalisation(mode="range", scale=255.0)))
    args = ["--images", str(out / "landing"), "--masks", str(out / "masks"), "--store", str(out / "store.zarr"),
            "--checkpoint", str(ckpt), "--out", str(out / "run"), "--lake", str(out / "lake")]
    _drop(out / "landing", out / "masks", 0, a.images, a.size)
    first = _run(args)
    quiet = _run(args)
    _drop(out / "landing", out / "masks", a.images, a.new, a.size)
    few = _run(args)
    print(f"{a.images} images of {a.size}x{a.size} in the landing zone, tiny UNet, one process per run:")
    print(f"  first run (ingest + segment {a.images}): {first:.1f} s")
    print(f"  nothing new:                             {quiet:.1f} s")
    print(f"  {a.new} new images:                          {few:.1f} s")
    print(f"RATIO nothing-new / first = {quiet / first:.3f}")
    print(f"RATIO {a.new}-new / first = {few / first:.3f}")


if __name__ == "__main__":
    main()
