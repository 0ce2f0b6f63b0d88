#!/usr/bin/env bash
# Wheels for a GPU machine without network access that has Python 3.12 and its own torch:
# everything segflow needs that it lacks, for `bench/gpu_check.sh --wheels DEST`.
#
#   bench/gpu_wheels.sh DEST [HAVE]
#
# HAVE: a file naming the distributions the target already has (its `pip freeze`, or names
# separated by commas or lines); they are left out, and so are torch, torchvision, triton and
# the nvidia-*/cuda-* packages (the target's CUDA builds stay) and duckdb (only `segflow report`
# uses it). Versions are those of constraints.txt. Run it where pip reaches the package index;
# it prints the total size (what travels with the repository).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="${1:?usage: bench/gpu_wheels.sh DEST [HAVE]}"
HAVE="${2:-}"
if [ -n "${PYTHON:-}" ]; then :;
elif [ -x "$ROOT/.venv/bin/python" ]; then PYTHON="$ROOT/.venv/bin/python";
else PYTHON="$(command -v python3)"; fi

mkdir -p "$DEST"
REQS="$(mktemp)"
trap 'rm -f "$REQS"' EXIT
"$PYTHON" "$ROOT/bench/gpu_packages.py" ${HAVE:+--have "$HAVE"} > "$REQS"
echo "$(wc -l < "$REQS") distributions to fetch as CPython 3.12 x86-64 Linux wheels into $DEST"
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" -r "$REQS"
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
