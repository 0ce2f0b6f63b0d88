"""The `segflow` command line as users run it (a subprocess): --version, one-line user errors with
exit status 2 (Prefect's lines and tracebacks only with -v), plain progress lines when not on a
terminal, and progress reports that cross from Dask worker processes to the flow's process."""

from __future__ import annotations

import io
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from prefect import flow, task
from prefect_dask import DaskTaskRunner

from flows.cli import main
from flows.console import BarProgress, PlainProgress, QuietFilter, one_line, progress_line
from segcore import __version__
from segcore.collection.imageio import write_png
from segcore.config import SegmentSpec, TrainSpec
from segcore.models import create_model
from segcore.models.checkpoint import ModelMeta, save_checkpoint
from segcore.normalise import Normalisation
from segcore.run.results import open_run
from segcore.synthetic import generate_collection
from tasks.progress import ProgressEvent, listen, relay_from_workers, report

REPO = Path(__file__).resolve().parents[2]
QUIET_KEYS = ("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "DASK_LOGGING__DISTRIBUTED")


def segflow(*args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run ``segflow ARGS`` as a user would, with pipes (not a terminal) for stdout and stderr."""
    env = {k: v for k, v in os.environ.items() if k not in QUIET_KEYS}
    env.update(PYTHONPATH=str(REPO), PREFECT_SERVER_ANALYTICS_ENABLED="false")  # the session's Prefect API stays
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=REPO)


def _checkpoint(path: Path, *, in_channels: int) -> str:
    torch.manual_seed(0)
    model = create_model("unet", in_channels=in_channels, num_classes=3, base=4, depth=2)
    meta = ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2}, class_names=("background", "a", "b"),
                     in_channels=in_channels, normalisation=Normalisation(mode="range", scale=255.0))
    return str(save_checkpoint(path, model, meta))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    """`segflow run` on 11 grey images of three sizes (6 of 32x32 with masks, 3 of 40x40, 2 of 24x48):
    three groups of one chunk each, so 3 chunks ingested and 3 units segmented."""
    root = tmp_path_factory.mktemp("cli")
    generate_collection(root / "col", n_images=6, size=32, seed=0)
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(40, 40)] * 3 + [(24, 48)] * 2):
        write_png(root / "col" / "images" / f"extra-{i}.png", rng.integers(0, 255, (h, w), dtype=np.uint8))
    gray, two = _checkpoint(root / "gray.safetensors", in_channels=1), _checkpoint(root / "two.safetensors",
                                                                                   in_channels=2)
    store, out = str(root / "store.zarr"), str(root / "run")
    proc = segflow("run", "--images", str(root / "col" / "images"), "--masks", str(root / "col" / "masks"),
                   "--store", store, "--checkpoint", gray, "--out", out, "--workers", "1", "--threads-per-worker", "1")
    return {"proc": proc, "store": store, "out": out, "gray": gray, "two_channel": two, "root": root}


def test_version_prints_the_package_version() -> None:
    proc = segflow("--version")
    assert proc.returncode == 0
    assert proc.stdout == f"segflow {__version__}\n"


def test_run_off_a_terminal_prints_plain_progress_lines_to_the_end(tiny_run) -> None:
    proc = tiny_run["proc"]
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    ingest = [ln for ln in lines if ln.startswith("ingest: ")]
    segment = [ln for ln in lines if ln.startswith("segment: ")]
    assert ingest and ingest[-1] == "ingest: 3/3 chunks, 11 images"
    assert segment[0] == "segment: 0/3 units, starting"
    assert segment[-1].startswith("segment: 3/3 units, 11 images, ") and segment[-1].endswith(" images/s")
    # quiet: nothing but progress on stderr (no Prefect or Dask lines), the summary on stdout
    assert lines == ingest + segment
    assert proc.stdout.startswith("# segflow run ")


def test_a_checkpoint_that_does_not_fit_the_store_is_one_line_and_exit_2(tiny_run) -> None:
    proc = segflow("segment", "--store", tiny_run["store"], "--checkpoint", tiny_run["two_channel"],
                   "--out", str(tiny_run["root"] / "rgb-run"))
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("segflow: error: ")
    assert "the images have 1 channel(s) and the model takes 2" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_a_missing_checkpoint_is_one_line_and_exit_2(tiny_run) -> None:
    missing = str(tiny_run["root"] / "no-such.safetensors")
    proc = segflow("segment", "--store", tiny_run["store"], "--checkpoint", missing,
                   "--out", str(tiny_run["root"] / "missing-run"))
    assert proc.returncode == 2
    assert proc.stderr.startswith("segflow: error: ") and proc.stderr.count("\n") == 1
    assert "no-such.safetensors" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", ["segment", "run"])
def test_a_missing_or_broken_model_fails_before_the_cluster_starts(tmp_path, monkeypatch, capsys, command) -> None:
    import flows.execution

    for key in QUIET_KEYS:  # main() quietens Prefect through the environment; restored afterwards
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(flows.execution, "started_cluster", lambda *a, **k: pytest.fail("a cluster was started"))
    (tmp_path / "images").mkdir()
    where = ["--store", str(tmp_path / "s.zarr")] if command == "segment" else ["--images", str(tmp_path / "images")]
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    for name, says in (("no-such.safetensors", "does not exist"), ("junk.safetensors", "is not a segflow checkpoint")):
        assert main([command, *where, "--checkpoint", str(tmp_path / name), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("segflow: error: ") and err.count("\n") == 1 and name in err and says in err
    assert not (tmp_path / "out").exists()
    # a GPU that local workers could not use: told before the cluster (and any ingest) starts
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = _checkpoint(tmp_path / "m.safetensors", in_channels=1)
    for device in ("cuda", "cuda:1"):
        assert main([command, *where, "--checkpoint", model, "--out", str(tmp_path / "out"), "--device", device]) == 2
        err = capsys.readouterr().err
        assert err.startswith("segflow: error: ") and err.count("\n") == 1 and "torch sees no CUDA device" in err
    if command == "run":  # instance labels scored by a 3-class model: told before anything is ingested
        (tmp_path / "masks").mkdir()
        assert main([command, *where, "--masks", str(tmp_path / "masks"), "--mask-kind", "instance",
                     "--checkpoint", model, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("segflow: error: instance-label ground truth is scored as foreground vs background, "
                              "but the model has 3 classes") and err.count("\n") == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "s.zarr").exists()


def test_missing_inputs_are_told_before_the_cluster_starts(tmp_path, monkeypatch, capsys) -> None:
    import flows.execution

    for key in QUIET_KEYS:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setattr(flows.execution, "started_cluster", lambda *a, **k: pytest.fail("a cluster was started"))
    (tmp_path / "images").mkdir()
    model = _checkpoint(tmp_path / "m.safetensors", in_channels=1)
    nowhere, store = str(tmp_path / "nowhere"), str(tmp_path / "s.zarr")
    for argv, says in (
        (["ingest", "--images", nowhere, "--store", store], f"{nowhere} does not exist; give a directory of images"),
        (["run", "--images", nowhere, "--checkpoint", model, "--out", str(tmp_path / "out")], f"{nowhere} does not"),
        (["ingest", "--images", str(tmp_path / "images"), "--masks", nowhere, "--store", store],
         f"mask directory {nowhere!r} does not exist"),
        (["segment", "--store", store, "--checkpoint", model, "--out", str(tmp_path / "out")],
         f"store {store!r} does not exist; create it with 'segflow ingest'"),
        (["train", "--store", store, "--out", str(tmp_path / "t.safetensors")], f"store {store!r} does not exist"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"segflow: error: {says}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and not os.path.exists(store)
    # outputs that cannot be written where they are asked for: told before any work, in one line
    file = tmp_path / "a-file"
    file.write_text("x")
    for argv, says in (
        (["run", "--images", str(tmp_path / "images"), "--checkpoint", model, "--out", str(file)],
         f"cannot write the run directory {str(file)!r}: {file} is a file, not a folder; give another --out"),
        (["ingest", "--images", str(tmp_path / "images"), "--store", str(file / "s.zarr")],
         f"cannot write the store {str(file / 's.zarr')!r}: {file} is a file, so nothing can be made under it; "
         "give another --store"),
        (["report", "--lake", str(tmp_path / "no-lake"), "--plots", str(file)],
         f"cannot write the plots folder {str(file)!r}: {file} is a file, not a folder; give another --plots"),
        (["export", str(tmp_path / "no-run"), "--out", str(file)],
         f"cannot write the export folder {str(file)!r}: {file} is a file, not a folder; give another --out"),
    ):
        assert main(argv) == 2
        captured = capsys.readouterr()
        assert captured.err == f"segflow: error: {says}\n" and captured.out == "", captured
    assert file.read_text() == "x"


def test_a_quiet_command_line_shows_segflows_warnings(tmp_path) -> None:
    """Prefect's logging setup, run when Prefect is imported, must leave the quiet console handler in
    place: the files an ingest could not read are named on stderr, Prefect's own lines are not. What
    segflow's code warns of in a Dask worker process (training runs there) shows too, once."""
    generate_collection(tmp_path / "col", n_images=3, size=32, seed=1)
    (tmp_path / "col" / "images" / "broken.png").write_bytes(b"not a png")
    store = str(tmp_path / "s.zarr")
    proc = segflow("ingest", "--images", str(tmp_path / "col" / "images"), "--masks", str(tmp_path / "col" / "masks"),
                   "--store", store)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert any(ln.startswith("WARNING: ingest: 1 file(s) could not be read and are error rows of the manifest: "
                             "broken.png (") for ln in lines), proc.stderr
    assert not any("prefect" in ln.lower() or "Flow run" in ln for ln in lines), proc.stderr
    proc = segflow("train", "--store", store, "--out", str(tmp_path / "m.safetensors"), "--epochs", "3",
                   "--time-budget", "0.01", "--base", "4", "--depth", "2", "--workers", "1")
    assert proc.returncode == 0, proc.stderr
    budget = [ln for ln in proc.stderr.splitlines() if "time budget of 0 s spent after epoch 1 of 3" in ln]
    assert budget == ["WARNING: time budget of 0 s spent after epoch 1 of 3; stopping early"], proc.stderr
    kept = (tmp_path / "m.safetensors").read_bytes()
    proc = segflow("train", "--store", store, "--out", str(tmp_path / "m.safetensors"), "--epochs", "1")
    assert proc.returncode == 2 and (tmp_path / "m.safetensors").read_bytes() == kept
    assert proc.stderr == (f"segflow: error: {str(tmp_path / 'm.safetensors')!r} exists; give a new --out, or pass "
                           "--overwrite to replace it (overwrite: true in a training spec)\n"), proc.stderr


def test_ctrl_c_ends_the_command_at_once_with_its_processes_and_the_same_command_resumes(tmp_path) -> None:
    import psutil

    generate_collection(tmp_path / "col", n_images=200, size=96, seed=2)
    model = _checkpoint(tmp_path / "m.safetensors", in_channels=1)
    args = ["run", "--images", str(tmp_path / "col" / "images"), "--masks", str(tmp_path / "col" / "masks"),
            "--checkpoint", model, "--out", str(tmp_path / "run"), "--batch-size", "1"]
    env = {k: v for k, v in os.environ.items() if k not in QUIET_KEYS}
    env.update(PYTHONPATH=str(REPO), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    first = proc.stderr.readline()  # the first progress line: the cluster is up and work has begun
    assert first.startswith(("ingest:", "WARNING")), first
    children = psutil.Process(proc.pid).children(recursive=True)
    assert children  # the local cluster's processes (and a temporary server without a session API)
    proc.send_signal(signal.SIGINT)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and time.monotonic() - t0 < 15
    assert err.splitlines()[-1] == "segflow: interrupted; what finished is kept: run the same command again to resume"
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    again = segflow(*args)
    assert again.returncode == 0, again.stderr
    assert {r["image_id"] for r in open_run(str(tmp_path / "run")).dice_table().to_pylist()} == {
        p.stem for p in (tmp_path / "col" / "images").iterdir()}  # every image scored, once resumed


def test_verbose_shows_prefects_lines_and_the_traceback(tiny_run) -> None:
    proc = segflow("-v", "segment", "--store", tiny_run["store"], "--checkpoint", tiny_run["two_channel"],
                   "--out", str(tiny_run["root"] / "rgb-run-v"))
    assert proc.returncode == 2
    assert "prefect.flow_runs" in proc.stderr and "Encountered exception during execution" in proc.stderr
    assert "Traceback" in proc.stderr
    assert any(ln.startswith("segflow: error: no image of the store") for ln in proc.stderr.splitlines())


def test_an_invalid_option_value_is_one_line_naming_the_field(tiny_run, capsys, monkeypatch) -> None:
    for key in QUIET_KEYS:  # main() quietens Prefect through the environment; restored afterwards
        monkeypatch.delenv(key, raising=False)
    assert main(["segment", "--store", tiny_run["store"], "--checkpoint", tiny_run["gray"],
                 "--out", str(tiny_run["root"] / "bad"), "--batch-size", "0"]) == 2
    captured = capsys.readouterr()
    assert captured.err == "segflow: error: --batch-size: Input should be greater than 0\n"
    assert captured.out == ""


def test_fields_named_in_messages_are_written_as_their_options() -> None:
    from flows.console import name_options

    options = {"min_epoch_patches": "--epoch-patches", "val_fraction": "--val-fraction", "model": "--model"}
    with pytest.raises(Exception) as info:
        TrainSpec(store="s", out="o.safetensors", model="maskrcnn_r18", min_epoch_patches=8)
    assert one_line(info.value, options=options) == "--epoch-patches applies to semantic models (unet, unet3d) only"
    assert name_options("val_fraction 0 (--val-fraction 0) holds out none", options) == (
        "val_fraction 0 (--val-fraction 0) holds out none")  # the option is named already
    assert name_options("model unet; /data/min_epoch_patches/a.png; min_epoch_patches_x", options) == (
        "model unet; /data/min_epoch_patches/a.png; min_epoch_patches_x")  # plain words, paths, longer names


def test_one_line_joins_validation_errors_and_flattens_messages() -> None:
    with pytest.raises(Exception) as info:
        SegmentSpec(store="s", checkpoint="c", out="o", batch_size=0, overlap=-1)
    assert one_line(info.value) == ("invalid SegmentSpec: batch_size: Input should be greater than 0; "
                                    "overlap: Input should be greater than or equal to 0")
    assert one_line(info.value, options={"batch_size": "--batch-size", "overlap": "--overlap"}) == (
        "--batch-size: Input should be greater than 0; --overlap: Input should be greater than or equal to 0")
    with pytest.raises(Exception) as info:  # a choice or a record: only the choice's own error, by its option
        TrainSpec(store="s", out="o.safetensors", normalisation="window:abdomn")
    assert one_line(info.value, options={"normalisation": "--normalisation"}) == (
        "--normalisation: window 'abdomn' is neither LO,HI with finite LO < HI (e.g. window:-200,300) nor a preset "
        "(abdomen, liver, lung, bone, brain)")
    with pytest.raises(Exception) as info:
        TrainSpec(store="s", out="o.safetensors", val_fraction=1.5, execution={"n_workers": 0})
    assert one_line(info.value, options={"val_fraction": "--val-fraction", "n_workers": "--workers"}) == (
        "--val-fraction: must lie in [0, 1): the share of the labelled images held out for validation, 0 for none "
        "(train on every image and keep the last epoch); got 1.5; --workers: Input should be greater than 0")
    assert one_line(OSError("first line\n  second line")) == "first line second line"
    assert one_line(KeyError()) == "KeyError"


def test_plain_progress_prints_first_tenths_and_last() -> None:
    out = io.StringIO()
    show = PlainProgress(out, steps=4, every_s=1e9)
    for done in range(0, 9):
        show(ProgressEvent("segment", done, 8, f"{done * 2} images"))
    show(ProgressEvent("ingest", 1, 1))
    show(ProgressEvent("segment", 0, 2))  # a second pass of the stage starts over
    assert out.getvalue().splitlines() == [
        "segment: 0/8 units, 0 images", "segment: 2/8 units, 4 images", "segment: 4/8 units, 8 images",
        "segment: 6/8 units, 12 images", "segment: 8/8 units, 16 images", "ingest: 1/1 chunks", "segment: 0/2 units"]
    assert progress_line(ProgressEvent("other", 1, 3, "x")) == "other: 1/3, x"


def test_a_plain_progress_line_is_one_write_with_its_newline() -> None:
    """A warning logged from another thread (the Dask client's) cannot land between a line and its newline."""
    writes: list[str] = []

    class Recording(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    PlainProgress(Recording())(ProgressEvent("train", 1, 3, "epoch 1/3: loss 0.5"))
    assert writes == ["train: 1/3 epochs, epoch 1/3: loss 0.5\n"]


def test_bars_on_a_terminal_count_each_stage() -> None:
    from rich.console import Console

    out = io.StringIO()
    with BarProgress(Console(file=out, force_terminal=True, width=120)) as bars:
        bars(ProgressEvent("segment", 0, 3, "0 images"))
        bars(ProgressEvent("segment", 3, 3, "11 images, 5.0 images/s"))
        bars(ProgressEvent("train", 1, 2, "loss 0.5000"))
    final = out.getvalue().rsplit("\x1b[2K", 2)  # the last redraw: one line per stage
    text = "".join(final[-2:])
    assert "segment" in text and "3/3" in text and "units" in text and "11 images, 5.0 images/s" in text
    assert "train" in text and "1/2" in text and "epochs" in text and "loss 0.5000" in text


def _record(name: str, level: int, *, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom")
        except ValueError:
            exc_info = sys.exc_info()
    return logging.LogRecord(name, level, __file__, 1, "message", None, exc_info)


def test_quiet_filter_keeps_segflow_warnings_and_drops_prefect_and_dask() -> None:
    keep = QuietFilter().filter
    assert keep(_record("segcore.training.semantic", logging.WARNING))
    assert keep(_record("prefect.flow_runs", logging.WARNING))  # a flow's own log.warning
    assert not keep(_record("prefect.flow_runs", logging.INFO))
    assert not keep(_record("prefect.flow_runs", logging.ERROR, exc=True))  # the engine's traceback
    assert not keep(_record("prefect.task_runs", logging.ERROR))
    assert not keep(_record("prefect", logging.WARNING))
    assert not keep(_record("distributed.worker", logging.WARNING))
    assert not keep(_record("EventsWorker", logging.WARNING))
    assert not keep(_record("segcore.run", logging.INFO))


def test_report_in_this_process_reaches_listeners_and_a_failing_one_is_dropped() -> None:
    got: list[ProgressEvent] = []

    def broken(event: ProgressEvent) -> None:
        raise RuntimeError("display gone")

    with listen(got.append), listen(broken):
        report("ingest", 1, 2, "a")
        report("ingest", 2, 2)
    report("ingest", 3, 3)  # nobody listens any more
    assert got == [ProgressEvent("ingest", 1, 2, "a"), ProgressEvent("ingest", 2, 2, "")]


@task
def _count_to(n: int) -> int:
    for i in range(1, n + 1):
        report("probe", i, n, f"step {i}")
    return os.getpid()


@flow(task_runner=DaskTaskRunner(cluster_kwargs={"n_workers": 1, "threads_per_worker": 1, "processes": True,
                                                 "dashboard_address": ":0"}))
def _count_on_a_worker(n: int) -> int:
    with relay_from_workers():
        return _count_to.submit(n).result()


def test_reports_from_a_task_on_a_dask_worker_process_reach_the_flows_listeners() -> None:
    got: list[ProgressEvent] = []
    with listen(got.append):
        worker_pid = _count_on_a_worker(3)
    assert worker_pid != os.getpid()  # the task ran in another process
    assert got == [ProgressEvent("probe", i, 3, f"step {i}") for i in (1, 2, 3)]
    report("probe", 9, 9)  # after the flow: nothing relayed, nothing left listening
    assert len(got) == 3


def test_relative_paths_are_made_absolute_for_a_cluster_elsewhere(tmp_path, monkeypatch):
    """The workers of a cluster given by --dask-address run in directories of their own."""
    from flows.cli import _spec, build_parser

    monkeypatch.chdir(tmp_path)
    argv = ["segment", "--store", "rel.zarr", "--checkpoint", "m.safetensors", "--out", "runs/r1",
            "--lake", "s3://bucket/lake"]
    here = _spec(build_parser().parse_args(argv))
    assert (here.store, here.checkpoint, here.out) == ("rel.zarr", "m.safetensors", "runs/r1")
    there = _spec(build_parser().parse_args([*argv, "--dask-address", "tcp://127.0.0.1:9"]))
    assert (there.store, there.checkpoint, there.out, there.lake) == (
        str(tmp_path / "rel.zarr"), str(tmp_path / "m.safetensors"), str(tmp_path / "runs" / "r1"), "s3://bucket/lake")
