"""Which Dask cluster a flow's tasks run on, from an ExecutionSpec.

A flow given a local execution spec starts its own LocalCluster (:func:`task_runner`). A command
can instead start that cluster ahead of its flow (:func:`started_cluster`), while the Prefect
server boots and the flows are imported, and have its worker import what the tasks need in the
meantime (:func:`warm_imports`); the flow then runs on that cluster.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import dask
from distributed import WorkerPlugin

from segcore.config import ExecutionSpec

if TYPE_CHECKING:
    from prefect_dask import DaskTaskRunner

#: What a worker's tasks import (torch, zarr, the segcore run and training paths, Prefect).
WARM_MODULES = ("tasks.ingest", "tasks.segment", "tasks.train", "tasks.lake")

#: Dask settings of segflow's local clusters: housekeeping intervals that leave the cores to torch
#: (Dask's defaults: 20 ms, 500 ms, 100 ms), and no statistical profiler in the workers (Dask's
#: default wakes each worker's event loop every 10 ms to sample its task threads' stacks, for the
#: Dask dashboard's profile page: about 3 % of a core taken from torch). Memory is still checked
#: every second.
QUIET_HOUSEKEEPING = {
    "distributed.admin.tick.interval": "1s",
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.worker.memory.monitor-interval": "1s",
    "distributed.worker.profile.enabled": False,
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


def _configure_local() -> None:
    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None, **QUIET_HOUSEKEEPING})
    # Dask's nannies export their pre-spawn variables into the environment of the process that
    # starts them, and never take them back: after any Dask cluster started with its defaults in
    # this process (or with the variable in the environment), segflow's workers would inherit it.
    if os.environ.pop("MALLOC_TRIM_THRESHOLD_", None) is not None:
        logging.getLogger(__name__).info("MALLOC_TRIM_THRESHOLD_ removed from this process's environment: "
                                         "segflow's local workers run without it (it slows torch on the CPU)")


def _cluster_kwargs(spec: ExecutionSpec) -> dict:
    return {
        "n_workers": local_workers(spec),
        "threads_per_worker": 1,  # one unit at a time per worker; torch parallelises inside
        "processes": True,
        "dashboard_address": ":0",  # any free port: several clusters may run on one host
    }


#: The local cluster a command started ahead of its flow: ``(spec, scheduler address)``.
_started: tuple[ExecutionSpec, str] | None = None


def task_runner(spec: ExecutionSpec) -> DaskTaskRunner:
    """A DaskTaskRunner on ``spec.dask_address``, on the cluster :func:`started_cluster` started for
    ``spec``, or on a new LocalCluster of worker processes.

    Local workers are spawned without Dask's default ``MALLOC_TRIM_THRESHOLD_=65536``: setting it
    disables glibc's dynamic mmap threshold, so every large tensor allocation becomes an mmap and
    page faults cost torch about 20 % of its CPU throughput (measured, see bench/RESULTS.md). The
    variable is also removed from this process's environment when present, since workers inherit
    it from there: Dask's nannies leave it behind in any process that started a cluster with
    Dask's defaults. The cluster's housekeeping runs less often than Dask's defaults
    (:data:`QUIET_HOUSEKEEPING`): its scheduler and nannies live in the flow's process and share the
    cores with the workers' torch threads, and the default event-loop ticks (every 20 ms), resource
    samples (every 0.5 s) and worker memory checks (every 0.1 s) took about a quarter of that
    process's CPU time in a segment run. The workers also run without Dask's statistical profiler,
    which woke each worker's event loop every 10 ms (about 3 % of a core taken from torch).
    """
    from prefect_dask import DaskTaskRunner

    if spec.dask_address:
        return DaskTaskRunner(address=spec.dask_address)
    if _started is not None and _started[0] == spec:
        return DaskTaskRunner(address=_started[1])
    _configure_local()
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=_cluster_kwargs(spec))


def warm_imports() -> float:
    """Import :data:`WARM_MODULES` (run on a worker before its first task); returns the seconds taken."""
    t = time.perf_counter()
    for name in WARM_MODULES:
        importlib.import_module(name)
    return time.perf_counter() - t


@contextmanager
def started_cluster(spec: ExecutionSpec | None, *, forward_warnings: bool = False) -> Iterator[None]:
    """Start the LocalCluster of a local ``spec`` now, and close it on leaving.

    Inside, flows run with ``spec`` (:func:`task_runner`) use this cluster, and its workers import
    :data:`WARM_MODULES` from the start, one task each in their single task thread (so the first
    real task never imports alongside them); :func:`wait_warm` waits for that. With
    ``forward_warnings``, the warnings segflow's code logs in the workers (logger ``segcore``, at
    WARNING and above) are handled again in this process, by its logger of the same name: a quiet
    command line shows them as it shows its own. With ``None`` or an existing cluster's address,
    nothing is started; inside a :func:`started_cluster` of an equal ``spec``, that cluster is used
    and left running.
    """
    global _started, _warming
    if spec is None or spec.dask_address or (_started is not None and _started[0] == spec):
        yield
        return
    import distributed

    _configure_local()
    # Not the default client: prefect_dask's runners would then all run on this cluster, whatever their spec.
    with (distributed.LocalCluster(**_cluster_kwargs(spec)) as cluster,
          distributed.Client(cluster, set_as_default=False) as client):
        client.register_plugin(QuickExit(), name="segflow-quick-exit")
        if forward_warnings:
            client.forward_logging("segcore", level=logging.WARNING)
        workers = list(client.scheduler_info()["workers"])
        _warming = [client.submit(warm_imports, pure=False, workers=[w], allow_other_workers=False) for w in workers]
        _started = (spec, cluster.scheduler_address)
        try:
            yield
        finally:
            _started, _warming = None, []


class QuickExit(WorkerPlugin):
    """A worker plugin: once the worker has closed normally and every exit handler has run (Prefect's
    log and event flushes among them), end the process without tearing down the interpreter.

    That teardown took about 1 s per worker with torch, torchvision and the segcore run path
    loaded, and nothing remained to run. The exit handler is registered when the plugin is set up,
    before the tasks import anything, so it runs last; a worker process that did not close normally
    (it crashed, or its nanny killed it) ends as it would without the plugin.
    """

    def __init__(self) -> None:
        self.closed = False

    def setup(self, worker) -> None:
        import atexit

        atexit.register(self._exit)

    def teardown(self, worker) -> None:
        self.closed = True

    def _exit(self) -> None:
        if self.closed:
            import sys

            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)


#: The warm-up futures of the cluster :func:`started_cluster` started.
_warming: list = []


def wait_warm() -> None:
    """Wait until the workers of the cluster :func:`started_cluster` started have warmed up; a
    failed warm-up is left for the first task to report."""
    import distributed

    try:
        distributed.wait(_warming)
    except Exception:  # noqa: BLE001 - the tasks import the same modules and say what fails
        pass
