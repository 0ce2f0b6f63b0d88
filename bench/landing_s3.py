"""Cost of listing an S3 landing zone (images + masks) with their signatures, on a local moto server.

    .venv/bin/python bench/landing_s3.py [--files 2000]

A scheduled incremental run lists the landing zone and signs every file (size + ETag) to decide
which files it need not read again. Compares, in one process on the same bucket, segflow's
``pair_sources`` (signatures from the listing) with asking the object store for each file's info
(one HEAD request per file, as a per-file ``fs.info`` does). Prints requests and seconds; the
ratio is what carries over to a real object store, where each request costs tens of ms.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--files", type=int, default=2000)
    a = p.parse_args()
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                       "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})
    import s3fs

    from segcore import fsio
    from segcore.collection.sources import pair_sources

    fs = s3fs.S3FileSystem()
    fs.mkdir("landing-bench")
    fs.pipe({f"landing-bench/{kind}/img-{i:06d}.png": bytes(64 + i % 7) for i in range(a.files)
             for kind in ("landing", "masks")})
    calls = {"n": 0}
    real = s3fs.S3FileSystem._call_s3

    async def counted(self, method, *args, **kwargs):
        calls["n"] += 1
        return await real(self, method, *args, **kwargs)

    s3fs.S3FileSystem._call_s3 = counted
    t0 = time.perf_counter()
    rows = pair_sources("s3://landing-bench/landing", "s3://landing-bench/masks")
    listed_s, listed_n = time.perf_counter() - t0, calls["n"]
    calls["n"] = 0
    t0 = time.perf_counter()
    per_file = [(fsio.signature(r["source_path"]), fsio.signature(r["mask_path"])) for r in rows]
    head_s, head_n = time.perf_counter() - t0, calls["n"]
    server.stop()
    assert per_file == [(r["source_signature"], r["mask_signature"]) for r in rows]
    print(f"{a.files} images + {a.files} masks on S3 (local moto server):")
    print(f"  pair_sources (signatures from the listing): {listed_n} requests, {listed_s:.2f} s")
    print(f"  one info request per file:                  {head_n} requests, {head_s:.2f} s")
    print(f"RATIO listing / per-file = {listed_s / head_s:.3f} (requests {listed_n / head_n:.4f})")


if __name__ == "__main__":
    main()
