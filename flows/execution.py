"""Which Dask cluster a flow's tasks run on, from an ExecutionSpec."""

from __future__ import annotations

import os

import dask
from prefect_dask import DaskTaskRunner

from segcore.config import ExecutionSpec
from segcore.errors import SegflowError

#: Seconds to wait for the temporary Prefect server (Prefect's own default of 20 s is too short on a
#: busy machine, where importing the server and opening its database can take longer).
SERVER_START_TIMEOUT_S = 120


#: Dask settings of segflow's local clusters: housekeeping intervals that leave the cores to torch
#: (Dask's defaults: 20 ms, 500 ms, 100 ms). Memory is still checked every second.
QUIET_HOUSEKEEPING = {
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.worker.memory.monitor-interval": "1s",
}


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return 0


def local_workers(spec: ExecutionSpec) -> int:
    """Workers of the local cluster: as asked, else one per GPU, else 1 (torch uses every core)."""
    return spec.n_workers or max(1, _gpu_count())


def torch_threads(spec: ExecutionSpec) -> int | None:
    """Torch threads per worker: as asked; for a local cluster, the cores shared evenly; for an
    existing cluster, None (the worker's own default - set OMP_NUM_THREADS on its command line)."""
    if spec.threads_per_worker:
        return spec.threads_per_worker
    if spec.dask_address:
        return None
    return max(1, (os.cpu_count() or 1) // local_workers(spec))


def task_runner(spec: ExecutionSpec) -> DaskTaskRunner:
    """A DaskTaskRunner on ``spec.dask_address``, or on a new LocalCluster of worker processes.

    Local workers are spawned without Dask's default ``MALLOC_TRIM_THRESHOLD_=65536``: setting it
    disables glibc's dynamic mmap threshold, so every large tensor allocation becomes an mmap and
    page faults cost torch about 20 % of its CPU throughput (measured, see bench/RESULTS.md). The
    cluster's housekeeping runs less often than Dask's defaults (:data:`QUIET_HOUSEKEEPING`): its
    scheduler and nannies live in the flow's process and share the cores with the workers' torch
    threads, and the default event-loop ticks (every 20 ms), resource samples (every 0.5 s) and
    worker memory checks (every 0.1 s) took about a quarter of that process's CPU time in a segment run.
    """
    if spec.dask_address:
        return DaskTaskRunner(address=spec.dask_address)
    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None, **QUIET_HOUSEKEEPING})
    return DaskTaskRunner(
        cluster_class="distributed.LocalCluster",
        cluster_kwargs={
            "n_workers": local_workers(spec),
            "threads_per_worker": 1,  # one unit at a time per worker; torch parallelises inside
            "processes": True,
            "dashboard_address": ":0",  # any free port: several clusters may run on one host
        },
    )


def share_prefect_api() -> None:
    """Make worker processes report to the same Prefect API as this process.

    With no ``PREFECT_API_URL`` configured, Prefect starts a temporary local server inside the
    process that runs the flow; Dask worker processes would not know it and would each start a
    server of their own (seconds of start-up and CPU each, and their task runs would not show
    in the flow's server). So start that temporary server here, once, and export its URL in the
    environment that local workers inherit. A configured ``PREFECT_API_URL`` is left alone.

    Raises :class:`SegflowError` (a one-line error on the command line) when the server does not
    answer within :data:`SERVER_START_TIMEOUT_S` seconds.
    """
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        from prefect.server.api.server import SubprocessASGIServer

        server = SubprocessASGIServer()  # the same instance Prefect's client uses for ephemeral mode
        try:
            server.start(timeout=SERVER_START_TIMEOUT_S)
        except RuntimeError as exc:
            raise SegflowError(
                f"the temporary Prefect server did not answer within {SERVER_START_TIMEOUT_S} s (a busy machine?); "
                "run the command again, or start a server once (`prefect server start`) and set PREFECT_API_URL "
                f"to it: {' '.join(str(exc).split())[:300]}") from exc
        url = server.api_url
    os.environ["PREFECT_API_URL"] = url
