"""Progress of long steps, from wherever they run to whoever shows it (the ``segflow`` command line).

A step calls :func:`report` each time it gets further: the flow's own loop (chunks written,
units finished) or a task on a Dask worker (training epochs). Listeners registered with
:func:`listen` in the flow's process receive every report as a :class:`ProgressEvent`:

- called in the flow's process (no Dask worker around), :func:`report` calls the listeners directly;
- called inside a task on a Dask worker, it logs the event on the scheduler under the flow run's
  topic (``segflow-progress-<flow run id>``); the flow relays those events to its process's
  listeners while it waits for such tasks (``with relay_from_workers(): ...``), so reports of other
  flow runs sharing the scheduler are never mixed in.

Reports are advisory: nobody listening costs nothing, and a listener that fails is dropped with a
warning instead of failing the run.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

log = logging.getLogger(__name__)

TOPIC = "segflow-progress"


@dataclass(frozen=True)
class ProgressEvent:
    """``done`` of ``total`` steps of ``stage`` (e.g. ``"segment"``, 12 of 40 units); ``message``:
    anything else worth showing beside the count (``"96 images, 5.1 images/s"``)."""

    stage: str
    done: int
    total: int
    message: str = ""


Listener = Callable[[ProgressEvent], None]

_listeners: list[Listener] = []
_lock = threading.Lock()


def report(stage: str, done: int, total: int, message: str = "") -> None:
    """Say that ``done`` of ``total`` steps of ``stage`` are finished (``message``: extra detail).

    Safe to call anywhere: in the flow's process, inside a task on a Dask worker, or outside any
    flow; with nobody listening it does nothing visible.
    """
    event = ProgressEvent(stage=str(stage), done=int(done), total=int(total), message=str(message))
    worker = _current_worker()
    if worker is None:
        _dispatch(event)
    else:
        worker.log_event(topic(), {"stage": event.stage, "done": event.done, "total": event.total,
                                   "message": event.message})


@contextmanager
def listen(callback: Listener) -> Iterator[None]:
    """Call ``callback(event)`` for every report that reaches this process while the block runs.

    ``callback`` may be called from another thread (the Dask client's) than the one that entered
    the block; it should be quick.
    """
    with _lock:
        _listeners.append(callback)
    try:
        yield
    finally:
        with _lock:
            if callback in _listeners:
                _listeners.remove(callback)


@contextmanager
def relay_from_workers(client: Any = None) -> Iterator[None]:
    """Deliver the reports of tasks running on Dask workers to this process's listeners while the block runs.

    ``client``: the :class:`distributed.Client` the tasks are submitted through; by default the
    client of the running flow's Dask task runner (none: the block runs without relaying, e.g. with a
    thread-pool task runner, whose tasks report in this process anyway). Enter the block in the flow
    run whose tasks report (the topic is that flow run's).
    """
    client = client if client is not None else _flow_dask_client()
    if client is None:
        yield
        return
    name = topic()
    client.subscribe_topic(name, _deliver)
    try:
        yield
    finally:
        client.unsubscribe_topic(name)


def topic() -> str:
    """The Dask event topic of the current flow run's reports (``segflow-progress`` outside a flow run)."""
    from prefect.runtime import flow_run

    run_id = flow_run.id
    return f"{TOPIC}-{run_id}" if run_id else TOPIC


def _deliver(event: tuple[float, dict[str, Any]]) -> None:
    """Handler of the scheduler's events: ``(timestamp, message)`` as :func:`report` logged them."""
    msg = event[1]
    _dispatch(ProgressEvent(stage=msg["stage"], done=msg["done"], total=msg["total"], message=msg["message"]))


def _dispatch(event: ProgressEvent) -> None:
    with _lock:
        listeners = list(_listeners)
    for callback in listeners:
        try:
            callback(event)
        except Exception as exc:  # a progress display is never worth a run
            log.warning("progress display %r failed and is switched off: %s", callback, exc)
            with _lock:
                if callback in _listeners:
                    _listeners.remove(callback)


def _current_worker() -> Any:
    """The Dask worker running the current task, or None (not in a Dask task)."""
    try:
        from distributed import get_worker
    except ImportError:  # pragma: no cover - distributed is a dependency
        return None
    try:
        return get_worker()
    except ValueError:
        return None


def _flow_dask_client() -> Any:
    """The Dask client of the running flow's task runner, or None (no flow run, or not a Dask runner)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    runner = getattr(ctx, "task_runner", None)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:  # pragma: no cover - prefect-dask is a dependency
        return None
    return runner.client if isinstance(runner, DaskTaskRunner) else None
