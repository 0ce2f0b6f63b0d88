"""A headless Chromium driven over the DevTools protocol: open a page, wait for text, click, screenshot.

Only what the UI test needs, on the ``websockets`` client that Prefect already depends on.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from websockets.sync.client import connect

CHROMIUM_NAMES = ("chromium", "chromium-browser")


def find_chromium() -> str | None:
    """Path of a Chromium executable on PATH (Debian's ``chromium``, Ubuntu's ``chromium-browser``)."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


class Browser:
    """One headless Chromium process with one page; ``close()`` ends the process group it started."""

    def __init__(self, executable: str, profile: Path, *, width: int = 1400, height: int = 1000,
                 timeout: float = 60.0) -> None:
        self._log = open(profile.parent / "chromium.log", "w+")
        self.proc = subprocess.Popen(
            [executable, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}",
             "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=self._log, start_new_session=True)
        self._ids = itertools.count(1)
        try:
            port = self._devtools_port(profile, timeout)
            import httpx

            pages = [t for t in httpx.get(f"http://127.0.0.1:{port}/json/list", timeout=10).json()
                     if t["type"] == "page"]
            self.ws = connect(pages[0]["webSocketDebuggerUrl"], max_size=2**26, open_timeout=timeout)
            self.call("Page.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False)
        except Exception:
            self.close()
            raise

    def _devtools_port(self, profile: Path, timeout: float) -> int:
        deadline = time.monotonic() + timeout
        port_file = profile / "DevToolsActivePort"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self._log.seek(0)
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: {self._log.read()[-2000:]}")
            if port_file.exists() and port_file.read_text().strip():
                return int(port_file.read_text().split()[0])
            time.sleep(0.2)
        raise TimeoutError("chromium did not open its DevTools port")

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """Send one DevTools command and return its result (events in between are dropped)."""
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == msg_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression!r}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def open(self, url: str) -> None:
        self.call("Page.navigate", url=url)

    def text(self) -> str:
        """The rendered text of the page (``document.body.innerText``)."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for_text(self, *needles: str, timeout: float = 30.0) -> str:
        """Wait until every one of ``needles`` is in the rendered text; returns that text."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.text()
            missing = [n for n in needles if n not in text]
            if not missing:
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"not shown after {timeout:.0f} s: {missing}; the page shows: {text[:1500]!r}")
            time.sleep(0.5)

    def click_text(self, text: str, *, selector: str = "button, a, [role=tab], .p-tab") -> None:
        """Click the first element matching ``selector`` whose own text is exactly ``text``."""
        found = self.evaluate(
            f"(() => {{ const el = [...document.querySelectorAll({json.dumps(selector)})]"
            f".find(e => e.innerText.trim() === {json.dumps(text)}); if (el) {{ el.click(); return true; }}"
            " return false; })()")
        if not found:
            raise AssertionError(f"no {selector!r} element with text {text!r}")

    def rendered_images(self, src_prefix: str) -> list[tuple[int, int]]:
        """``(naturalWidth, naturalHeight)`` of every loaded ``<img>`` whose src starts with ``src_prefix``."""
        return [tuple(x) for x in self.evaluate(
            f"[...document.images].filter(i => i.src.startsWith({json.dumps(src_prefix)}) && i.complete)"
            ".map(i => [i.naturalWidth, i.naturalHeight])")]

    def screenshot(self, path: Path) -> Path:
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        ws = getattr(self, "ws", None)
        if ws is not None:
            ws.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
