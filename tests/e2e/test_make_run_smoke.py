"""What `make run` starts: `gpusnap serve` (migrations, then gunicorn and a worker as real processes) on
a free port with a temporary SQLite database and queue. It answers, enforces tokens, and stops cleanly
on SIGTERM, taking its children with it."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import pytest
import requests

from tests.support.services import free_port, port_open

TOKEN = "smoke-token-0123456789abcdef"


def _children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    except FileNotFoundError:  # no procps: the port check below still covers gunicorn
        return []
    return [int(p) for p in out.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def served(tmp_path):  # type: ignore[no-untyped-def]
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("REDIS_URL",)},
        "DATABASE_URL": f"sqlite:///{tmp_path / 'instance' / 'gpusnap.db'}",
        "QUEUE_PATH": str(tmp_path / "instance" / "queue.db"),
        "API_TOKENS": TOKEN,
        "GUNICORN_WORKERS": "1",
        "GUNICORN_THREADS": "2",
        "LOG_FORMAT": "json",
    }
    gpusnap = pathlib.Path(sys.executable).with_name("gpusnap")
    command = [str(gpusnap)] if gpusnap.exists() else [sys.executable, "-m", "src.cli"]
    log = open(tmp_path / "serve.log", "wb")
    proc = subprocess.Popen(
        [*command, "serve", "--host", "127.0.0.1", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-4000:]
            try:
                if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or its worker still booting
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-4000:]
            time.sleep(0.2)
        yield proc, url, port, tmp_path / "serve.log"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def test_gpusnap_serve_answers_enforces_tokens_and_stops_cleanly(served):
    proc, url, port, log_path = served
    assert requests.get(f"{url}/api/gpu-snapshots", timeout=5).status_code == 401
    r = requests.get(f"{url}/api/gpu-snapshots", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5)
    assert r.status_code == 200 and r.json() == {"items": [], "next_cursor": None}
    ready = requests.get(f"{url}/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "queue": "ok"}
    children = _children(proc.pid)
    assert len(children) in (0, 2), children  # the worker and the gunicorn master

    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=45) == 0, log_path.read_text()[-4000:]
    assert not port_open("127.0.0.1", port)
    deadline = time.monotonic() + 10
    while any(_alive(c) for c in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(c) for c in children), "serve left a child process running"
