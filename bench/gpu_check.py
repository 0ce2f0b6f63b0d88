"""The Python half of ``bench/gpu_check.sh``: what is installed, GPU samples, and the figures file.

Three commands, each run by the script under its own time limit:

- ``preflight``: the interpreter, torch and its CUDA view, the GPU (torch, else ``nvidia-smi``) and
  every package that the ``gpu`` tests and the benchmark need that is missing; writes ``env.json``
  and ``ready.sh`` (``READY_TESTS=0|1``, ``READY_BENCH=0|1``, sourced by the script).
- ``sample``: until stopped (SIGTERM or SIGINT), one line per sample to a file: Unix time,
  utilisation in percent, memory used and total in MiB. Backends: NVML (``pynvml``), else
  ``nvidia-smi`` in its own loop, else (``--backend cpu``) the machine's CPU and memory through
  psutil, else nothing (the report then says ``n/a``).
- ``report``: folds the stages' outputs into one ``key: value`` figures file and prints it.

Imports nothing from segflow, and at module level only the standard library and
``bench/gpu_packages.py``, so that it runs and says what is missing on a machine where segflow's
packages are not installed.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.gpu_packages import (NOT_NEEDED, missing_distributions, norm,  # noqa: E402
                                required_distributions, requirement_conflicts)

#: Optional: per-test time limits (without them only the stage's limit applies), and the samplers.
OPTIONAL_DISTRIBUTIONS = ("pytest-timeout", "nvidia-ml-py", "psutil")
#: Modules whose import proves a stage can start (catches versions that do not fit, too).
TEST_MODULES = ("segcore.models.predict", "segcore.run.units", "segcore.training.semantic", "hypothesis", "pytest")
BENCH_MODULES = ("flows.cli", "flows.pipeline", "segcore.run.start", "prefect", "distributed")

#: Every key the figures file has, in order (``n/a`` where a stage did not give it).
KEYS = (
    "mode", "date", "gpu", "gpu_driver", "torch", "cuda", "python", "missing_packages",
    "tests_passed", "tests_failed", "tests_skipped", "tests_errors", "tests_status",
    "images", "size", "unet", "batch_size", "precision", "device", "generate_s", "ingest_s",
    "bare_before_ips", "bare_after_ips", "bare_ips", "pipeline_ips", "pipeline_steady_ips",
    "ratio_end_to_end", "ratio_steady", "pipeline_startup_s", "pipeline_units", "pipeline_devices",
    "util_backend", "util_pipeline_mean", "util_pipeline_max", "util_steady_mean", "util_bare_mean",
    "util_samples", "memory_max_mib", "memory_total_mib", "stages", "total_s",
)


def import_errors(modules: tuple[str, ...]) -> dict[str, str]:
    """``{module: "ExceptionType: message"}`` for each of ``modules`` that does not import."""
    errors = {}
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any failure means the stage cannot start
            errors[module] = f"{type(exc).__name__}: {exc}"
    return errors


def _smi(query: str) -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def preflight(args: argparse.Namespace) -> int:
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    env: dict = {"python": f"{sys.version.split()[0]} ({sys.executable})", "torch": None, "cuda": None, "gpu": None}
    missing = [n for n in missing_distributions(required_distributions()) if n not in NOT_NEEDED]
    try:
        conflicts = requirement_conflicts()
    except Exception as exc:  # noqa: BLE001 - packaging absent: the import checks below still tell
        conflicts = [f"not checked ({type(exc).__name__}: {exc})"]
    optional = missing_distributions([norm(n) for n in OPTIONAL_DISTRIBUTIONS])
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        if torch.cuda.is_available():
            env["gpu"] = f"{torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})"
    except Exception as exc:  # noqa: BLE001
        env["torch_error"] = f"{type(exc).__name__}: {exc}"
    smi = _smi("name,driver_version,memory.total")
    if smi:
        name, driver, total = [s.strip() for s in smi.split(",")]
        env["gpu"] = env["gpu"] or name
        env["gpu_driver"] = driver
        env["gpu_memory_mib"] = total
    test_errors = import_errors(TEST_MODULES)
    bench_errors = import_errors(BENCH_MODULES)
    env.update(missing_packages=missing, missing_optional=optional, requirement_conflicts=conflicts, test_import_errors=test_errors,
               bench_import_errors=bench_errors)
    wants_gpu = args.device != "cpu"
    ready_tests = not test_errors and env["torch"] is not None
    ready_bench = not bench_errors and (env["gpu"] is not None or not wants_gpu)
    (work / "env.json").write_text(json.dumps(env, indent=1))
    (work / "ready.sh").write_text(f"READY_TESTS={int(ready_tests)}\nREADY_BENCH={int(ready_bench)}\n")

    print(f"python: {env['python']}")
    print(f"torch: {env['torch']} (CUDA {env['cuda']})" if env["torch"] else f"torch: MISSING {env.get('torch_error')}")
    print(f"gpu: {env['gpu'] or 'none seen (torch sees no CUDA device, nvidia-smi absent or failing)'}"
          + (f", driver {env['gpu_driver']}" if env.get("gpu_driver") else ""))
    print("required packages missing: " + (", ".join(missing) if missing else "none"))
    if optional:
        print("optional packages missing (their part degrades): " + ", ".join(optional))
    for conflict in conflicts:
        print(f"version conflict: {conflict}")
    for what, errors in (("gpu tests", test_errors), ("benchmark", bench_errors)):
        for module, error in errors.items():
            print(f"cannot start the {what}: import {module} failed: {error}")
    if wants_gpu and env["gpu"] is None:
        print("cannot run the benchmark on a GPU: no CUDA device seen (use --cpu for the CPU path)")
    if missing or test_errors or bench_errors:
        print("install the missing packages (bench/gpu_wheels.sh prepares them as wheels for a machine "
              "without network access; pass the folder with --wheels)")
    return 0


_STOP = False


def _stop(*_: object) -> None:
    global _STOP
    _STOP = True


def _nvml_sampler(index: int):
    import pynvml

    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(index)

    def sample() -> tuple[float, float, float]:
        util = pynvml.nvmlDeviceGetUtilizationRates(handle).gpu
        mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
        return float(util), mem.used / 2**20, mem.total / 2**20
    return sample


def _cpu_sampler(index: int):
    import psutil

    psutil.cpu_percent(interval=None)

    def sample() -> tuple[float, float, float]:
        mem = psutil.virtual_memory()
        return psutil.cpu_percent(interval=None), (mem.total - mem.available) / 2**20, mem.total / 2**20
    return sample


def _smi_loop(out, index: int, interval: float) -> None:
    """``nvidia-smi`` in its own loop; each line stamped with the time it arrived."""
    proc = subprocess.Popen(["nvidia-smi", "-i", str(index), "--query-gpu=utilization.gpu,memory.used,memory.total",
                             "--format=csv,noheader,nounits", f"-lms={max(100, int(interval * 1000))}"],
                            stdout=subprocess.PIPE, text=True)
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    signal.signal(signal.SIGINT, lambda *_: proc.terminate())
    for line in proc.stdout:
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 3 and all(re.fullmatch(r"[\d.]+", p) for p in parts):
            out.write(f"{time.time():.3f} {parts[0]} {parts[1]} {parts[2]}\n")
            out.flush()
    proc.wait()


def sample(args: argparse.Namespace) -> int:
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    order = {"auto": ("nvml", "smi"), "nvml": ("nvml",), "smi": ("smi",), "cpu": ("cpu",)}[args.backend]
    chosen, sampler = "none", None
    for backend in order:
        if backend == "smi":
            if shutil.which("nvidia-smi"):
                chosen = "smi"
                break
            continue
        try:
            sampler = {"nvml": _nvml_sampler, "cpu": _cpu_sampler}[backend](args.index)
            sampler()  # a device that does not report utilisation fails here, not in the loop
        except Exception:  # noqa: BLE001 - the next backend, or none
            sampler = None
            continue
        chosen = backend
        break
    with open(args.out, "w") as out:
        out.write(f"# backend {chosen}\n")
        out.flush()
        if chosen == "smi":
            _smi_loop(out, args.index, args.interval)
        elif sampler is not None:
            while not _STOP:
                try:
                    util, used, total = sampler()
                except Exception:  # noqa: BLE001 - one sample missed; the next may succeed
                    pass
                else:
                    out.write(f"{time.time():.3f} {util:.1f} {used:.0f} {total:.0f}\n")
                    out.flush()
                time.sleep(args.interval)
    return 0


def read_samples(path: Path) -> tuple[str, list[tuple[float, float, float, float]]]:
    """``(backend, [(unix time, util %, used MiB, total MiB), ...])`` of a ``sample`` file."""
    if not path.exists():
        return "none", []
    backend, rows = "none", []
    for line in path.read_text().splitlines():
        if line.startswith("# backend"):
            backend = line.split()[-1]
        elif line.strip():
            try:
                t, util, used, total = (float(v) for v in line.split())
            except ValueError:
                continue
            rows.append((t, util, used, total))
    return backend, rows


def utilisation(rows: list[tuple[float, float, float, float]], window: list[float] | None) -> tuple[float, float, int]:
    """``(mean, max, count)`` of the utilisation samples inside ``[start, end]`` (NaNs when none)."""
    inside = [r[1] for r in rows if window and window[0] <= r[0] <= window[1]]
    if not inside:
        return float("nan"), float("nan"), 0
    return sum(inside) / len(inside), max(inside), len(inside)


def pytest_counts(log: str) -> dict[str, int]:
    """``{"passed": n, "failed": n, "skipped": n, "errors": n}`` from pytest's closing summary line."""
    counts = {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}
    lines = [ln for ln in log.splitlines() if re.search(r"\bin [\d.]+s\b", ln) or "no tests ran" in ln]
    for number, word in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", lines[-1] if lines else ""):
        key = "errors" if word.startswith("error") else word
        if key in counts:
            counts[key] = int(number)
    return counts


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _fmt(value: object) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


def figures(work: Path, mode: str, total_s: float | None) -> dict[str, object]:
    """The figures of one check from the stage outputs in ``work`` (every key of :data:`KEYS`)."""
    env = _read_json(work / "env.json")
    prep = _read_json(work / "prepare.json")
    bench = _read_json(work / "bench.json")
    stages = [line.split("\t") for line in (work / "stages.tsv").read_text().splitlines()
              ] if (work / "stages.tsv").exists() else []
    status = {s[0]: s[1] for s in stages if len(s) >= 3}
    log = (work / "tests.log").read_text(errors="replace") if (work / "tests.log").exists() else ""
    counts = pytest_counts(log)
    backend, rows = read_samples(work / "samples.txt")
    windows = bench.get("windows", {})
    pipe_mean, pipe_max, n_pipe = utilisation(rows, windows.get("pipeline"))
    steady_mean, _, _ = utilisation(rows, windows.get("pipeline_steady"))
    bare = [utilisation(rows, windows.get(k)) for k in ("bare_before", "bare_after")]
    bare_n = sum(b[2] for b in bare)
    bare_mean = sum(b[0] * b[2] for b in bare if b[2]) / bare_n if bare_n else float("nan")
    pipe_rows = [r for r in rows if windows.get("pipeline") and windows["pipeline"][0] <= r[0] <= windows["pipeline"][1]]
    out = {
        "mode": mode, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "gpu": env.get("gpu") or "none", "gpu_driver": env.get("gpu_driver"), "torch": env.get("torch"),
        "cuda": env.get("cuda"), "python": env.get("python"), "missing_packages": env.get("missing_packages"),
        "tests_passed": counts["passed"], "tests_failed": counts["failed"], "tests_skipped": counts["skipped"],
        "tests_errors": counts["errors"], "tests_status": status.get("tests", "not run"),
        "images": bench.get("images", prep.get("images")), "size": bench.get("size", prep.get("size")),
        "unet": f"base {bench['base']}, depth {bench['depth']}" if "base" in bench else None,
        "batch_size": bench.get("batch_size"), "precision": bench.get("precision"), "device": bench.get("device"),
        "generate_s": prep.get("generate_s"), "ingest_s": prep.get("ingest_s"),
        "bare_before_ips": bench.get("bare_before_ips"), "bare_after_ips": bench.get("bare_after_ips"),
        "bare_ips": bench.get("bare_ips"), "pipeline_ips": bench.get("pipeline_ips"),
        "pipeline_steady_ips": bench.get("steady_ips"), "ratio_end_to_end": bench.get("ratio_end_to_end"),
        "ratio_steady": bench.get("ratio_steady"), "pipeline_startup_s": bench.get("startup_s"),
        "pipeline_units": bench.get("units"), "pipeline_devices": bench.get("pipeline_devices"),
        "util_backend": backend, "util_pipeline_mean": pipe_mean, "util_pipeline_max": pipe_max,
        "util_steady_mean": steady_mean, "util_bare_mean": bare_mean, "util_samples": n_pipe,
        "memory_max_mib": max((r[2] for r in pipe_rows), default=None),
        "memory_total_mib": pipe_rows[0][3] if pipe_rows else None,
        "stages": [f"{s[0]} {s[1]} {float(s[2]):.0f}s" for s in stages if len(s) >= 3],
        "total_s": None if total_s is None else round(total_s),
    }
    assert tuple(out) == KEYS
    return out


def report(args: argparse.Namespace) -> int:
    work = Path(args.work)
    text = "".join(f"{k}: {_fmt(v)}\n" for k, v in figures(work, args.mode, args.total_s).items())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)
    print(text, end="")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("preflight", help="what is installed; writes WORK/env.json and WORK/ready.sh")
    p.add_argument("--work", required=True)
    p.add_argument("--device", default="cuda", help="cpu, cuda or cuda:N: whether a GPU is required")
    p = sub.add_parser("sample", help="utilisation and memory samples until SIGTERM")
    p.add_argument("--out", required=True)
    p.add_argument("--index", type=int, default=0, help="GPU index (nvidia-smi's numbering)")
    p.add_argument("--interval", type=float, default=0.2, help="seconds between samples")
    p.add_argument("--backend", choices=["auto", "nvml", "smi", "cpu"], default="auto")
    p = sub.add_parser("report", help="the figures file from the stage outputs in WORK")
    p.add_argument("--work", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mode", default="gpu")
    p.add_argument("--total-s", type=float)
    args = ap.parse_args(argv)
    return {"preflight": preflight, "sample": sample, "report": report}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
