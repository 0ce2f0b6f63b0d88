"""bench/gpu_check.sh and its Python half: the figures file from the stages' outputs, and the whole
script on the CPU path with tiny sizes (the GPU run must not be the first time it runs)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from segcore.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def _bench_module(name: str):
    """``bench/<name>.py`` as module ``bench_<name>`` (registered, so that its functions pickle)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gc = _bench_module("gpu_check")
packages = _bench_module("gpu_packages")


def _figures(path: Path) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in path.read_text().splitlines())


@pytest.mark.parametrize("line, expected", [
    ("3 passed, 4 skipped in 12.31s", {"passed": 3, "failed": 0, "skipped": 4, "errors": 0}),
    ("==== 1 failed, 5 passed, 1 warning, 2 errors in 75.20s (0:01:15) ====",
     {"passed": 5, "failed": 1, "skipped": 0, "errors": 2}),
    ("1 error in 0.50s", {"passed": 0, "failed": 0, "skipped": 0, "errors": 1}),
    ("no tests ran in 0.01s", {"passed": 0, "failed": 0, "skipped": 0, "errors": 0}),
])
def test_pytest_counts_read_the_closing_line(line, expected):
    log = f"tests/a.py ..s\n2 passed in 9.9s (an earlier run)\n{line}\n== tests: ok in 13 s\n"
    assert gc.pytest_counts(log) == expected


def test_utilisation_is_taken_inside_the_window_only():
    rows = [(10.0, 50.0, 1, 9), (11.0, 100.0, 2, 9), (12.0, 0.0, 3, 9), (13.0, 30.0, 4, 9)]
    assert gc.utilisation(rows, [10.5, 12.0]) == (50.0, 100.0, 2)
    mean, peak, n = gc.utilisation(rows, [20.0, 30.0])
    assert math.isnan(mean) and math.isnan(peak) and n == 0
    assert gc.utilisation(rows, None)[2] == 0


def test_report_folds_the_stage_outputs_into_every_key(tmp_path):
    (tmp_path / "env.json").write_text(json.dumps({"gpu": "NVIDIA H200", "torch": "2.11.0", "missing_packages": []}))
    (tmp_path / "tests.log").write_text("5 passed, 1 skipped in 40.00s\n")
    (tmp_path / "prepare.json").write_text(json.dumps({"images": 4, "size": 64, "generate_s": 1.5, "ingest_s": 9.0}))
    (tmp_path / "bench.json").write_text(json.dumps({
        "images": 4, "size": 64, "base": 4, "depth": 2, "batch_size": 2, "precision": "bf16", "device": "cuda",
        "bare_ips": 200.0, "pipeline_ips": 100.0, "ratio_end_to_end": 0.5, "ratio_steady": 0.95,
        "pipeline_devices": ["cuda:0"],
        "windows": {"bare_before": [0, 1], "pipeline": [2, 5], "pipeline_steady": [3, 4], "bare_after": [6, 7]}}))
    (tmp_path / "samples.txt").write_text("# backend nvml\n0.5 90 100 1000\n2.5 20 300 1000\n3.5 80 500 1000\n"
                                          "4.5 50 400 1000\n6.5 70 100 1000\n9 99 900 1000\n")
    (tmp_path / "stages.tsv").write_text("tests\tok\t41\nbench\tok\t60\n")
    out = tmp_path / "figures" / "gpu_check.txt"
    assert gc.main(["report", "--work", str(tmp_path), "--out", str(out), "--total-s", "120"]) == 0
    fig = _figures(out)
    assert tuple(fig) == gc.KEYS
    assert fig["gpu"] == "NVIDIA H200" and fig["missing_packages"] == "none"
    assert (fig["tests_passed"], fig["tests_skipped"], fig["tests_status"]) == ("5", "1", "ok")
    assert fig["util_backend"] == "nvml"
    assert float(fig["util_pipeline_mean"]) == pytest.approx((20 + 80 + 50) / 3)
    assert float(fig["util_pipeline_max"]) == 80.0
    assert float(fig["util_steady_mean"]) == 80.0
    assert float(fig["util_bare_mean"]) == 80.0  # 90 before, 70 after
    assert fig["memory_max_mib"] == "500.0" and fig["util_samples"] == "3"
    assert fig["ratio_end_to_end"] == "0.500" and fig["pipeline_devices"] == "cuda:0"
    assert fig["stages"] == "tests ok 41s, bench ok 60s"
    assert fig["pipeline_startup_s"] == "n/a" and fig["gpu_driver"] == "n/a"


def test_report_of_a_check_where_nothing_ran(tmp_path):
    out = tmp_path / "gpu_check.txt"
    assert gc.main(["report", "--work", str(tmp_path), "--out", str(out)]) == 0
    fig = _figures(out)
    assert tuple(fig) == gc.KEYS
    assert fig["tests_status"] == "not run" and fig["util_backend"] == "none" and fig["bare_ips"] == "n/a"


def test_missing_distributions_are_named(tmp_path):
    assert packages.missing_distributions(["pytest", "no-such-distribution-xyz"]) == ["no-such-distribution-xyz"]
    assert {"torch", "prefect", "zarr", "pytest", "hypothesis"} <= set(packages.required_distributions())
    assert packages.requirement_conflicts() == []  # the pinned set fits together


def test_a_version_that_does_not_fit_is_named(monkeypatch):
    monkeypatch.setattr(packages, "segflow_requirements", lambda: ["pytest>=999", "no-such-distribution-xyz>=1"])
    found = importlib.metadata.version("pytest")
    assert packages.requirement_conflicts() == [f"segflow needs pytest>=999, found {found}"]


def test_the_sampler_writes_stamped_samples_until_stopped(tmp_path):
    script = str(REPO / "bench" / "gpu_check.py")
    runs = {}
    for backend in ("cpu", "nvml"):
        out = tmp_path / f"{backend}.txt"
        proc = subprocess.Popen([sys.executable, script, "sample", "--out", str(out), "--backend", backend,
                                 "--interval", "0.05"])
        time.sleep(1.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        runs[backend] = gc.read_samples(out)
    backend, rows = runs["cpu"]
    if backend == "cpu":  # psutil installed
        assert len(rows) >= 3 and all(0 <= r[1] <= 100 and 0 < r[2] <= r[3] for r in rows)
        assert [r[0] for r in rows] == sorted(r[0] for r in rows)
    if not torch.cuda.is_available():
        assert runs["nvml"] == ("none", [])  # no GPU to ask: the report says n/a


def test_the_wheel_list_leaves_out_what_the_target_has(tmp_path):
    have = tmp_path / "have.txt"
    have.write_text("numpy==2.5.2\npyarrow, scipy\n# a comment\n")
    pins = dict(line.split("==") for line in packages.pinned_closure({"numpy", "pyarrow", "scipy"}))
    constraints = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().splitlines()
                       if "==" in line and not line.startswith("#"))
    assert pins["prefect"] == constraints["prefect"] and "zarr" in pins and "distributed" in pins
    assert not {"numpy", "pyarrow", "scipy", "torch", "torchvision", "duckdb"} & set(pins)
    printed = subprocess.run([sys.executable, str(REPO / "bench" / "gpu_packages.py"), "--have", str(have)],
                             capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert printed == [f"{n}=={v}" for n, v in pins.items()]


@pytest.mark.parametrize("args", [["--device", "tpu"], ["--no-such-option"]])
def test_the_script_refuses_bad_arguments_before_any_stage(tmp_path, args):
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), *args, "--work", str(tmp_path / "w")],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2 and not (tmp_path / "w").exists()


def test_throughput_devices_and_parallel_generation(tmp_path, monkeypatch):
    tp = _bench_module("throughput")
    assert tp.pick_device("cpu") == ("cpu", "cpu")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            tp.pick_device("cuda:1")
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "6"  # GPU 1 of those visible, narrowed before CUDA starts
    tp.make_collection(tmp_path / "serial", 3, 32)
    tp.make_collection(tmp_path / "parallel", 3, 32, jobs=2)
    for sub in ("images/img-00000.png", "images/img-00002.png", "masks/img-00001.png"):
        assert (tmp_path / "serial" / sub).read_bytes() == (tmp_path / "parallel" / sub).read_bytes()


@pytest.mark.slow
def test_the_script_runs_every_stage_on_the_cpu(tmp_path):
    """The whole script with the smallest sizes: the gpu tests skip themselves, the benchmark and the
    sampler run on the CPU, and the figures file has every key with the benchmark's figures (about a
    minute on 2 cores: two Prefect servers and clusters, for the ingest and the segment run)."""
    out = tmp_path / "out" / "gpu_check.txt"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu", "--images", "4", "--size", "64", "--base", "4",
         "--depth", "2", "--batch-size", "2", "--jobs", "2", "--work", str(tmp_path / "work"), "--out", str(out),
         "--logs", str(tmp_path / "logs")],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    fig = _figures(out)
    assert tuple(fig) == gc.KEYS
    assert fig["mode"] == "cpu" and fig["device"] == "cpu" and fig["pipeline_devices"] == "cpu"
    assert fig["tests_status"] == "ok" and int(fig["tests_failed"]) == 0
    assert int(fig["tests_passed"]) + int(fig["tests_skipped"]) >= 7  # the gpu tests, skipped without CUDA
    assert fig["images"] == "4" and fig["unet"] == "base 4, depth 2"
    bench = json.loads((tmp_path / "logs" / "gpu_check-bench.json").read_text())
    assert bench["bare_ips"] > 0 and bench["pipeline_ips"] > 0
    assert bench["ratio_end_to_end"] == pytest.approx(bench["pipeline_ips"] / bench["bare_ips"])
    assert float(fig["ratio_end_to_end"]) == pytest.approx(bench["ratio_end_to_end"], abs=0.001)
    assert [s.split()[:2] for s in fig["stages"].split(", ")] == [
        ["preflight", "ok"], ["tests", "ok"], ["prepare", "ok"], ["bench", "ok"]]
    if fig["util_backend"] == "cpu":  # psutil installed: the sampler ran during the pipeline
        assert int(fig["util_samples"]) > 0
    assert "RATIO pipeline/bare (end to end) = " in proc.stdout
