"""What a Dask worker pays before its first task: the imports of its warm-up, in fresh interpreters.

Every local cluster segflow starts (one per flow run, unless one is shared) spawns worker processes
that import :data:`flows.execution.WARM_MODULES` before their first task. This script times that
in fresh interpreters (``--repeats`` of each, interleaved so that a busy moment of a shared machine
hits both rows alike) against the floor any torch worker pays, a bare ``import torch``, and prints
the ratio and which heavy packages the warm-up loaded::

    .venv/bin/python bench/worker_start.py [--repeats 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ROWS = {
    "bare torch": "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)",
    "segflow warm-up": (
        "import json, sys, time; t = time.perf_counter()\n"
        "from flows.execution import warm_imports\n"
        "warm_imports(); s = time.perf_counter() - t\n"
        "heavy = ('torchvision', 'torch._dynamo', 'scipy', 'pandas', 'prefect')\n"
        "print(json.dumps({'s': s, 'loaded': [m for m in heavy if m in sys.modules]}))"),
}


def timed(code: str) -> tuple[float, list[str]]:
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()[-1]
    if out.startswith("{"):
        got = json.loads(out)
        return float(got["s"]), list(got["loaded"])
    return float(out), []


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=6, help="fresh interpreters per row (default 6)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    times: dict[str, list[float]] = {name: [] for name in ROWS}
    loaded: list[str] = []
    for i in range(args.repeats):
        names = list(ROWS) if i % 2 == 0 else list(reversed(ROWS))
        for name in names:
            s, mods = timed(ROWS[name])
            times[name].append(s)
            loaded = mods or loaded
            print(f"  {name}: {s:.2f} s", file=sys.stderr)
    med = {name: statistics.median(v) for name, v in times.items()}
    for name, v in times.items():
        print(f"{name}: median {med[name]:.2f} s over {len(v)} interpreters (min {min(v):.2f}, max {max(v):.2f})")
    print(f"RATIO warm-up/bare torch = {med['segflow warm-up'] / med['bare torch']:.2f}")
    print(f"the warm-up loaded: {', '.join(loaded) or 'none of the heavy packages listed'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
