"""`/metrics` under gunicorn with several worker processes (as `make run` and the Docker image serve it):
each scrape lands on some worker, and every scrape must show every worker's requests, so the HTTP
counters only grow and equal the requests sent. One Content-Type, with one charset."""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from src.migrate import upgrade
from tests.support.services import free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]
SERIES = re.compile(r'^gpusnap_http_requests_total\{method="GET",route="/healthz",status="200"\} ([0-9.e+]+)$', re.M)


@pytest.fixture
def gunicorn(tmp_path):  # type: ignore[no-untyped-def]
    db = f"sqlite:///{tmp_path / 'gpusnap.db'}"
    upgrade(db)
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")},
        "DATABASE_URL": db,
        "QUEUE_PATH": str(tmp_path / "queue.db"),
        "GUNICORN_WORKERS": "3",
        "GUNICORN_THREADS": "2",
        "LOG_FORMAT": "json",
        "PYTHONPATH": str(ROOT),
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
        booted = 0
        while booted < 3:  # every worker up, so that requests spread over them
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "gunicorn.log").read_text()[-3000:]
            booted = (tmp_path / "gunicorn.log").read_text().count("Booting worker")
            time.sleep(0.2)
        for _ in range(6):  # each worker builds its app on its first request: let them, before counting
            requests.get(f"{url}/readyz", timeout=60, headers={"Connection": "close"})
        yield url, tmp_path / "gunicorn.log"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()


def _scrape(url: str) -> tuple[float, str]:
    r = requests.get(f"{url}/metrics", timeout=60, headers={"Connection": "close"})
    assert r.status_code == 200
    match = SERIES.search(r.text)
    return (float(match.group(1)) if match else 0.0), r.headers["Content-Type"]


def test_http_counters_are_summed_over_workers_and_never_go_back(gunicorn):
    url, log_path = gunicorn
    sent = 0
    seen: list[float] = []
    with ThreadPoolExecutor(6) as pool:
        for _ in range(8):
            codes = list(
                pool.map(
                    lambda _: requests.get(f"{url}/healthz", timeout=60, headers={"Connection": "close"}).status_code,
                    range(12),
                )
            )
            assert codes == [200] * 12
            sent += 12
            for _ in range(3):  # several scrapes, each on whichever worker takes it
                value, content_type = _scrape(url)
                seen.append(value)
                assert value == sent, (seen, sent)
                assert content_type.count("charset") == 1 and content_type.startswith("text/plain"), content_type
    assert seen == sorted(seen)
    # The requests did spread over several workers (or the check above would prove nothing).
    pids = {
        json.loads(line)["pid"].strip("<>")
        for line in log_path.read_text().splitlines()
        if line.startswith('{"remote"') and "GET /healthz " in line
    }
    assert len(pids) >= 2, pids
