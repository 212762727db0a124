"""The scale-out scenario: PostgreSQL, Redis, two API processes (gunicorn), three worker processes, one
worker stalled (SIGSTOP past JOB_STALE_AFTER_S, then SIGCONT) and one killed (-9, then restarted) while
jobs run, and requests raced at both API processes at the same moment:

* the same `Idempotency-Key` and body sent to both: both must answer 2xx with the same job;
* five first requests (no key) for a machine id nobody has used yet: one 202, the others 409, no 500.

Each accepted snapshot job must end (no stuck job) and, when it says `succeeded`, its snapshot must be
`complete` with its manifest in the bucket. Uses the World's bucket (through the fault proxy, faults
off) and sshd (through the relay).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from contextlib import ExitStack
from typing import Any

import requests
import sqlalchemy as sa

from bench.faults.scenarios import Trial
from bench.faults.world import ROOT, TERMINAL, World
from src.migrate import upgrade
from tests.support.fixtures_e2e import TOKEN
from tests.support.services import ensure_postgres, ensure_redis, free_port

PG_ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_DB = 13
STALE_S = 10


class _Cluster:
    def __init__(self, w: World, stack: ExitStack) -> None:
        self.w = w
        self.tmp = w.tmp / "scaleout"
        self.tmp.mkdir()
        self.db_name = f"gpusnap_faults_{uuid.uuid4().hex[:8]}"
        self.admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with self.admin.connect() as conn:
            conn.execute(sa.text(f'CREATE DATABASE "{self.db_name}"'))
        stack.callback(self._drop_db)
        self.redis_url = f"redis://127.0.0.1:6379/{REDIS_DB}"
        import redis

        self.redis = redis.Redis.from_url(self.redis_url)
        self.redis.flushdb()  # our own database index only
        stack.callback(self.redis.flushdb)
        self.env = {
            **os.environ,
            **w.env,
            "DATABASE_URL": PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{self.db_name}",
            "REDIS_URL": self.redis_url,
            "JOB_STALE_AFTER_S": str(STALE_S),
            "GUNICORN_WORKERS": "1",
            "GUNICORN_THREADS": "8",
            "PYTHONPATH": str(ROOT),
        }
        self.env.pop("QUEUE_PATH", None)
        upgrade(self.env["DATABASE_URL"])
        self.apis: list[str] = []
        self.procs: list[subprocess.Popen] = []
        stack.callback(self._stop_all)
        for _ in range(2):
            port = free_port()
            self._spawn(
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
                "api",
            )
            self.apis.append(f"http://127.0.0.1:{port}")
        self.workers = [
            self._spawn([sys.executable, "-m", "src.cli", "worker", "--threads", "2"], "worker") for _ in range(3)
        ]
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {TOKEN}"
        for url in self.apis:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if self.http.get(url + "/healthz", timeout=2).status_code == 200:
                        break
                except requests.RequestException:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"API at {url} did not start")
                time.sleep(0.3)

    def _spawn(self, argv: list[str], name: str) -> subprocess.Popen:
        log = open(self.tmp / f"{name}-{len(self.procs)}.log", "ab")
        proc = subprocess.Popen(
            argv, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.procs.append(proc)
        return proc

    def _stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGCONT)
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=20)
                except (OSError, subprocess.TimeoutExpired):
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

    def _drop_db(self) -> None:
        with self.admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)'))
        self.admin.dispose()

    def post(self, api: int, path: str, body: dict[str, Any], key: str | None = None) -> requests.Response:
        headers = {"Idempotency-Key": key} if key else {}
        return self.http.post(self.apis[api] + path, json=body, headers=headers, timeout=30)

    def get(self, path: str) -> dict[str, Any]:
        return self.http.get(self.apis[0] + path, timeout=10).json()


def _race(calls: list[Any]) -> list[Any]:
    """Run the calls at the same moment (a barrier), one thread each; their results or exceptions."""
    barrier = threading.Barrier(len(calls))
    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = calls[i]()
        except requests.RequestException as exc:
            out[i] = exc
        return None

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def scale_out(w: World, machines: int = 4) -> list[Trial]:
    reason = ensure_postgres() or ensure_redis()
    if reason:
        return [Trial("scale-out", "setup", "skipped", True, True, 0, 0.0, reason)]
    out: list[Trial] = []
    ws = w.workspace(w.name("so-ws"), random_mb=4)
    body = {"ssh_host": "127.0.0.1", "ssh_port": w.relay.port, "workspace_path": str(ws)}
    with ExitStack() as stack:
        c = _Cluster(w, stack)
        jobs: dict[str, str] = {}  # job id -> snapshot id
        for i in range(machines):
            t0 = time.monotonic()
            key = f"dup-{uuid.uuid4().hex}"
            req = {**body, "instance_id": f"so-dup-{i}"}
            answers = _race([lambda a=a: c.post(a, "/api/gpu-snapshots", req, key) for a in (0, 1)])
            codes = [getattr(a, "status_code", type(a).__name__) for a in answers]
            ids = {a.json()["job"]["id"] for a in answers if getattr(a, "status_code", 0) in (200, 201, 202)}
            ok = all(code in (200, 201, 202) for code in codes) and len(ids) == 1
            for a in answers:
                if getattr(a, "status_code", 0) == 202:
                    jobs[a.json()["job"]["id"]] = a.json()["snapshot"]["id"]
            out.append(
                Trial(
                    "scale-out",
                    "dup-idem-key",
                    "/".join(map(str, codes)),
                    ok,
                    True,
                    0,
                    time.monotonic() - t0,
                    f"same_job={len(ids) == 1}",
                )
            )
        for _ in range(machines):
            t0 = time.monotonic()
            req = {**body, "instance_id": f"so-new-{uuid.uuid4().hex[:6]}"}
            answers = _race([lambda a=a: c.post(a % 2, "/api/gpu-snapshots", req) for a in range(5)])
            codes = sorted(getattr(a, "status_code", 0) for a in answers)
            ok = codes.count(202) == 1 and codes.count(409) == 4
            for a in answers:
                if getattr(a, "status_code", 0) == 202:
                    jobs[a.json()["job"]["id"]] = a.json()["snapshot"]["id"]
            out.append(
                Trial("scale-out", "first-requests", "/".join(map(str, codes)), ok, True, 0, time.monotonic() - t0)
            )

        # faults while the jobs run: one worker frozen past the stale limit, one killed and replaced
        time.sleep(2)
        stalled, killed = c.workers[0], c.workers[1]
        os.killpg(stalled.pid, signal.SIGSTOP)
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
        c.workers[1] = c._spawn([sys.executable, "-m", "src.cli", "worker", "--threads", "2"], "worker")
        time.sleep(STALE_S + 15)
        os.killpg(stalled.pid, signal.SIGCONT)

        for job_id, snap_id in jobs.items():
            t0 = time.monotonic()
            deadline = time.monotonic() + 300
            job = c.get(f"/api/jobs/{job_id}")
            while job.get("status") not in TERMINAL and time.monotonic() < deadline:
                time.sleep(0.5)
                job = c.get(f"/api/jobs/{job_id}")
            status = job.get("status") if job.get("status") in TERMINAL else "stuck"
            snap = c.get(f"/api/gpu-snapshots/{snap_id}")
            consistent = status != "succeeded" or (
                snap.get("status") == "complete" and bool(w.keys(snap["storage_prefix"] + "manifest.json"))
            )
            outcome = status if status != "failed" else "failed:" + (job.get("error") or {}).get("code", "?")
            out.append(
                Trial(
                    "scale-out",
                    "snapshot-job",
                    outcome,
                    status == "succeeded",
                    consistent,
                    0,
                    time.monotonic() - t0,
                    f"attempts={job.get('attempts')} snapshot={snap.get('status')}",
                )
            )
        out[-1].orphans = w.orphans()
    return out
