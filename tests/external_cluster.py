"""An external Dask cluster for tests: a `dask scheduler` and `dask worker` processes (each under a
nanny), started as the command line would start them, each in the test's directory or each in a
directory of its own."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Mapping, Sequence

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def external_cluster(directory: Path, *, env: Mapping[str, str], name: str, workers: int = 2,
                     timeout: float = 90, own_dirs: Sequence[Path] | None = None) -> Iterator[str]:
    """Start a scheduler and ``workers`` one-thread workers named ``<name>-1``, ``<name>-2``, ...;
    yield the scheduler's address once every worker has joined; stop them all afterwards. The
    processes' output goes to ``directory/scheduler.log`` and ``directory/worker<i>.log``.

    With ``own_dirs`` (one empty directory per worker), worker *i* starts in ``own_dirs[i]``, keeps its
    scratch space there, and has it as its ``HOME``, ``TMPDIR`` and ``PREFECT_HOME``: it shares no
    directory with the test or the other worker."""
    if own_dirs is not None:
        assert len(own_dirs) == workers and all(not any(d.iterdir()) for d in own_dirs), "one empty directory each"
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    logs = [open(directory / f"{n}.log", "w") for n in ("scheduler", *(f"worker{i}" for i in range(workers)))]
    procs: list[subprocess.Popen] = []
    from distributed import Client

    try:  # started inside: a process started before a later one fails to start is stopped too
        # Should this process be killed outright (no finally), the scheduler ends after 10 idle minutes
        # and its workers a minute after losing it.
        procs.append(subprocess.Popen([str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", str(port),
                                       "--no-dashboard", "--idle-timeout", "600"], stdout=logs[0],
                                      stderr=subprocess.STDOUT, env=dict(env), cwd=directory))
        for i in range(1, workers + 1):
            home = directory if own_dirs is None else own_dirs[i - 1]
            worker_env = dict(env) if own_dirs is None else dict(env, HOME=str(home), TMPDIR=str(home),
                                                                 PREFECT_HOME=str(home / ".prefect"))
            procs.append(subprocess.Popen([str(BIN / "dask"), "worker", address, "--nthreads", "1", "--nworkers",
                                           "1", "--no-dashboard", "--name", f"{name}-{i}", "--death-timeout", "60",
                                           "--local-directory", str(home)],
                                          stdout=logs[i], stderr=subprocess.STDOUT, env=worker_env, cwd=home))
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
                p.wait()
        for f in logs:
            f.close()
