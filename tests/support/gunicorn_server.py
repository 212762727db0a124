"""The API under gunicorn with the project's `gunicorn.conf.py`, as `make run` and the Docker image serve
it, on a fresh SQLite database in `tmp_path`: for tests of what only the real server does (its access
log, its sockets)."""

from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import requests

from src.migrate import upgrade
from tests.support.services import free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]


@dataclass
class Gunicorn:
    url: str
    database_url: str
    log_path: pathlib.Path

    def log(self) -> str:
        return self.log_path.read_text()


@contextmanager
def gunicorn_server(tmp_path: pathlib.Path, **env: str) -> Iterator[Gunicorn]:
    db = f"sqlite:///{tmp_path / 'gpusnap.db'}"
    upgrade(db)
    port = free_port()
    full_env = {
        **{k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")},
        "DATABASE_URL": db,
        "QUEUE_PATH": str(tmp_path / "queue.db"),
        "GUNICORN_WORKERS": "1",
        "GUNICORN_THREADS": "4",
        "LOG_FORMAT": "json",
        "PYTHONPATH": str(ROOT),
        **env,
    }
    log_path = tmp_path / "gunicorn.log"
    log = open(log_path, "wb")
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
        env=full_env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    server = Gunicorn(f"http://127.0.0.1:{port}", db, log_path)
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, server.log()[-3000:]
            try:
                requests.get(f"{server.url}/readyz", timeout=5)
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        yield server
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
