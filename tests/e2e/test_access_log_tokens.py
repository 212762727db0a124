"""gunicorn's access log (`gunicorn.conf.py`, as `make run` and the Docker image serve the API) must not
keep tokens that travel in URLs: the stream token of `GET /api/events?token=`, or an API token that a
careless dashboard put there. The log goes to stdout, and from there to whoever reads the logs."""
from __future__ import annotations

import os
import pathlib
import signal
import subprocess
import sys
import time

import requests

from src.migrate import upgrade
from tests.support.services import free_port

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_tokens_in_urls_are_not_written_to_the_access_log(tmp_path):
    db = f"sqlite:///{tmp_path / 'gpusnap.db'}"
    upgrade(db)
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "PROMETHEUS_MULTIPROC_DIR")},
           "DATABASE_URL": db, "QUEUE_PATH": str(tmp_path / "queue.db"), "GUNICORN_WORKERS": "1",
           "GUNICORN_THREADS": "2", "EVENTS_MAX_STREAMS": "1", "LOG_FORMAT": "json", "PYTHONPATH": str(ROOT)}
    log_path = tmp_path / "gunicorn.log"
    log = open(log_path, "wb")
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "--config", str(ROOT / "gunicorn.conf.py"),
                             "--chdir", str(ROOT), "--bind", f"127.0.0.1:{port}", "app:app"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            try:
                requests.get(f"{url}/readyz", timeout=5)
                break
            except requests.ConnectionError:
                time.sleep(0.2)
        secrets = ["gst_Stre4mTokenSecretValue", "gpusnap_ApiTokenPutInTheUrl"]
        for secret in secrets:
            r = requests.get(f"{url}/api/events", params={"machine_id": "m-1", "token": secret}, timeout=30)
            assert r.status_code == 401
        while log_path.read_text().count("/api/events") < len(secrets):  # access lines follow the answer
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.1)
        text = log_path.read_text()
        assert not [s for s in secrets if s in text], text[-3000:]
        assert "machine_id=m-1" in text  # the rest of the request line stays
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        log.close()
