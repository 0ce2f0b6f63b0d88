"""deployments/prefect.yaml against a real Prefect server: every deployment deploys with its
schedule and valid parameters, and a run of the scheduled deployment started through the API is
executed by a process worker to completion, with its artifact and outputs."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from flows.pipeline import incremental_run_dir
from segcore.config import FLOW_RUN, RunSpec, TrainSpec
from segcore.run.results import open_run
from tests.deployments.conftest import BIN, ROOT, start, stop

PREFECT_YAML = ROOT / "deployments" / "prefect.yaml"
SPECS = {"flows/deployed.py:run_deployment_flow": RunSpec, "flows/deployed.py:train_deployment_flow": TrainSpec}
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _deploy(server, tmp_path_factory) -> dict:
    """``deployments/serve.sh deploy`` (creates the pool, runs ``prefect deploy --all``) with
    SEGFLOW_HOME set; returns the registered deployments by name."""
    home = tmp_path_factory.mktemp("segflow-home")
    env = dict(server.env, SEGFLOW_HOME=str(home))
    t0 = time.monotonic()
    done = subprocess.run([str(ROOT / "deployments" / "serve.sh"), "deploy"], cwd=ROOT, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"serve.sh deploy failed:\n{done.stdout[-6000:]}\n{done.stderr[-6000:]}"
    print(f"deploy: {time.monotonic() - t0:.1f} s")
    found = {d["name"]: d for d in server.post("/deployments/filter")}
    return {"home": home, "deployments": found, "output": done.stdout}


@pytest.fixture(scope="module")
def deployed(prefect_server, tmp_path_factory) -> dict:
    return _deploy(prefect_server, tmp_path_factory)


def test_the_server_schedules_runs_of_the_cron_deployment(scheduling_server, tmp_path_factory):
    """The scheduler service of a server with the pinned set creates the hourly runs ahead of time
    (with SQLAlchemy 2.1, Prefect 3.8.8's scheduler fails on every loop and schedules nothing)."""
    found = _deploy(scheduling_server, tmp_path_factory)["deployments"]
    hourly, full = found["incremental-hourly"]["id"], found["full-run"]["id"]
    deadline = time.monotonic() + 60
    while True:
        runs = scheduling_server.post("/flow_runs/filter", {"deployments": {"id": {"any_": [hourly, full]}}})
        if runs or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert runs, f"no scheduled run after 60 s; server log:\n{scheduling_server.log.read_text()[-4000:]}"
    assert {r["deployment_id"] for r in runs} == {hourly}
    assert all(r["state_type"] == "SCHEDULED" for r in runs)
    starts = sorted(r["expected_start_time"] for r in runs)
    assert all(s[14:19] == "00:00" for s in starts), starts  # on the hour, UTC


def test_every_deployment_of_prefect_yaml_is_registered_with_valid_parameters(deployed, prefect_server):
    config = yaml.safe_load(PREFECT_YAML.read_text())
    wanted = {d["name"]: d for d in config["deployments"]}
    found = deployed["deployments"]
    assert set(found) == set(wanted), deployed["output"][-4000:]
    home = deployed["home"]
    for name, want in wanted.items():
        got = found[name]
        assert got["entrypoint"] == want["entrypoint"]
        assert got["work_pool_name"] == "segflow-process"
        assert got["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(ROOT)}}]
        assert "{{" not in json.dumps(got["parameters"]), got["parameters"]
        spec = SPECS[got["entrypoint"]].model_validate(got["parameters"]["spec"])  # what the flow run will get
        for path in (spec.ingest.store, spec.segment.out) if isinstance(spec, RunSpec) else (spec.store,):
            assert Path(path).is_relative_to(home), path
    incremental = RunSpec.model_validate(found["incremental-hourly"]["parameters"]["spec"])
    assert incremental.ingest.incremental and incremental.ingest.images == str(home / "landing")
    assert incremental.segment.lake == str(home / "lake") and (home / "landing").is_dir()
    full = RunSpec.model_validate(found["full-run"]["parameters"]["spec"])
    assert FLOW_RUN in full.ingest.store and FLOW_RUN in full.segment.out  # a new store and run directory per run
    [schedule] = found["incremental-hourly"]["schedules"]
    assert schedule["active"] and schedule["schedule"]["cron"] == "0 * * * *"
    assert schedule["schedule"]["timezone"] == "UTC"
    assert found["full-run"]["schedules"] == [] and found["train"]["schedules"] == []
    assert found["incremental-hourly"]["global_concurrency_limit"]["limit"] == 1


def _logs(server, flow_run_ids: list[str]) -> str:
    rows = server.post("/logs/filter", {"logs": {"flow_run_id": {"any_": flow_run_ids}}, "sort": "TIMESTAMP_ASC"})
    return "\n".join(f"{r['level']} {r['message']}" for r in rows)


def _wait_until_completed(server, flow_run_id: str, runner, runner_log: Path, *, timeout: float = 240) -> list[dict]:
    """Wait for the flow run to end; fail with the runner's log and the runs' logs unless it COMPLETED.
    Returns every flow run of the server."""
    t0, state = time.monotonic(), None
    while time.monotonic() - t0 < timeout:
        state = server.get(f"/flow_runs/{flow_run_id}")["state"]["type"]
        if state in TERMINAL or (runner.poll() is not None and state == "SCHEDULED"):
            break  # ended, or the runner left without taking it
        time.sleep(1)
    runs = server.post("/flow_runs/filter")
    if state != "COMPLETED":
        pytest.fail(f"flow run {flow_run_id} is {state} after {time.monotonic() - t0:.0f} s (runner exit code "
                    f"{runner.poll()})\n--- runner log:\n{runner_log.read_text()[-6000:]}\n"
                    f"--- flow run logs:\n{_logs(server, [r['id'] for r in runs])[-8000:]}")
    print(f"flow run {flow_run_id}: {time.monotonic() - t0:.1f} s")
    return runs


def _check_outputs(server, runs: list[dict], parent_id: str, out: Path, store: Path, n_images: int,
                   checkpoint: str) -> None:
    """The deployment's flow started the pipeline flow as a subflow, which published the summary artifact
    and wrote the run directory (incremental runs: one per checkpoint below ``out``)."""
    out = Path(incremental_run_dir(str(out), checkpoint))
    child = next(r for r in runs if r["parent_task_run_id"] and r["state_type"] == "COMPLETED"
                 and r["id"] != parent_id and r["start_time"] >= server.get(f"/flow_runs/{parent_id}")["start_time"])
    artifacts = server.post("/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [child["id"]]}}})
    summary = next(a for a in artifacts if (a["key"] or "").startswith("dice-summary-"))
    assert summary["type"] == "markdown" and "Dice" in summary["data"]
    result = open_run(str(out))
    assert len(result.image_ids) == n_images
    assert set(result.dice_table().column("image_id").to_pylist()) == set(result.image_ids)
    assert json.loads((out / "summary.json").read_text())["images_evaluated"] == n_images
    assert pq.read_table(store / "manifest.parquet").num_rows == n_images


def test_a_run_of_the_scheduled_deployment_completes_on_a_process_worker(deployed, prefect_server, tiny_collection,
                                                                         tmp_path):
    deployment = deployed["deployments"]["incremental-hourly"]
    store, out, lake = tmp_path / "store.zarr", tmp_path / "run", tmp_path / "lake"
    spec = {"ingest": {"images": tiny_collection["images"], "masks": tiny_collection["masks"], "store": str(store),
                       "incremental": True},
            "segment": {"store": str(store), "checkpoint": tiny_collection["checkpoint"], "out": str(out),
                        "lake": str(lake), "batch_size": 4,
                        "execution": {"n_workers": 1, "threads_per_worker": 1}}}
    run = prefect_server.post(f"/deployments/{deployment['id']}/create_flow_run", {"parameters": {"spec": spec}})
    worker_log = tmp_path / "worker.log"
    # From another directory: the deployment's pull step must take the run to the project root.
    worker = start([str(BIN / "prefect"), "worker", "start", "--pool", "segflow-process", "--run-once", "--limit", "1",
                    "--install-policy", "never"], env=prefect_server.env, log=worker_log, cwd=tmp_path)
    try:
        runs = _wait_until_completed(prefect_server, run["id"], worker, worker_log)
    finally:
        stop(worker)
    _check_outputs(prefect_server, runs, run["id"], out, store, tiny_collection["n_images"],
                   tiny_collection["checkpoint"])


def test_segflow_serve_registers_the_incremental_run_and_executes_it(prefect_server, tiny_collection, tmp_path):
    out, lake = tmp_path / "served", tmp_path / "lake"
    args = [str(BIN / "segflow"), "serve", "--images", tiny_collection["images"], "--masks", tiny_collection["masks"],
            "--checkpoint", tiny_collection["checkpoint"], "--out", str(out), "--lake", str(lake), "--batch-size", "4",
            "--workers", "1", "--threads-per-worker", "1", "--cron", "30 2 * * *", "--name", "served"]
    refused = subprocess.run([*args, "--overwrite"], cwd=tmp_path, env=prefect_server.env, capture_output=True,
                             text=True, timeout=120)
    # a served run is always incremental: serve has no --overwrite (nor --incremental) to give
    assert refused.returncode == 2 and "unrecognized arguments: --overwrite" in refused.stderr, refused.stderr
    log = tmp_path / "serve.log"
    serve = start(args, env=prefect_server.env, log=log, cwd=tmp_path)
    try:
        deadline, found = time.monotonic() + 120, []
        while not found and serve.poll() is None and time.monotonic() < deadline:
            found = prefect_server.post("/deployments/filter", {"deployments": {"name": {"any_": ["served"]}}})
            time.sleep(1)
        assert found, f"segflow serve registered no deployment:\n{log.read_text()[-6000:]}"
        [deployment] = found
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["30 2 * * *"]
        spec = RunSpec.model_validate(deployment["parameters"]["spec"])
        assert spec.ingest.incremental and spec.segment.lake == str(lake)
        assert spec.ingest.store == spec.segment.store == str(out / "store.zarr")
        assert spec.segment.execution.n_workers == 1
        run = prefect_server.post(f"/deployments/{deployment['id']}/create_flow_run", {})  # the served defaults
        runs = _wait_until_completed(prefect_server, run["id"], serve, log)
    finally:
        stop(serve)
    _check_outputs(prefect_server, runs, run["id"], out, out / "store.zarr", tiny_collection["n_images"],
                   tiny_collection["checkpoint"])
