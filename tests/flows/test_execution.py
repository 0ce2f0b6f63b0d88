"""How a command starts what its flow needs: the temporary Prefect server (launched without importing
it, answered before the flow starts, stopped at exit) and the local cluster started ahead of the
flow (its workers warmed up, used by the flow's task runner, and closed with every exit handler run)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import dask
import httpx
import pytest
from prefect import flow, task

from flows import execution
from flows.execution import started_cluster, task_runner, wait_warm
from segcore.config import ExecutionSpec

REPO = Path(__file__).resolve().parents[2]
ONE = ExecutionSpec(n_workers=1, threads_per_worker=1)
TWO = ExecutionSpec(n_workers=2, threads_per_worker=1)


def test_temporary_server_boots_without_importing_the_server_here(tmp_path):
    script = textwrap.dedent("""
        import sys
        from flows.server import start_api, wait_api
        start_api()
        assert "prefect.server.api.server" not in sys.modules, "the server was imported into this process"
        wait_api()
        from prefect.settings import PREFECT_API_URL
        import httpx, os
        url = PREFECT_API_URL.value()
        assert url == os.environ["PREFECT_API_URL"], (url, os.environ["PREFECT_API_URL"])
        assert httpx.get(url + "/health").status_code == 200
        print(url)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PYTHONPATH=str(REPO), PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    url = proc.stdout.strip().splitlines()[-1]
    with pytest.raises(httpx.TransportError):  # stopped when the process exited
        httpx.get(url + "/health", timeout=2)


def test_a_configured_api_is_left_alone(monkeypatch):
    from flows import server

    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setattr(server, "_server", None)
    server.start_api()
    assert server._server is None and os.environ["PREFECT_API_URL"] == "http://127.0.0.1:9/api"


@task
def _worker_state(marker: str) -> dict:
    import atexit

    def leave_mark() -> None:
        Path(marker).write_text("ran")

    atexit.register(leave_mark)  # registered after the quick-exit handler: must still run
    return {"pid": os.getpid(), "warm": all(m in sys.modules for m in execution.WARM_MODULES),
            "torchvision": "torchvision" in sys.modules}


@flow
def _probe(marker: str) -> dict:
    return _worker_state.submit(marker).result()


@pytest.mark.usefixtures("prefect_harness")
def test_flow_runs_on_the_started_cluster_warmed_up_and_exit_handlers_still_run(tmp_path):
    marker = tmp_path / "atexit-ran"
    with started_cluster(ONE):
        runner = task_runner(ONE)
        assert runner.address == execution._started[1]  # the started cluster, not a new one
        other = task_runner(TWO)
        assert other.address is None and other.cluster_kwargs["n_workers"] == 2  # another spec: its own cluster
        wait_warm()
        state = _probe.with_options(task_runner=runner)(str(marker))
        with started_cluster(ONE):  # a command inside: the same cluster, left running when it ends
            assert task_runner(ONE).address == runner.address
        assert execution._started == (ONE, runner.address)
        assert _probe.with_options(task_runner=task_runner(ONE))(str(tmp_path / "again"))["pid"] == state["pid"]
        assert _probe.with_options(task_runner=task_runner(TWO))(str(tmp_path / "two"))["pid"] != state["pid"]
    assert state["warm"] and state["pid"] != os.getpid()
    assert not state["torchvision"]  # warm-up spares a worker torchvision until a Mask R-CNN needs it
    assert execution._started is None  # left: flows start their own cluster again
    assert marker.read_text() == "ran"  # the worker ended after its exit handlers, not before


def test_local_workers_never_inherit_a_malloc_trim_threshold(monkeypatch):
    # Dask's nannies leave MALLOC_TRIM_THRESHOLD_=65536 in the environment of a process that started a
    # cluster with Dask's defaults; torch then runs about 15 % slower in workers spawned from it.
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    import distributed

    with started_cluster(ONE), distributed.Client(execution._started[1]) as client:
        seen = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
    assert list(seen.values()) == [None]
    assert "MALLOC_TRIM_THRESHOLD_" not in os.environ


def test_local_workers_run_without_the_statistical_profiler():
    # Dask's default samples a worker's task threads every 10 ms from its event loop: about 3 % of a
    # core taken from torch on a 2-core machine.
    import distributed

    with started_cluster(ONE), distributed.Client(execution._started[1]) as client:
        seen = client.run(lambda dask_worker: (dask.config.get("distributed.worker.profile.enabled"),
                                               dask_worker.periodic_callbacks.get("profile")))
    assert list(seen.values()) == [(False, None)]


def test_no_cluster_is_started_for_an_existing_scheduler():
    with started_cluster(ExecutionSpec(dask_address="tcp://127.0.0.1:9")):
        assert execution._started is None
    with started_cluster(None):
        assert execution._started is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_the_temporary_server_ends_when_its_command_is_killed(tmp_path):
    script = textwrap.dedent("""
        import time
        from flows.server import start_api, wait_api
        from prefect.settings import PREFECT_API_URL
        start_api()
        wait_api()
        print(PREFECT_API_URL.value(), flush=True)
        time.sleep(600)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PYTHONPATH=str(REPO), PREFECT_HOME=str(tmp_path / "home"), PREFECT_SERVER_ANALYTICS_ENABLED="false")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, env=env)
    try:
        url = proc.stdout.readline().strip()
        assert httpx.get(url + "/health", timeout=10).status_code == 200
    finally:
        proc.kill()  # no exit handler runs
        proc.wait()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            httpx.get(url + "/health", timeout=2)
        except httpx.TransportError:
            return
        time.sleep(0.5)
    pytest.fail(f"the server at {url} still answers 30 s after its command was killed")


def test_a_server_that_ends_before_answering_is_a_one_line_error(tmp_path, monkeypatch):
    from flows.server import TemporaryServer
    from segcore.errors import SegflowError

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "home"))
    server = TemporaryServer()
    server.start()
    server.process.kill()
    server.process.wait()
    with pytest.raises(SegflowError, match="did not start: it exited with status -9"):
        server.wait(timeout=30)
    server.stop()
