"""Fixtures for real-browser tests: a token-protected JupyterLab on 127.0.0.1 and Debian's Chromium via Playwright.

Adapted from shared/browser/RECIPE.md: fresh Jupyter config/settings/workspace dirs (no news toast, no restored
tabs), the kernel is waited for through the REST API before Run All, and the server is stopped by its PID.
Installs: `bash scripts/install_browser.sh` (apt chromium + fonts-liberation; pip jupyterlab notebook playwright).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from browser_notebook import SCREENSHOTS

CHROMIUM = "/usr/bin/chromium"
CHROME_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
]


def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return f"{CHROMIUM} not found (run scripts/install_browser.sh as root: apt-get install chromium)"
    for module in ("playwright.sync_api", "jupyterlab", "notebook"):
        try:
            __import__(module)
        except ImportError:
            return f"python package {module.split('.')[0]} missing (run scripts/install_browser.sh)"
    return None


@dataclass
class Server:
    base: str
    token: str
    root: Path
    log: Path

    def api(self, path: str, method: str = "GET") -> object:
        sep = "&" if "?" in path else "?"
        req = urllib.request.Request(f"{self.base}{path}{sep}token={self.token}", method=method)
        with urllib.request.urlopen(req, timeout=10) as r:
            body = r.read()
        return json.loads(body) if body else None

    def url(self, ui: str, notebook: str) -> str:
        prefix = "lab/tree" if ui == "lab" else "notebooks"
        return f"{self.base}/{prefix}/{notebook}?token={self.token}"

    def kernel_state(self, notebook: str) -> str | None:
        """The notebook's kernel execution_state from the REST API ("idle", "busy", "dead", ...), None if no session."""
        for s in self.api("/api/sessions"):
            if s["path"].endswith(notebook):
                return s["kernel"]["execution_state"]
        return None

    def wait_kernel_idle(self, notebook: str, timeout: float = 120) -> None:
        """The REST API is the ground truth (the toolbar indicator can say idle before the kernel exists)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.kernel_state(notebook) == "idle":
                return
            time.sleep(0.3)
        raise TimeoutError(f"no idle kernel for {notebook} after {timeout:.0f}s; see {self.log}")

    def shutdown_sessions(self) -> None:
        for s in self.api("/api/sessions"):
            self.api(f"/api/sessions/{s['id']}", method="DELETE")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    for var, sub in [("JUPYTER_CONFIG_DIR", "jcfg"), ("JUPYTERLAB_SETTINGS_DIR", "lab-settings"),
                     ("JUPYTERLAB_WORKSPACES_DIR", "lab-workspaces"), ("IPYTHONDIR", "ipython"),
                     ("JUPYTER_RUNTIME_DIR", "runtime")]:  # fmt: skip
        env[var] = str(work / sub)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    notif = work / "lab-settings" / "@jupyterlab" / "apputils-extension"
    notif.mkdir(parents=True)
    (notif / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False})
    )
    # every cell attached and laid out (the default "contentVisibility" skips rendering off-screen cells, so their
    # innerText and visibility are not what a reader scrolling there would get)
    tracker = work / "lab-settings" / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    return env


@pytest.fixture(scope="module")
def jupyter_server(request) -> Iterator[Server]:
    """One server per test module; a module's `SERVER_ENV` dict goes into its environment (kernels inherit it)."""
    reason = _missing()
    if reason:
        pytest.skip(reason)
    work = Path(tempfile.mkdtemp(prefix="rlhf-browser-"))
    root = work / "root"
    root.mkdir()
    port, token = _free_port(), secrets.token_hex(16)
    log = work / "server.log"
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
           "--port-retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           "--ServerApp.allow_remote_access=False", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
           "--LabApp.news_url="]  # fmt: skip
    env = _env(work) | dict(getattr(request.module, "SERVER_ENV", {}))
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    server = Server(f"http://127.0.0.1:{port}", token, root, log)
    try:
        _wait_up(server, proc)
        yield server
    finally:
        _stop(proc)
        shutil.rmtree(work, ignore_errors=True)


def _wait_up(server: Server, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited early:\n{server.log.read_text()[-2000:]}")
        with contextlib.suppress(OSError):
            server.api("/api/status")
            return
        time.sleep(0.3)
    raise TimeoutError("jupyter lab did not come up")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM (the server shuts its kernels down), then SIGKILL of its own process group only."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def chromium() -> Iterator[object]:
    reason = _missing()
    if reason:
        pytest.skip(reason)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        yield p.chromium


@pytest.fixture
def page(chromium, jupyter_server, request) -> Iterator[object]:
    """A fresh browser profile per test; a screenshot is kept when the test fails."""
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    ctx = chromium.launch_persistent_context(
        profile, executable_path=CHROMIUM, headless=True, args=CHROME_ARGS, viewport={"width": 1280, "height": 1000}
    )
    page = ctx.pages[0] if ctx.pages else ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    try:
        yield page
    finally:
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(Exception):
                page.screenshot(path=str(SCREENSHOTS / f"{request.node.name}-FAIL.png"), full_page=True)
        ctx.close()
        shutil.rmtree(profile, ignore_errors=True)
        with contextlib.suppress(Exception):
            jupyter_server.shutdown_sessions()  # the next test gets a fresh kernel


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)
