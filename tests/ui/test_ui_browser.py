"""The Prefect UI as an operator sees it: a real `prefect server`, a real `segflow run`, headless Chromium.

Starts a Prefect server on a free port with its own PREFECT_HOME, runs the `segflow run` command
against it on a tiny synthetic collection, then opens the flow run page in Chromium and checks
that the run's name, its task runs and its artifacts (Dice summary, table, histogram image,
gallery, progress, links) are rendered. Screenshots go to ``$SEGFLOW_TEST_ARTIFACTS`` or
``test-artifacts/`` at the repository root. Skipped when no Chromium is installed
(``make test`` installs Debian's ``chromium`` where it can).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.ui.browser import Browser, find_chromium
from tests.external_cluster import free_port

pytestmark = pytest.mark.browser

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]


def _artifact_dir() -> Path:
    return Path(os.environ.get("SEGFLOW_TEST_ARTIFACTS") or REPO / "test-artifacts")


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("no chromium or chromium-browser executable on PATH: the Prefect UI browser test needs one "
                    "(Debian: apt-get install chromium; `make test` installs it when run as root)")
    return path


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    """``(api_url, env)``: a `prefect server start` of its own, and the environment of its clients."""
    home = tmp_path_factory.mktemp("prefect-server-home")
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1",
               PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port), PREFECT_UI_API_URL=api)
    log = open(home / "server.log", "w+")
    proc = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=home, start_new_session=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                raise RuntimeError(f"prefect server did not become healthy on port {port}: {log.read()[-3000:]}")
            time.sleep(0.5)
        yield api, dict(env, PREFECT_API_URL=api)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        log.close()


@pytest.fixture(scope="module")
def finished_run(prefect_server, tmp_path_factory):
    """`segflow run` on 12 synthetic 64x64 images with a 3-class UNet fitted for a few seconds (so that the
    histogram and the gallery show a spread of Dice), against the server."""
    import torch

    from segcore import synthetic
    from segcore.models.checkpoint import ModelMeta, save_checkpoint
    from segcore.models import create_model
    from segcore.normalise import Normalisation

    api, env = prefect_server
    root = tmp_path_factory.mktemp("ui-collection")
    synthetic.generate_collection(root / "collection", n_images=12, size=64, seed=3)
    torch.manual_seed(0)
    model = create_model("unet", in_channels=1, num_classes=3, base=4, depth=2)
    from segcore.collection.imageio import read_image, read_mask

    files = sorted((root / "collection" / "images").glob("*.png"))[:8]
    x = torch.from_numpy(np.stack([read_image(f)[..., 0] for f in files])[:, None].astype(np.float32) / 255.0)
    y = torch.from_numpy(np.stack([read_mask(root / "collection" / "masks" / f.name) for f in files]).astype(np.int64))
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    weight = torch.tensor([0.2, 1.0, 1.0])  # the shapes are small: without weights it learns background only
    for _ in range(100):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y, weight=weight).backward()
        opt.step()
    model.eval()
    checkpoint = save_checkpoint(root / "tiny-unet.safetensors", model,
                                 ModelMeta(arch="unet", arch_kwargs={"base": 4, "depth": 2},
                                           class_names=synthetic.CLASS_NAMES, in_channels=1,
                                           normalisation=Normalisation(mode="range", scale=255.0)))
    out = root / "run-ui"
    cmd = [str(BIN / "segflow"), "run", "--images", str(root / "collection" / "images"),
           "--masks", str(root / "collection" / "masks"), "--checkpoint", str(checkpoint), "--out", str(out),
           "--workers", "1", "--threads-per-worker", "1"]
    done = subprocess.run(cmd, env=dict(env, OMP_NUM_THREADS="1"), cwd=root, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"segflow run failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    runs = httpx.post(f"{api}/flow_runs/filter", json={"flows": {"name": {"any_": ["segflow-run"]}}},
                      timeout=30).json()
    assert len(runs) == 1, runs
    flow_run = runs[0]
    tasks = httpx.post(f"{api}/task_runs/filter",
                       json={"flow_runs": {"id": {"any_": [flow_run["id"]]}}}, timeout=30).json()
    artifacts = httpx.post(f"{api}/artifacts/filter",
                           json={"artifacts": {"flow_run_id": {"any_": [flow_run["id"]]}}}, timeout=30).json()
    return {"api": api, "flow_run": flow_run, "tasks": tasks, "artifacts": artifacts, "out": out,
            "base": api.removesuffix("/api")}


def test_the_run_and_its_artifacts_are_recorded(finished_run):
    flow_run, artifacts = finished_run["flow_run"], finished_run["artifacts"]
    assert flow_run["state_type"] == "COMPLETED"
    assert flow_run["name"] == "run collection/images with tiny-unet.safetensors -> run-ui"
    names = sorted(t["name"] for t in finished_run["tasks"])
    assert "segment-unit-00000 [g000 images 0-11]" in names
    assert any(n.startswith("probe-files [files 0-11]") for n in names)
    keyed = {a["key"].rsplit("-", 2)[0]: a for a in artifacts if a["key"]}
    assert set(keyed) == {"dice-summary", "dice-table", "dice-histogram", "worst-images", "segment-progress"}
    assert keyed["segment-progress"]["type"] == "progress" and keyed["segment-progress"]["data"] == 100
    assert keyed["dice-table"]["type"] == "table"
    assert "data:image/png;base64," in keyed["dice-histogram"]["data"]
    assert keyed["worst-images"]["data"].count("data:image/png;base64,") == 3 * 6
    links = [a["data"] for a in artifacts if a["key"] is None]
    out = finished_run["out"]
    for target in (out, out / "masks.zarr", out / "dice", out / "summary.md"):
        assert any(f"({target.as_uri()})" in link for link in links), (target, links)


def test_the_ui_shows_the_task_runs_and_the_dice_artifacts(chromium, finished_run, tmp_path):
    flow_run, base = finished_run["flow_run"], finished_run["base"]
    keys = {a["key"].rsplit("-", 2)[0]: a for a in finished_run["artifacts"] if a["key"]}
    shots = _artifact_dir()
    browser = Browser(chromium, tmp_path / "chromium-profile")
    try:
        browser.open(f"{base}/runs/flow-run/{flow_run['id']}")
        browser.wait_for_text(flow_run["name"], "Completed", "Task Runs", "Artifacts", timeout=60)
        browser.click_text("Task Runs")
        browser.wait_for_text(*[t["name"] for t in finished_run["tasks"]])
        browser.screenshot(shots / "ui-flow-run-task-runs.png")

        browser.click_text("Artifacts")
        browser.wait_for_text(*[a["key"] for a in keys.values()], "Dice summary of run")
        browser.evaluate("document.querySelector('.p-tabs, [role=tablist]')?.scrollIntoView()")
        time.sleep(0.5)
        browser.screenshot(shots / "ui-flow-run-artifacts.png")

        browser.open(f"{base}/artifacts/artifact/{keys['dice-summary']['id']}")
        browser.wait_for_text("mean foreground Dice", "background", "disc", "square", "Worst images")
        browser.screenshot(shots / "ui-dice-summary.png")

        browser.open(f"{base}/artifacts/artifact/{keys['dice-histogram']['id']}")
        browser.wait_for_text("Dice per image")
        assert _wait_for_images(browser, 1) == [(640, 320)]  # the data-URI PNG is decoded and shown
        browser.screenshot(shots / "ui-dice-histogram.png")

        browser.open(f"{base}/artifacts/artifact/{keys['worst-images']['id']}")
        browser.wait_for_text("Worst images of run", "ground truth", "prediction")
        assert _wait_for_images(browser, 18) == [(64, 64)] * 18
        browser.screenshot(shots / "ui-worst-images.png")
    finally:
        browser.close()


def _wait_for_images(browser: Browser, n: int, timeout: float = 20.0) -> list[tuple[int, int]]:
    deadline = time.monotonic() + timeout
    while True:
        images = browser.rendered_images("data:image/png;base64,")
        if len(images) >= n and all(w > 0 for w, _ in images) or time.monotonic() > deadline:
            return images
        time.sleep(0.5)
