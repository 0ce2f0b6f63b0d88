"""An external Dask cluster for tests: a `dask scheduler` and `dask worker` processes (each under a
nanny), started as the command line would start them, each in the test's directory."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def external_cluster(directory: Path, *, env: Mapping[str, str], name: str, workers: int = 2,
                     timeout: float = 90) -> Iterator[str]:
    """Start a scheduler and ``workers`` one-thread workers named ``<name>-1``, ``<name>-2``, ...;
    yield the scheduler's address once every worker has joined; stop them all afterwards. The
    processes' output goes to ``directory/scheduler.log`` and ``directory/worker<i>.log``."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = [open(directory / f"{n}.log", "w") for n in ("scheduler", *(f"worker{i}" for i in range(workers)))]
    procs = [subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                               "--no-dashboard"], stdout=logs[0], stderr=subprocess.STDOUT, env=dict(env),
                              cwd=directory)]
    for i in range(1, workers + 1):
        procs.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--nworkers", "1",
                                       "--no-dashboard", "--name", f"{name}-{i}", "--local-directory", str(directory)],
                                      stdout=logs[i], stderr=subprocess.STDOUT, env=dict(env), cwd=directory))
    from distributed import Client

    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with Client(address, timeout=5) as client:
                    client.wait_for_workers(workers, timeout=timeout)
                    joined = len(client.scheduler_info()["workers"])
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert joined == workers, f"{joined} of {workers} workers joined the scheduler at {address}"
        yield address
    finally:
        for p in procs[::-1]:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        for f in logs:
            f.close()
