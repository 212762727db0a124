"""The Redis job queue with two real worker processes sharing it (and one SQLite database file):
every job runs exactly once, even when its id is in the queue twice."""

from __future__ import annotations

import collections
import time

import pytest
import redis
from sqlalchemy import select

from src.db import transaction
from src.models import Job
from src.services import jobs as job_service
from tests.support.services import ensure_redis
from tests.support.test_worker import WorkerProcess, control_app, worker_env

pytestmark = pytest.mark.redis

REDIS_DB = 14  # a database index of our own, flushed before and after
JOBS = 30


@pytest.fixture
def redis_url():  # type: ignore[no-untyped-def]
    reason = ensure_redis()
    if reason:
        pytest.skip(f"REDIS TESTS SKIPPED: {reason}")
    url = f"redis://127.0.0.1:6379/{REDIS_DB}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()
    client.close()


def test_two_worker_processes_share_the_redis_queue_and_run_each_job_once(tmp_path, redis_url):
    env = worker_env(tmp_path, REDIS_URL=redis_url)
    workers = [WorkerProcess(env, tmp_path, f"worker-{i}").start() for i in (1, 2)]
    c = control_app(env).extensions["gpusnap"]
    try:
        for w in workers:
            w.wait_ready()
        record_file = tmp_path / "executions.txt"
        with transaction(c.session_factory) as s:
            ids = [
                job_service.add_job(s, kind="record", params={"path": str(record_file), "sleep": 0.1}, lock_key=None).id
                for _ in range(JOBS)
            ]
        for job_id in ids + ids:  # each id twice: a duplicate delivery must not run a job again
            c.queue.enqueue(job_id)

        deadline = time.monotonic() + 60
        while True:
            with transaction(c.session_factory) as s:
                rows = {j.id: j for j in s.scalars(select(Job))}
            if all(j.status in job_service.FINISHED for j in rows.values()):
                break
            assert time.monotonic() < deadline, "\n".join(w.log_tail() for w in workers)
            time.sleep(0.1)
        # Give duplicate deliveries still in flight time to be (not) executed.
        _wait_queue_empty(c.queue.huey)
        time.sleep(0.3)

        assert {j.status for j in rows.values()} == {"succeeded"}, "\n".join(w.log_tail() for w in workers)
        assert all(j.attempts == 1 for j in rows.values())
        lines = [line.split() for line in record_file.read_text().splitlines()]
        runs = collections.Counter(job_id for job_id, _pid, _attempt in lines)
        assert sorted(runs) == sorted(ids) and set(runs.values()) == {1}, runs
        pids = {int(pid) for _job, pid, _attempt in lines}
        assert pids == {w.pid for w in workers}, "both worker processes should have taken jobs from the queue"
        for job_id, pid, _attempt in lines:
            assert rows[job_id].result == {"pid": int(pid), "attempt": 1}
            assert rows[job_id].worker.endswith(f":{pid}")
    finally:
        for w in workers:
            w.stop()
        c.engine.dispose()


def _wait_queue_empty(huey, timeout: float = 10) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while huey.pending_count() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert huey.pending_count() == 0
