"""A real Prefect server in a subprocess (its own home and port), the environment that the
``prefect`` commands of a test share, and a tiny collection with a checkpoint to run on."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from segcore.models.checkpoint import ModelMeta, save_checkpoint
from segcore.models import create_model
from segcore.normalise import Normalisation
from segcore.synthetic import CLASS_NAMES, generate_collection
from tests.external_cluster import free_port

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def stop(proc: subprocess.Popen) -> None:
    """Terminate ``proc`` and its children (started in a session of their own), then reap it."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        except ProcessLookupError:
            pass


def start(args: list[str], *, env: dict[str, str], log: Path, cwd: Path) -> subprocess.Popen:
    """Start ``args`` in a new session (so that ``stop`` reaches its children), output to ``log``."""
    with open(log, "wb") as out:
        return subprocess.Popen(args, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


class PrefectServer:
    def __init__(self, url: str, env: dict[str, str], home: Path, log: Path) -> None:
        self.url, self.env, self.home, self.log = url, env, home, log
        self.api = httpx.Client(base_url=url, timeout=30)

    def post(self, path: str, json: dict | None = None) -> list | dict:
        response = self.api.post(path, json=json or {})
        response.raise_for_status()
        return response.json()

    def get(self, path: str) -> dict:
        response = self.api.get(path)
        response.raise_for_status()
        return response.json()


def _serve(tmp_path_factory, *, scheduler: bool):
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home / "prefect"), PREFECT_API_URL=url, PREFECT_SERVER_ANALYTICS_ENABLED="false",
               DO_NOT_TRACK="1", CI="true", PREFECT_CLI_PROMPT="false", PWD=str(ROOT))
    if scheduler:
        env.update(PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="1")
    else:
        env.update(PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED="false")
    log = home / "server.log"
    proc = start([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                 env=env, log=log, cwd=home)
    server = PrefectServer(url, env, home, log)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if server.api.get("/health").json() is True:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"prefect server did not answer on {url}/health:\n{log.read_text()[-5000:]}")
            time.sleep(0.5)
        yield server
    finally:
        server.api.close()
        stop(proc)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """``prefect server start`` on 127.0.0.1 with a temporary home; the scheduler service is off,
    so no run of an hourly schedule can start during the test: the test starts its runs itself."""
    yield from _serve(tmp_path_factory, scheduler=False)


@pytest.fixture(scope="module")
def scheduling_server(tmp_path_factory):
    """Like ``prefect_server`` but with the scheduler service on (every second); no worker ever runs there."""
    yield from _serve(tmp_path_factory, scheduler=True)


@pytest.fixture(scope="module")
def tiny_collection(tmp_path_factory) -> dict:
    """``images/`` and ``masks/`` of 6 synthetic 32x32 images and a 3-class UNet checkpoint (untrained)."""
    root = tmp_path_factory.mktemp("tiny-collection")
    generate_collection(root, n_images=6, size=32, seed=0)
    torch.manual_seed(0)
    model = create_model("unet", in_channels=1, num_classes=len(CLASS_NAMES), base=4, depth=2)
    meta = ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2}, class_names=CLASS_NAMES, in_channels=1,
                     normalisation=Normalisation(mode="range", scale=255.0))
    ckpt = save_checkpoint(root / "model.safetensors", model, meta)
    return {"root": root, "images": str(root / "images"), "masks": str(root / "masks"), "checkpoint": str(ckpt),
            "n_images": 6}
