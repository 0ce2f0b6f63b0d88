"""Peak memory of segmenting one large volume with a 2-D model, in z-slabs, as the depth grows.

For each depth (default 100, 200, 400 slices of 512 x 512), a synthetic uint8 volume with two
foreground classes (smooth 3-D blobs, so that the masks and their surfaces are real) is written as
NIfTI with its label volume, then

    segflow ingest  (the volume becomes slab-chunked slices)
    segflow segment (a 2-D UNet over the slabs, per-slice Dice, per-volume 3-D Dice/HD95/ASSD)

run as subprocesses while this script samples, every 0.1 s, the resident memory (RSS) of each
command's whole process tree: the command, its temporary Prefect server and its Dask workers.
It prints, per depth and command, the peak of the tree's summed RSS and the peak of its largest
process. The model is a small UNet trained for 2 epochs on a 32-slice volume of the same kind
(its quality does not matter here; it must predict foreground so that the surface metrics run).

Not a test: figures go to bench/RESULTS.md.

    .venv/bin/python bench/volume_memory.py --depths 100 200 400
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy.ndimage import gaussian_filter

from tiling import segflow  # bench/tiling.py: a command in a child process, with the peak RSS of its tree

ROOT = Path(__file__).resolve().parents[1]


def synthetic_volume(depth: int, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(size, size, depth)`` uint8 voxels and uint8 labels (0, 1, 2) in NIfTI's (i, j, k) layout."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((size, size, depth), np.uint8)
    image = np.zeros((size, size, depth), np.uint8)
    for z0 in range(0, depth, 50):  # slab by slab: the generator itself stays small
        z1 = min(depth, z0 + 50)
        field = gaussian_filter(rng.normal(size=(size // 8, size // 8, (z1 - z0) // 2 + 1)), sigma=2.0)
        field = np.repeat(np.repeat(np.repeat(field, 8, 0), 8, 1), 2, 2)[:size, :size, : z1 - z0]
        lab = np.where(field > 0.08, 1, 0) + np.where(field < -0.1, 2, 0)
        labels[:, :, z0:z1] = lab
        noise = rng.normal(0, 12, size=lab.shape)
        image[:, :, z0:z1] = np.clip(60 + 70 * lab + noise, 0, 255).astype(np.uint8)
    return image, labels


def write_case(folder: Path, depth: int, size: int, seed: int) -> None:
    image, labels = synthetic_volume(depth, size, seed)
    affine = np.diag([0.7, 0.7, 2.0, 1.0])
    for sub, data in (("images", image), ("masks", labels)):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), str(folder / sub / "vol.nii.gz"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[100, 200, 400])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "volume_memory"))
    args = parser.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    train = out / "train"
    write_case(train, 32, args.size, seed=0)
    for cmd in (["ingest", "--images", str(train / "images"), "--masks", str(train / "masks"),
                 "--store", str(train / "store.zarr")],
                ["train", "--store", str(train / "store.zarr"), "--out", str(train / "model.safetensors"),
                 "--epochs", "2", "--base", "8", "--depth", "3", "--class-names", "background,bright,dark"]):
        segflow(*cmd)
    print(f"{'slices':>6} {'command':>8} {'seconds':>8} {'peak tree RSS GiB':>18} {'peak process RSS GiB':>21}")
    for depth in args.depths:
        case = out / f"d{depth}"
        write_case(case, depth, args.size, seed=depth)
        store = str(case / "store.zarr")
        for name, cmd in (("ingest", ["ingest", "--images", str(case / "images"), "--masks", str(case / "masks"),
                                      "--store", store]),
                          ("segment", ["segment", "--store", store, "--checkpoint", str(train / "model.safetensors"),
                                       "--out", str(case / "run")])):
            m = segflow(*cmd)
            print(f"{depth:>6} {name:>8} {m['seconds']:>8.1f} {m['peak_rss_tree_gib']:>18.2f} "
                  f"{m['peak_rss_largest_process_gib']:>21.2f}", flush=True)
        shutil.rmtree(case / "images")
        shutil.rmtree(case / "masks")


if __name__ == "__main__":
    main()
