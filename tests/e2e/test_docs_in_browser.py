"""/api/docs in a real headless browser (Chromium, Debian's package, installed by `make test`'s
system-deps): Swagger UI renders every operation and the bearer "Authorize" button, without a token, and
no request leaves the machine (every non-loopback request goes to a dead proxy port, and no host name
resolves; Chromium's NetLog shows what the page itself asked for). Without Chromium this test fails:
it must not pass by not running."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from src.migrate import upgrade
from tests.support.services import free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


def chromium() -> str:
    # Debian's /usr/bin/chromium is a wrapper script around this binary (it only adds flags we set).
    real = "/usr/lib/chromium/chromium"
    found = real if os.access(real, os.X_OK) else shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail(
            "chromium is not installed: `make system-deps` (run by `make test`) installs Debian's "
            "chromium package; /api/docs cannot be checked in a browser without it"
        )
    return found


def dead_port() -> int:
    """A loopback port nothing listens on: the browser's proxy, so that no request can leave."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def page_requests(netlog: pathlib.Path, origin: str) -> list[str]:
    """URLs the page itself asked for (Chromium's NetLog: URL requests whose initiator is the page's
    origin). Chromium's own background requests (updates, sign-in, ...) have no such initiator; they go
    to the dead proxy and fail there."""
    log = json.loads(netlog.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [
        e["params"]["url"]
        for e in log["events"]
        if e["type"] == start_job and e.get("params", {}).get("initiator") == origin
    ]


@pytest.fixture
def served(tmp_path):  # type: ignore[no-untyped-def]
    db = f"sqlite:///{tmp_path / 'gpusnap.db'}"
    upgrade(db)
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")},
        "DATABASE_URL": db,
        "QUEUE_PATH": str(tmp_path / "queue.db"),
        "GUNICORN_WORKERS": "1",
        "GUNICORN_THREADS": "4",
        "PYTHONPATH": str(ROOT),
        "API_TOKENS": "",
    }
    log = open(tmp_path / "gunicorn.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--config",
            str(ROOT / "gunicorn.conf.py"),
            "--chdir",
            str(ROOT),
            "--bind",
            f"127.0.0.1:{port}",
            "app:app",
        ],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "gunicorn.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            assert time.monotonic() < deadline, (tmp_path / "gunicorn.log").read_text()[-3000:]
            time.sleep(0.2)
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()


def _browse(binary: str, url: str, profile: pathlib.Path, *extra: str) -> str:
    command = [
        binary,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-default-apps",
        "--disable-extensions",
        f"--user-data-dir={profile}",
        # Loopback is never proxied; anything else goes to a dead port, and resolves nowhere.
        f"--proxy-server=http://127.0.0.1:{dead_port()}",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--virtual-time-budget=20000",
        *extra,
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_swagger_ui_renders_every_operation_offline_without_a_token(served, tmp_path):
    binary = chromium()
    document = requests.get(f"{served}/api/openapi.json", timeout=10).json()
    operations = [(method.upper(), path) for path, ops in document["paths"].items() for method in ops]
    netlog = tmp_path / "netlog.json"
    dom = _browse(binary, f"{served}/api/docs", tmp_path / "profile", "--dump-dom", f"--log-net-log={netlog}")
    shot = tmp_path / "docs.png"
    _browse(binary, f"{served}/api/docs", tmp_path / "profile2", "--window-size=1280,1600", f"--screenshot={shot}")
    asked = page_requests(netlog, served)
    assert f"{served}/api/openapi.json" in asked and f"{served}/api/docs/assets/swagger-ui-bundle.js" in asked
    elsewhere = [url for url in asked if not url.startswith(served + "/")]
    assert elsewhere == [], f"the docs page asked for something off this server: {elsewhere}"
    assert "Failed to load API definition" not in dom
    rendered = re.findall(r'<div class="opblock opblock-(\w+)[^"]*"', dom)
    assert len(rendered) == len(operations), (len(rendered), len(operations))
    paths = set(re.findall(r'data-path="([^"]+)"', dom))
    assert {path for _, path in operations} <= paths, sorted({p for _, p in operations} - paths)
    assert re.search(r'<button class="btn authorize[^"]*"', dom), "no Authorize button"  # bearerAuth
    assert "gpusnap" in dom and "OAS 3.1" in dom
    assert shot.stat().st_size > 20_000  # a page was drawn, not a blank one
    keep = os.environ.get("GPUSNAP_DOCS_SCREENSHOT")  # to look at it: GPUSNAP_DOCS_SCREENSHOT=/tmp/docs.png
    if keep:
        shutil.copy(shot, keep)
