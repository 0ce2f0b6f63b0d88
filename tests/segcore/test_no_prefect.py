"""segcore must run without Prefect: importing the package and every submodule leaves
``prefect`` out of ``sys.modules`` (checked in a fresh interpreter)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

_PROBE = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    import segcore
    names = ["segcore"]
    for info in pkgutil.walk_packages(segcore.__path__, prefix="segcore."):
        importlib.import_module(info.name)
        names.append(info.name)
    leaked = sorted(m for m in sys.modules if m == "prefect" or m.startswith("prefect.") or m.startswith("prefect_"))
    print(json.dumps({"imported": names, "leaked": leaked, "file": segcore.__file__}))
    """
)


def _probe(cwd: Path, extra: str = "") -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    result = subprocess.run(
        [sys.executable, "-c", _PROBE.replace("import segcore\n", f"import segcore\n{extra}\n")],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_segcore_never_imports_prefect(tmp_path: Path) -> None:
    found = _probe(tmp_path)
    assert Path(found["file"]).resolve() == REPO / "segcore" / "__init__.py"
    expected = {".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                for p in (REPO / "segcore").rglob("*.py")} - {"segcore"}
    assert expected <= set(found["imported"])  # the walk reached every module
    assert found["leaked"] == []


def test_the_check_detects_prefect(tmp_path: Path) -> None:
    # The same probe reports prefect when something does import it.
    assert "prefect" in _probe(tmp_path, "import prefect")["leaked"]
