"""One writer per location: a lease file with a heartbeat.

A run directory (``RUN_DIR/.segflow-lease.json``) or a collection store being ingested (the hidden
file ``.segflow-lease.<store name>.json`` beside it, so that replacing the store never deletes
it) is written by one process at a time. The lease file names its holder: host, pid (and the
pid's start time, so a reused pid does not pass for the holder), the command and run id, when it
started and its last heartbeat. A thread renews the heartbeat every ``heartbeat_s`` while the
lease is held; it is released (deleted) on exit.

A second writer finds the lease and waits (up to ``wait_s`` seconds) or refuses with
:class:`LeaseBusy`, naming the holder. A lease is *stale*, and is taken over with a warning, when
its heartbeat is older than ``stale_after_s``, or when its holder ran on this host and its process
is gone (a crash, a SIGKILL): re-running a killed command resumes at once.

Locally the lease is created with a hard link of a fully written temporary file (atomic: of two
writers exactly one creates it). On object stores (``s3://``) there is no atomic create: the
writer puts the lease, waits a moment and reads it back, and backs off when another holder's
token is there (best effort).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from segcore import fsio
from segcore.errors import ConfigError, SegflowError

log = logging.getLogger(__name__)

#: Every lease file's name starts with this (after the leading dots of temporary names).
LEASE_PREFIX = "segflow-lease"
DEFAULT_STALE_AFTER_S = 60.0
DEFAULT_HEARTBEAT_S = 10.0
_SETTLE_S = 0.25  # between writing a lease without an atomic create and reading it back
_POLL_S = 1.0


class LeaseBusy(SegflowError, BlockingIOError):
    """Another live process holds the lease of a location; the message names it."""


def run_dir_lease(run_dir: str | os.PathLike[str]) -> str:
    """Location of the lease file of a run directory (inside it)."""
    return fsio.join(run_dir, f".{LEASE_PREFIX}.json")


def store_lease(store: str | os.PathLike[str]) -> str:
    """Location of the lease file of a collection store, a path or URL (beside it: ``--overwrite``
    replaces the store)."""
    text = os.fspath(store).rstrip("/")
    if "://" in text and not fsio.is_local(text):
        parent, name = text.rsplit("/", 1)
        if parent.endswith(":/"):
            raise ConfigError(f"store {text!r} is a bucket; put the store below it (e.g. {text}/collection.zarr)")
        return fsio.join(parent, f".{LEASE_PREFIX}.{name}.json")
    path = os.path.abspath(fsio.local_path(text) or text)
    return os.path.join(os.path.dirname(path), f".{LEASE_PREFIX}.{os.path.basename(path)}.json")


def is_lease_name(name: str) -> bool:
    """True for the base name of a lease file or of its temporary file while it is written."""
    return name.rsplit("/", 1)[-1].lstrip(".").startswith(LEASE_PREFIX)


def _pid_start(pid: int) -> int | None:
    """Start time of process ``pid`` in clock ticks since boot (Linux), None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _alive(pid: int, start: int | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return start is None or _pid_start(pid) in (None, start)


@dataclass(frozen=True)
class Holder:
    """Who holds a lease. ``started`` and ``heartbeat`` are Unix times in seconds."""

    host: str
    pid: int
    pid_start: int | None
    command: str
    run: str
    token: str
    started: float
    heartbeat: float

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> "Holder":
        raw = json.loads(data)
        return cls(host=str(raw["host"]), pid=int(raw["pid"]), pid_start=raw.get("pid_start"),
                   command=str(raw.get("command", "")), run=str(raw.get("run", "")), token=str(raw["token"]),
                   started=float(raw["started"]), heartbeat=float(raw["heartbeat"]))

    def describe(self, *, now: float) -> str:
        """``pid 1234 on host h since 10:02:11 (heartbeat 3 s ago)`` (local time)."""
        since = dt.datetime.fromtimestamp(self.started).strftime("%H:%M:%S")
        return (f"pid {self.pid} on host {self.host} since {since} "
                f"(heartbeat {max(0, round(now - self.heartbeat))} s ago)")

    def stale_reason(self, *, now: float, stale_after_s: float) -> str | None:
        """Why the lease may be taken over (holder gone, no heartbeat for too long), or None. A holder
        on this host whose process is alive is never stale, however late its heartbeat (a busy machine)."""
        if self.host == socket.gethostname():
            return None if _alive(self.pid, self.pid_start) else f"its process {self.pid} on this host is gone"
        if now - self.heartbeat > stale_after_s:
            return f"no heartbeat for {now - self.heartbeat:.0f} s (stale after {stale_after_s:g} s)"
        return None


class Lease:
    """The lease of one location; a context manager (acquire on enter, release on exit).

    Args:
        location: the lease file (:func:`run_dir_lease`, :func:`store_lease`); a path or fsspec URL.
        what: the thing leased, for messages (``"run directory runs/r1"``).
        doing: what the holder does to it (``"written"``, ``"ingested"``).
        option: the command-line option that names another location (``"--out"``).
        run: run id or flow run recorded with the holder.
        wait_s: how long :meth:`acquire` waits for a live holder before it raises :class:`LeaseBusy`.
        stale_after_s: a lease whose heartbeat is older than this is taken over.
        heartbeat_s: seconds between renewals (must be shorter than ``stale_after_s``).

    A local directory the lease had to create (a new run directory) is removed again on release if
    nothing else was written into it: a command refused before any work leaves nothing behind.
    """

    def __init__(self, location: str, *, what: str, doing: str = "written", option: str = "--out", run: str = "",
                 wait_s: float = 0.0, stale_after_s: float = DEFAULT_STALE_AFTER_S,
                 heartbeat_s: float = DEFAULT_HEARTBEAT_S) -> None:
        if not 0 < heartbeat_s < stale_after_s:
            raise ValueError(f"heartbeat_s ({heartbeat_s}) must be positive and below stale_after_s "
                             f"({stale_after_s}), or a live holder would look stale")
        if wait_s < 0:
            raise ValueError(f"wait_s must be >= 0, not {wait_s}")
        self.location, self.what, self.doing, self.option = location, what, doing, option
        self.wait_s, self.stale_after_s, self.heartbeat_s = wait_s, stale_after_s, heartbeat_s
        self._fs, self._path = fsio.url_to_fs(location)
        self._local = fsio.is_local(location)
        self.holder = Holder(host=socket.gethostname(), pid=os.getpid(), pid_start=_pid_start(os.getpid()),
                             command=" ".join(sys.argv)[:500], run=run, token=uuid.uuid4().hex, started=0.0,
                             heartbeat=0.0)
        self.took_over: Holder | None = None  # the stale holder replaced, if any
        self.lost = False  # another writer took the lease while this one held it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._made_dir: str | None = None  # a local directory created for the lease file

    # -- reading and writing the file --------------------------------------------------------------

    def read(self) -> Holder | None:
        """The current holder, None when there is no lease file; an unreadable one reads as stale."""
        try:
            data = self._fs.cat_file(self._path)
        except FileNotFoundError:
            return None
        try:
            return Holder.from_bytes(data)
        except (ValueError, KeyError, TypeError):
            return Holder(host="?", pid=-1, pid_start=None, command="", run="", token="unreadable", started=0.0,
                          heartbeat=0.0)

    def _stamp(self) -> Holder:
        now = time.time()
        return Holder(**{**asdict(self.holder), "started": self.holder.started or now, "heartbeat": now})

    def _create(self) -> bool:
        """Create the lease file if there is none; True when this writer's lease is the one there."""
        self.holder = self._stamp()
        if self._local:
            directory, name = os.path.split(self._path)
            if not os.path.isdir(directory):
                os.makedirs(directory, exist_ok=True)
                self._made_dir = directory
            tmp = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.tmp")
            with open(tmp, "wb") as fh:
                fh.write(self.holder.to_bytes())
            try:
                os.link(tmp, self._path)  # fails when the lease exists: an atomic create
                return True
            except FileExistsError:
                return False
            finally:
                os.unlink(tmp)
        if self._fs.exists(self._path):
            return False
        return self._put_and_check()

    def _put_and_check(self) -> bool:
        """Replace the lease file with this writer's, wait, read it back: True when it is still ours."""
        self.holder = self._stamp()
        fsio.write_bytes(self.location, self.holder.to_bytes())
        time.sleep(_SETTLE_S)
        current = self.read()
        return current is not None and current.token == self.holder.token

    # -- acquire, renew, release -------------------------------------------------------------------

    def busy_message(self, holder: Holder) -> str:
        waited = f" (waited {self.wait_s:g} s)" if self.wait_s else ""
        return (f"{self.what} is being {self.doing} by {holder.describe(now=time.time())}{waited}; wait for it "
                f"(--wait-for-lease SECONDS) or use another {self.option}")

    def acquire(self) -> "Lease":
        """Take the lease: create it, take over a stale one, or wait for a live holder up to ``wait_s``.

        Raises:
            LeaseBusy: a live holder still has it after ``wait_s`` seconds (at once when 0).
            ConfigError: the lease's folder cannot be made or written (a file stands in the way).
        """
        problem = fsio.write_problem(os.path.dirname(self._path), folder=True) if self._local else None
        if problem:
            raise ConfigError(f"cannot write the {self.what}: {problem}; give another {self.option}")
        deadline = time.monotonic() + self.wait_s
        announced = False
        while True:
            current = self.read()
            if current is None:
                if self._create():
                    break
                continue
            reason = current.stale_reason(now=time.time(), stale_after_s=self.stale_after_s)
            if reason is not None:
                log.warning("%s: taking over the lease of %s: %s", self.what,
                            current.describe(now=time.time()), reason)
                if self._put_and_check():
                    self.took_over = current
                    break
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LeaseBusy(self.busy_message(current))
            if not announced:
                log.info("%s is being %s by %s; waiting up to %g s", self.what, self.doing,
                         current.describe(now=time.time()), remaining)
                announced = True
            time.sleep(min(_POLL_S, remaining))
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"lease-heartbeat {self.location}", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                current = self.read()
                if current is None or current.token != self.holder.token:
                    self.lost = True
                    log.error("%s: the lease was taken by %s while this process held it; two writers may now "
                              "be at work", self.what, current.describe(now=time.time()) if current else "nobody")
                    return
                self.holder = self._stamp()
                fsio.write_bytes(self.location, self.holder.to_bytes())
            except Exception as exc:  # a slow or flaky store (any client's error): try again at the next beat
                log.warning("%s: could not renew the lease: %s", self.what, exc)

    def release(self) -> None:
        """Stop the heartbeat and delete the lease file if it is still this writer's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        try:
            current = self.read()
            if current is not None and current.token == self.holder.token:
                self._fs.rm_file(self._path)
            if self._made_dir is not None and not os.listdir(self._made_dir):
                os.rmdir(self._made_dir)  # created for the lease alone, and nothing came of it
        except OSError as exc:
            log.warning("%s: could not remove the lease %s (%s); the next writer takes it over as stale",
                        self.what, self.location, exc)

    def __enter__(self) -> "Lease":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
