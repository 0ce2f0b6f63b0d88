"""The Prefect API a command's flows report to: the configured one, or a temporary local server.

With no ``PREFECT_API_URL`` configured, Prefect would start a temporary server inside the first
flow call, after importing the whole server application into the calling process (seconds of
CPU on a small machine) only to run it in a subprocess. A command instead starts that subprocess
itself, first thing and without importing the server (:func:`start_api`), goes on importing and
preparing its flow while the server boots, and waits for it only before the flow starts
(:func:`wait_api`). The server's URL is exported in the environment, so local Dask workers,
which inherit it, report to the same server (they would otherwise each start one of their own),
and this process's Prefect settings are refreshed to it. A configured ``PREFECT_API_URL`` (in
the environment or in a Prefect profile) is left alone.

The server is the one Prefect would start (its ASGI application under uvicorn, on 127.0.0.1 with
the UI off, the current Prefect settings in its environment) and stops when the process exits
(on Linux also when the process is killed).
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time

from segcore.errors import SegflowError

#: Seconds to wait for the temporary Prefect server (Prefect's own default of 20 s is too short on a
#: busy machine, where importing the server and opening its database can take longer).
SERVER_START_TIMEOUT_S = 120
#: Exit status of uvicorn when its port is taken (then another port is tried).
_PORT_IN_USE = 3


def _stop_with_parent() -> None:
    """In the server's process before it runs (Linux): be sent SIGTERM when the command's process
    ends, however it ends (a kill included), so that no server outlives its command."""
    import ctypes
    import signal

    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TemporaryServer:
    """A Prefect server in a subprocess of this process, on a free local port."""

    def __init__(self) -> None:
        self.port = 0
        self.process: subprocess.Popen | None = None
        self.ready = False

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        """Launch the server process; returns at once (see :meth:`wait`)."""
        import prefect
        from prefect.settings import get_current_settings

        self.port = _free_port()
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1", **get_current_settings().to_environment_variables(exclude_unset=True)}
        env.pop("PREFECT_API_URL", None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect.__module_path__.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"], env=env,
            preexec_fn=_stop_with_parent if sys.platform.startswith("linux") else None)

    def wait(self, timeout: float) -> None:
        """Wait until the server answers its health check; :class:`SegflowError` after ``timeout`` s
        or when the server process ends. (Its port is exported before it answers, so a port taken
        meanwhile by another program is an error, not a silent move to another port.)"""
        import httpx

        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=5) as client:
            while time.monotonic() < deadline:
                code = self.process.poll()
                if code is not None:
                    why = (f"port {self.port} was taken by another program meanwhile" if code == _PORT_IN_USE
                           else f"it exited with status {code}; its error is printed above")
                    raise SegflowError(f"the temporary Prefect server did not start: {why}; run the command again, "
                                       "or start a server once (`prefect server start`) and set PREFECT_API_URL to it")
                try:
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        self.ready = True
                        return
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
        raise SegflowError(f"the temporary Prefect server did not answer within {timeout:.0f} s (a busy machine?); "
                           "run the command again, or start a server once (`prefect server start`) and set "
                           "PREFECT_API_URL to it")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None
        self.ready = False


#: The temporary server of this process, if one was started.
_server: TemporaryServer | None = None


def _configured_url() -> str | None:
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value()


def start_api() -> None:
    """Start a temporary Prefect server when no API is configured and none runs yet; do not wait.

    Exports its URL as ``PREFECT_API_URL`` at once (worker processes started from now on inherit
    it) and refreshes this process's Prefect settings to it.
    """
    global _server
    if _server is not None and _server.process is not None:
        return
    if _configured_url():
        return
    server = TemporaryServer()
    server.start()
    _server = server
    atexit.register(server.stop)
    os.environ["PREFECT_API_URL"] = server.api_url
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()


def wait_api(timeout: float = SERVER_START_TIMEOUT_S) -> None:
    """Wait for the server :func:`start_api` started (nothing to wait for with a configured API)."""
    if _server is not None and _server.process is not None and not _server.ready:
        _server.wait(timeout)


__all__ = ["SERVER_START_TIMEOUT_S", "TemporaryServer", "start_api", "wait_api"]
