"""A worker process killed mid-job (SIGKILL: no clean-up runs) does not leave its job stuck: the next
worker to start on this host sees the dead pid, and re-queues the job (a kind safe to re-run, which
resumes from its saved state) or fails it with `interrupted`. JOB_STALE_AFTER_S is ten minutes here,
so only the dead-pid check can explain a recovery within the test."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from src.db import transaction
from src.models import Job
from src.services import jobs as job_service
from tests.support.test_worker import WorkerProcess, control_app, worker_env

LOCK = "machine:recovery-test"


class Harness:
    def __init__(self, tmp_path) -> None:  # type: ignore[no-untyped-def]
        self.tmp = tmp_path
        self.env = worker_env(tmp_path, QUEUE_PATH=str(tmp_path / "queue.db"), JOB_STALE_AFTER_S="600")
        self.c = control_app(self.env).extensions["gpusnap"]
        self.workers: list[WorkerProcess] = []

    def worker(self) -> WorkerProcess:
        w = WorkerProcess(self.env, self.tmp, f"worker-{len(self.workers) + 1}").start()
        self.workers.append(w)
        return w

    def submit(self, kind: str, **params: object) -> str:
        with transaction(self.c.session_factory) as s:
            job_id = job_service.add_job(s, kind=kind, params=params, lock_key=LOCK).id
        self.c.queue.enqueue(job_id)
        return job_id

    def job(self, job_id: str) -> Job:
        with self.c.session_factory() as s:
            return s.get(Job, job_id)

    def wait(self, job_id: str, until, timeout: float = 30) -> Job:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while True:
            row = self.job(job_id)
            if until(row):
                return row
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {w.name}\n{w.log_tail()}" for w in self.workers)
                raise AssertionError(f"job {job_id} is {row.status}/{row.phase} after {timeout}s\n{logs}")
            time.sleep(0.05)

    def close(self) -> None:
        for w in self.workers:
            w.stop()
        self.c.engine.dispose()


@pytest.fixture
def harness(tmp_path) -> Iterator[Harness]:  # type: ignore[no-untyped-def]
    h = Harness(tmp_path)
    yield h
    h.close()


def _running_in(h: Harness, job_id: str, worker: WorkerProcess) -> Job:
    row = h.wait(job_id, lambda j: j.status == "running" and j.phase == "sleeping")
    assert row.worker.endswith(f":{worker.pid}") and row.attempts == 1
    return row


def test_killed_worker_job_is_requeued_and_resumes_on_the_next_worker(harness):
    h = harness
    started = h.tmp / "attempts.txt"
    job_id = h.submit("sleep", seconds=30, retry_seconds=0.2, started_path=str(started))
    first = h.worker()
    _running_in(h, job_id, first)

    first.kill()
    stuck = h.job(job_id)
    assert stuck.status == "running" and stuck.lock_key == LOCK  # nobody will finish it by itself

    t0 = time.monotonic()
    second = h.worker()
    row = h.wait(job_id, lambda j: j.status in job_service.FINISHED)
    assert time.monotonic() - t0 < 25  # recovered at worker start, not after a 30 s sleep or a 600 s lease
    assert row.status == "succeeded", (row.error_code, row.error_message, second.log_tail())
    assert row.attempts == 2 and row.worker.endswith(f":{second.pid}") and row.lock_key is None
    assert row.result == {"attempt": 2, "pid": second.pid, "state_seen": {"attempt_1_pid": first.pid}}
    assert row.state == {"attempt_1_pid": first.pid, "attempt_2_pid": second.pid}
    assert started.read_text().split("\n")[:2] == [f"{job_id} {first.pid} 1", f"{job_id} {second.pid} 2"]
    assert "re-queued 1 job(s) left by a stopped worker" in second.log_tail()


def test_killed_worker_job_of_a_kind_not_safe_to_rerun_fails_interrupted(harness):
    h = harness
    started = h.tmp / "attempts.txt"
    job_id = h.submit("sleep_once", seconds=30, started_path=str(started))
    first = h.worker()
    _running_in(h, job_id, first)
    first.kill()

    h.worker()
    row = h.wait(job_id, lambda j: j.status in job_service.FINISHED)
    assert row.status == "failed" and row.error_code == "interrupted" and row.attempts == 1
    assert row.lock_key is None and row.finished_at is not None
    assert started.read_text().splitlines() == [f"{job_id} {first.pid} 1"]  # never started again
