"""The terminal of the ``segflow`` command line: quiet logging, progress display, one-line errors.

Quiet (the default): Prefect's and Dask's own log lines stay off the terminal (flow and task run
logs still reach the Prefect API, so the UI shows them); warnings of segflow's code still show. Long
steps show their progress (:mod:`tasks.progress`): a bar per stage on a terminal, plain lines such
as ``segment: 12/40 units, 96 images, 5.1 images/s`` otherwise (CI logs, pipes). Verbose (``-v``):
every log line at INFO, as Prefect prints it (its lines carry the same progress).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import threading
import time
from contextlib import contextmanager
from typing import IO, Iterator, Mapping

from segcore.errors import error_line
from tasks.progress import ProgressEvent, listen

# Set before Prefect or distributed is imported; local Dask worker processes inherit them. A value
# the user has set wins. Run logs still go to the Prefect API (its handler is not the console's).
QUIET_ENVIRONMENT = {
    "PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL": "CRITICAL",  # Prefect's console handler, workers included
    "DASK_LOGGING__DISTRIBUTED": "error",  # distributed's own handler in worker processes
}
# Loggers of Prefect's and Dask's bookkeeping (Prefect's queue services log under their class names).
NOISY_LOGGERS = ("prefect", "prefect_dask", "distributed", "EventsWorker", "APILogWorker")
RUN_LOGGERS = ("prefect.flow_runs", "prefect.task_runs")

# The counted thing of each stage, for display ("12/40 units").
STAGE_UNITS = {"ingest": "chunks", "segment": "units", "detect": "blocks", "train": "epochs", "refit": "epochs"}


def _under(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


class QuietFilter(logging.Filter):
    """Console filter of a quiet command line: records at WARNING or above, except Prefect's and
    Dask's own. Of flow and task run loggers only plain warnings pass (segflow's); their errors are the
    engine reporting an exception, with its traceback, that the command line prints as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return False
        if _under(record.name, RUN_LOGGERS):
            return record.levelno == logging.WARNING and not record.exc_info
        return not _under(record.name, NOISY_LOGGERS)


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is at the time, so a live progress bar can print log lines above itself.

    Its name is public on purpose: Prefect's logging setup (run when Prefect is imported) keeps the
    root logger's handlers only when one is a user's, and takes a class whose name starts with an
    underscore for its own; it would replace this one with its console handler, and a quiet command
    line would show no warning at all.
    """

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> IO[str]:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass


def setup_logging(*, quiet: bool) -> None:
    """Configure logging for one command; call before Prefect, distributed or the flows are imported."""
    if not quiet:
        logging.basicConfig(level=logging.INFO)
        return
    for name, value in QUIET_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s: %(message)s"))
    handler.addFilter(QuietFilter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler])


def progress_line(event: ProgressEvent) -> str:
    """``"segment: 12/40 units, 96 images, 5.1 images/s"``: stage, count, counted thing, message."""
    unit = STAGE_UNITS.get(event.stage)
    return (f"{event.stage}: {event.done}/{event.total}{f' {unit}' if unit else ''}"
            f"{f', {event.message}' if event.message else ''}")


class PlainProgress:
    """Progress as plain lines on ``stream``: the first and the last report of each stage, and the
    others when another ``1/steps`` of the stage is done or ``every_s`` seconds passed since its last line."""

    def __init__(self, stream: IO[str], *, steps: int = 10, every_s: float = 30.0) -> None:
        self.stream, self.steps, self.every_s = stream, steps, every_s
        self._last: dict[str, tuple[int, int, int, float]] = {}  # stage -> done, total, step, time printed
        self._lock = threading.Lock()

    def __call__(self, event: ProgressEvent) -> None:
        step = self.steps if event.total <= 0 else event.done * self.steps // event.total
        now = time.monotonic()
        with self._lock:
            last = self._last.get(event.stage)
            restarted = last is None or event.total != last[1] or event.done < last[0]
            if not (restarted or (event.done >= event.total and event.done != last[0]) or step > last[2]
                    or now - last[3] >= self.every_s):
                return
            self._last[event.stage] = (event.done, event.total, step, now)
            # one write with its newline: a log line written from another thread cannot land inside it
            self.stream.write(progress_line(event) + "\n")
            self.stream.flush()


class BarProgress:
    """Progress as one live bar per stage (rich) on ``console``; use as a context manager."""

    def __init__(self, console) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[unit]}"), TimeElapsedColumn(),
                                 TextColumn("{task.fields[message]}"), console=console)
        self._tasks: dict[str, tuple[int, int, int]] = {}  # stage -> task id, done, total
        self._lock = threading.Lock()

    def __enter__(self) -> BarProgress:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, event: ProgressEvent) -> None:
        with self._lock:
            known = self._tasks.get(event.stage)
            if known is None or event.total != known[2] or event.done < known[1]:  # a new pass of the stage
                task = self.progress.add_task(event.stage, total=event.total, completed=event.done,
                                              unit=STAGE_UNITS.get(event.stage, ""), message=event.message)
            else:
                task = known[0]
            self._tasks[event.stage] = (task, event.done, event.total)
        self.progress.update(task, completed=event.done, message=event.message)


@contextmanager
def progress_display(stream: IO[str] | None = None) -> Iterator[None]:
    """Show the progress reports of this process (:func:`tasks.progress.listen`) on ``stream``
    (default ``sys.stderr``) while the block runs: bars on an interactive terminal, else plain lines."""
    from rich.console import Console

    stream = stream if stream is not None else sys.stderr
    console = Console(file=stream)
    if console.is_interactive:
        with BarProgress(console) as bars, listen(bars):
            yield
    else:
        with listen(PlainProgress(stream)):
            yield


def one_line(exc: BaseException, *, options: Mapping[str, str] | None = None) -> str:
    """The message of ``exc`` on one line.

    A pydantic ValidationError becomes each error as ``field: message``, the field named as the
    command-line option that sets it when ``options`` (spec field -> option, e.g. ``batch_size`` ->
    ``--batch-size``) has one, pydantic's internal names left out; of a field that takes either a
    choice or a record, only the error that says what is wrong with the choice is kept. Spec fields
    that a message names (``min_epoch_patches applies to ...``) are written as their options too,
    unless the message names the option already (see :func:`name_options`)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        fields: dict[str, list[tuple[str, str]]] = {}
        for e in exc.errors():
            path = ".".join(str(p) for p in e["loc"] if not any(c in str(p) for c in "[(")) or "value"
            msg = e["msg"].removeprefix("Value error, ")
            fields.setdefault(path, []).append((e["type"], msg))
        parts, named = [], True
        for path, errors in fields.items():
            own = [m for t, m in errors if t == "value_error"] or [m for _, m in errors]
            if path == "value":  # the spec's own check across fields: its message names them
                parts.extend(dict.fromkeys(own))
                continue
            option = (options or {}).get(path.rsplit(".", 1)[-1])
            if option is None:
                option, named = path, False
            parts.extend(f"{option}: {m}" for m in dict.fromkeys(own))
        return name_options(("" if named else f"invalid {exc.title}: ") + "; ".join(parts), options)
    return name_options(error_line(exc, None), options) or type(exc).__name__


def name_options(text: str, options: Mapping[str, str] | None) -> str:
    """``text`` with each spec field of ``options`` that it names (``group_pattern``) written as its
    option (``--group-pattern``): fields with an underscore only (``model`` or ``epochs`` could be
    plain words), as whole words (not inside a path), and not where the message names the option
    itself already."""
    for field, option in (options or {}).items():
        if "_" in field and field in text and option not in text:
            text = re.sub(rf"(?<![\w/.-]){re.escape(field)}(?![\w/.-])", option, text)
    return text
