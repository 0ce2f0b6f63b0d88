"""Time of per-volume surface metrics (segcore.metrics.surface.volume_metrics) on a CT-sized volume.

A synthetic ``(100, 512, 512)`` label map with spacing (2.5, 0.7, 0.9) mm: a body filling most of
the volume (class 1), an organ (class 2) and a small lesion (class 3); the prediction is the
ground truth shifted by (1, 3, -2) voxels. Prints the seconds of one ``volume_metrics`` call
without and with the background class, and the figures it returns.

    python bench/surface.py [--depth 100] [--size 512] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from segcore.metrics.surface import volume_metrics  # noqa: E402

SPACING = (2.5, 0.7, 0.9)


def make_volume(depth: int, size: int) -> np.ndarray:
    """``(depth, size, size)`` uint8 labels: ellipsoids scaled to the volume."""
    z, y, x = np.ogrid[:depth, :size, :size]
    z, y, x = z / depth, y / size, x / size
    gt = np.zeros((depth, size, size), dtype=np.uint8)
    for label, (cz, cy, cx), (rz, ry, rx) in (
        (1, (0.5, 0.5, 0.5), (0.48, 0.45, 0.47)),
        (2, (0.5, 0.39, 0.43), (0.30, 0.16, 0.18)),
        (3, (0.6, 0.29, 0.74), (0.10, 0.03, 0.03)),
    ):
        gt[((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1] = label
    return gt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depth", type=int, default=100)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    gt = make_volume(args.depth, args.size)
    pred = np.roll(gt, (1, 3, -2), axis=(0, 1, 2))
    print(f"volume {gt.shape}, spacing {SPACING} mm, classes 0-3")
    for background in (False, True):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            m = volume_metrics(pred, gt, num_classes=4, spacing=SPACING, include_background=background)
            times.append(time.perf_counter() - start)
        print(f"include_background={background}: best {min(times):.2f} s of {args.repeats}")
    for k in range(4):
        print(f"  class {k}: dice {m['dice'][k]:.4f}  hd95 {m['hd95'][k]:.3f} mm  assd {m['assd'][k]:.3f} mm  "
              f"{m['surface_status'][k]}")


if __name__ == "__main__":
    main()
