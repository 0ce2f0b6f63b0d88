"""What segflow needs from the Python packages of a machine, for ``bench/gpu_check.py`` and
``bench/gpu_wheels.sh``: the missing distributions, installed versions that do not fit a
requirement, and the pinned list of wheels to carry to a machine without network access.

    python bench/gpu_packages.py [--have FILE]   # name==version lines, for pip download

Only the standard library and ``packaging`` (for the requirement walk); nothing from segflow.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: Distributions besides segflow's own dependencies (pyproject) that the GPU check needs.
TEST_DISTRIBUTIONS = ("pytest", "hypothesis")
#: Needed by segflow but not by the GPU check (left out of the wheels): why.
NOT_NEEDED = {"duckdb": "only 'segflow report' uses it"}
#: Never carried as wheels: the GPU machine's own torch stack (CUDA builds) stays.
TORCH_STACK = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*)$")
#: Environment markers of the target: CPython 3.12 on x86-64 Linux.
TARGET = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "os_name": "posix"}


def norm(name: str) -> str:
    """A distribution name in its normal form (``Typing_Extensions`` -> ``typing-extensions``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def required_distributions(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """segflow's runtime dependencies (names only, from ``pyproject.toml``) and :data:`TEST_DISTRIBUTIONS`."""
    deps = segflow_requirements(pyproject)
    names = [norm(re.split(r"[\s<>=!~;\[]", d, maxsplit=1)[0]) for d in deps]
    return list(dict.fromkeys(names + [norm(n) for n in TEST_DISTRIBUTIONS]))


def missing_distributions(names: list[str]) -> list[str]:
    """The names of ``names`` with no installed distribution."""
    missing = []
    for name in names:
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append(name)
    return missing


def walk_requirements(roots: list[str]):
    """``(requiring distribution or None, Requirement, installed Distribution or None)`` for segflow's
    requirements ``roots`` and, through the installed distributions, everything they require in turn
    (markers evaluated for CPython 3.12 on x86-64 Linux; each name and extras once)."""
    from packaging.requirements import Requirement

    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo = [(None, Requirement(r)) for r in roots]
    while todo:
        parent, req = todo.pop()
        key = (norm(req.name), tuple(sorted(req.extras)))
        try:
            dist = importlib.metadata.distribution(key[0])
        except importlib.metadata.PackageNotFoundError:
            dist = None
        yield parent, req, dist
        if key in seen or dist is None:
            continue
        seen.add(key)
        for text in dist.requires or []:
            sub = Requirement(text)
            if sub.marker is None or any(sub.marker.evaluate({**TARGET, "extra": e}) for e in ("", *key[1])):
                todo.append((key[0], sub))


def pinned_closure(have: set[str], constraints: Path = ROOT / "constraints.txt") -> list[str]:
    """``name==version`` of segflow's runtime requirements and all that they require in turn
    (:func:`walk_requirements`), less the distributions named in ``have``, the torch stack and
    :data:`NOT_NEEDED`; the versions of ``constraints.txt``, else the installed ones."""
    pins = dict((norm(line.split("==")[0]), line.split("==")[1].split(";")[0].strip())
                for line in constraints.read_text().splitlines() if "==" in line and not line.startswith("#"))
    found = {norm(d.metadata["Name"]): d.version for _, _, d in walk_requirements(segflow_requirements()) if d}
    return [f"{n}=={pins.get(n, v)}" for n, v in sorted(found.items())
            if n not in have and n not in NOT_NEEDED and not TORCH_STACK.match(n)]


def requirement_conflicts() -> list[str]:
    """``"prefect 3.8.8 needs rich<15, found 15.0.0"`` for each installed version that does not fit."""
    conflicts = set()
    for parent, req, dist in walk_requirements(segflow_requirements()):
        if dist is not None and req.specifier and not req.specifier.contains(dist.version, prereleases=True):
            who = f"{parent} {importlib.metadata.version(parent)}" if parent else "segflow"
            conflicts.add(f"{who} needs {req.name}{req.specifier}, found {dist.version}")
    return sorted(conflicts)


def segflow_requirements(pyproject: Path = ROOT / "pyproject.toml") -> list[str]:
    """segflow's runtime requirements as written in ``pyproject.toml`` (``"zarr>=3.0,<4"``, ...)."""
    import tomllib

    return tomllib.loads(pyproject.read_text())["project"]["dependencies"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--have", help="file of distributions the target already has (pip freeze, or names "
                                  "separated by commas or lines): left out")
    args = ap.parse_args(argv)
    have = set()
    if args.have:
        words = [w.strip() for w in re.split(r"[,\n]", Path(args.have).read_text())]
        have = {norm(re.split(r"[\s=<>@]", w, maxsplit=1)[0]) for w in words if w and not w.startswith("#")}
    print("\n".join(pinned_closure(have)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
