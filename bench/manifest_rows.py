"""What a work unit pays to find its rows in the store manifest, as the collection grows.

    .venv/bin/python bench/manifest_rows.py [--images 100000] [--units 20]

Writes a manifest of ``--images`` rows (paths, hashes and signatures as long as real ones) into
a temporary store directory, then looks up the rows of ``--units`` work units of 64 images
(``segcore.run.units.unit_rows``, what every unit does first) and prints the seconds of the first
lookup, which reads the file, and the median of the others, which a worker answers from the
manifest it already read while the file is unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segcore.collection.store import write_manifest  # noqa: E402
from segcore.run.units import unit_rows  # noqa: E402


def manifest_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        digest = hashlib.sha256(str(i).encode()).hexdigest()
        rows.append({"image_id": f"img-{i:06d}",
                     "source_path": f"/data/landing/site-a/batch-{i // 1000:03d}/img-{i:06d}.tif",
                     "sha256": digest, "height": 512, "width": 512, "channels": 1, "dtype": "uint16", "group": "g000",
                     "index": i, "status": "ok", "mask_path": f"/data/landing/site-a/masks/img-{i:06d}.tif",
                     "mask_status": "ok", "batch": 0, "source_signature": f"{262144 + i}:{1700000000000000000 + i}",
                     "mask_sha256": digest[::-1], "mask_signature": f"{262144 + i}:{1700000000000000001 + i}"})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=100_000)
    ap.add_argument("--units", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "collection.zarr")
        os.makedirs(store)
        location = write_manifest(store, manifest_rows(args.images))
        size = os.path.getsize(location)
        seconds = []
        for u in range(args.units):
            start = (u * 7919 * 64) % max(64, args.images - 64)  # spread over the collection
            t = time.perf_counter()
            rows = unit_rows(store, "g000", start, start + 64)
            seconds.append(time.perf_counter() - t)
            assert [r["index"] for r in rows] == list(range(start, start + 64))
        print(f"manifest: {args.images} rows, {size / 1e6:.1f} MB")
        print(f"first unit's lookup: {seconds[0] * 1e3:.1f} ms")
        print(f"later units' lookups: median {statistics.median(seconds[1:]) * 1e3:.1f} ms over {args.units - 1} units")


if __name__ == "__main__":
    main()
