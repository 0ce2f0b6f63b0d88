"""Waiting on a run's steps: per-step timeouts, retries with back-off, and the steps given up on.

:func:`gather_watched` submits one task per item and waits for them as they finish. A step that
raises is submitted again after 2 s, 4 s, ... (:func:`segcore.run.deadlines.retry_delay`), up to
``retries`` more times, unless its error is one that every attempt would raise again
(:data:`segcore.errors.NOT_RETRIED`: a bad option, a model that cannot take the images). On a
Dask cluster it also watches which steps are executing (asking the workers once per poll) and
gives each the timeout of :class:`segcore.run.deadlines.UnitTimeouts`
from the moment it is first seen running. A step past its timeout is stopped for good: a Prefect
``timeout_seconds`` cannot interrupt a forward pass (or any C call, or a ``time.sleep``) in a
Dask worker's thread, so its future is cancelled and its worker process restarted by its nanny
(the cluster reschedules the worker's other tasks), then it is retried like a failure. A step
that fails every attempt is returned as a :class:`Failure`; the others are not held up.
Without a Dask cluster, steps are retried but not timed out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from segcore.errors import NOT_RETRIED
from segcore.run.deadlines import UnitTimeouts, retry_delay

#: Seconds between two looks at the steps that finished.
POLL_S = 0.5
#: Seconds between two questions to the workers about what they execute (each costs every worker a
#: message; timeouts are at least a floor of seconds, so a look every few seconds is enough).
WATCH_S = 2.0


@dataclass(frozen=True)
class Failure:
    """A step given up on: its name, the last attempt's error, how many attempts it had, and whether
    it was retried at all (not when its error is one that every attempt raises again)."""

    name: str
    reason: str
    attempts: int
    retried: bool = True


@dataclass(eq=False)  # compared by identity: list.remove never compares the items' fields
class _Step:
    item: Any
    name: str
    weight: float
    future: Any = None
    attempt: int = 1
    started: float | None = None
    worker: str | None = None
    retry_at: float = 0.0


def dask_client() -> Any:
    """The Dask client of the running flow's task runner, or None (another task runner)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    try:
        return getattr(ctx.task_runner, "client", None) if ctx else None
    except RuntimeError:  # a Dask runner not started
        return None


def _executing(client: Any) -> dict[str, str]:
    """``{task key: worker address}`` of every task a worker thread is executing now."""
    try:
        found = client.run(lambda dask_worker: [ts.key for ts in dask_worker.state.executing], on_error="return")
    except Exception:  # a worker restarting, the scheduler busy: look again at the next poll
        return {}
    return {key: addr for addr, keys in found.items() if isinstance(keys, list) for key in keys}


def _stop(client: Any, step: _Step, log: Any) -> None:
    """Cancel a hung step and restart its worker process (the only way to end a call that does not return)."""
    client.cancel([step.future.wrapped_future], force=True)
    try:
        client.restart_workers([step.worker], timeout=60, raise_for_error=True)
        log.warning("segment: restarted Dask worker %s to stop %s", step.worker, step.name)
    except Exception as exc:  # no nanny (a worker started without one): its thread goes on running
        log.warning("segment: could not restart Dask worker %s to stop %s (%s); it keeps a thread busy until the "
                    "step returns: restart that worker", step.worker, step.name, exc)


def _wait_some(futures: Sequence[Any]) -> None:
    """Return when one of ``futures`` (Prefect futures wrapping Dask or concurrent futures) is done, or after
    :data:`POLL_S`."""
    wrapped = [f.wrapped_future for f in futures]
    until = time.monotonic() + POLL_S
    while time.monotonic() < until and not any(w.done() for w in wrapped):
        time.sleep(0.05)


def _seconds(record: Any) -> float | None:
    timing = getattr(record, "timing", None)
    return timing.total_s if timing is not None else getattr(record, "seconds", None)


def _worked(record: Any, weight: float) -> float:
    """Images a finished step fed to the model: its ``weight`` less the superseded versions its
    record says it left out (refused images are fed as zeros, so they count)."""
    return max(0, weight - getattr(record, "n_superseded", 0))


def gather_watched(submit: Callable[[Any], Any], items: Sequence[Any], *, name: Callable[[Any], str],
                   weight: Callable[[Any], float], timeouts: UnitTimeouts, retries: int, log: Any,
                   on_result: Callable[[Any], None] | None = None) -> tuple[list[Any], list[Failure]]:
    """Submit ``submit(item)`` for every item; return the records of the steps that finished and the failures.

    ``name(item)`` names a step in logs and failures; ``weight(item)`` is its images (blocks: their
    share of a whole block, :func:`flows.pipeline.unit_weights`), which scales its timeout;
    ``on_result(record)`` is called as each step finishes (progress).
    """
    client = dask_client()
    active = [_Step(item=i, name=name(i), weight=weight(i), future=submit(i)) for i in items]
    waiting: list[_Step] = []
    results: list[Any] = []
    failures: list[Failure] = []
    watched = 0.0

    def attempt_failed(step: _Step, reason: str, *, again: bool = True) -> None:
        if step.attempt > retries or not again:
            log.error("segment: %s failed after %d attempt(s)%s: %s", step.name, step.attempt,
                      "" if again else " (not retried: it fails the same way every time)", reason)
            failures.append(Failure(step.name, reason, step.attempt, retried=again))
            return
        step.attempt += 1
        step.retry_at = time.monotonic() + retry_delay(step.attempt)
        log.warning("segment: %s: %s; attempt %d in %.0f s", step.name, reason, step.attempt, retry_delay(step.attempt))
        waiting.append(step)

    while active or waiting:
        now = time.monotonic()
        for step in [s for s in waiting if s.retry_at <= now]:
            waiting.remove(step)
            step.future, step.started, step.worker = submit(step.item), None, None
            active.append(step)
        _wait_some([s.future for s in active])
        for step in [s for s in active if s.future.wrapped_future.done()]:
            active.remove(step)
            try:
                record = step.future.result()
            except Exception as exc:  # the step's own error (or its worker lost): try it again, unless it would recur
                attempt_failed(step, f"{type(exc).__name__}: {exc}", again=not isinstance(exc, NOT_RETRIED))
                continue
            results.append(record)
            seconds, worked = _seconds(record), _worked(record, step.weight)
            if seconds is not None and worked:  # a unit that ran no model (all superseded) says nothing
                timeouts.measured(seconds=seconds, images=worked)
            if on_result is not None:
                on_result(record)
        if client is None or not active or time.monotonic() - watched < WATCH_S:
            continue
        running, now = _executing(client), time.monotonic()
        watched = now
        for step in list(active):
            key = step.future.wrapped_future.key
            if key in running and running[key] != step.worker:  # started, or started again after a worker was lost
                step.started, step.worker = now, running[key]
            if step.started is None:
                continue
            limit = timeouts.timeout(step.weight)
            if now - step.started > limit:
                active.remove(step)
                _stop(client, step, log)
                attempt_failed(step, f"timed out after {limit:.0f} s")
    return results, failures
