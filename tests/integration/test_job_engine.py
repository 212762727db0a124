"""The job engine (claim, heartbeat, progress, cancel, failure, recovery, fencing, saved state) with
job kinds defined here, on a real database (SQLite and PostgreSQL) and the real Huey queue. Handlers
run in threads of this process through the same `JobRunner` the worker uses."""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import update

from src.app import create_app
from src.db import make_engine, make_session_factory, transaction
from src.errors import JobFailed
from src.jobs.kinds import JobKind
from src.jobs.runner import JobRunner
from src.models import Job
from src.services import jobs as job_service
from tests.support.fixtures_app import AUTH, make_settings, run_jobs

LOCK = "machine:engine-test"


class Gate:
    """Lets a test meet a handler mid-run: the handler says it `reached` a point and waits for `release`."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()
        self.notes: list[Any] = []

    def meet(self, timeout: float = 10) -> None:
        self.reached.set()
        assert self.release.wait(timeout), "the test never released the handler"


GATES: dict[str, Gate] = {}
ENDED: list[tuple[str, str]] = []  # (job id, status) seen by the `on_end` hook


def _gate(ctx) -> Gate:  # type: ignore[no-untyped-def]
    return GATES[ctx.params["gate"]]


def progress_kind(ctx):  # type: ignore[no-untyped-def]
    gate = _gate(ctx)
    ctx.progress(phase="copying", bytes_total=100, bytes_done=40, parts_total=4, parts_done=1)
    gate.meet()
    ctx.progress(bytes_done=70)  # same phase, within the write interval: written by the next heartbeat
    gate.notes.append("throttled")
    deadline = time.monotonic() + 10
    while "continue" not in gate.notes and time.monotonic() < deadline:
        time.sleep(0.01)
    ctx.progress(phase="finishing", bytes_done=100, parts_done=4)
    return {"copied": 100}


def loop_until_cancelled(ctx):  # type: ignore[no-untyped-def]
    gate = _gate(ctx)
    gate.reached.set()
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            ctx.check_cancelled()
            time.sleep(0.01)
    except Exception as e:
        gate.notes.append(type(e).__name__)
        raise
    return {"never": "cancelled"}


def fail_on_purpose(ctx):  # type: ignore[no-untyped-def]
    raise JobFailed("the workspace disk is full (3 GB free, 9 GB needed)", code="disk_full")


def crash(ctx):  # type: ignore[no-untyped-def]
    raise RuntimeError("secret-detail: connection to 10.0.0.7 failed with password hunter2")


def resumable(ctx):  # type: ignore[no-untyped-def]
    """First attempt: saves a step, then stalls (its worker is 'lost'). Later attempts see the step."""
    gate = _gate(ctx)
    gate.notes.append(("attempt", ctx.attempt, dict(ctx.state)))
    if ctx.attempt == 1:
        ctx.save_state(uploaded_parts=[0, 1, 2], manifest=False)
        gate.meet()
        ctx.save_state(manifest=True, by="stale attempt")  # the job was taken over: this must not land
        return {"by": "stale attempt"}
    ctx.save_state(manifest=True, by=f"attempt {ctx.attempt}")
    return {"resumed_from": ctx.params.get("marker"), "state_seen": gate.notes[-1][2]}


EXECUTIONS: list[str] = []
_EXEC_LOCK = threading.Lock()


def count_execution(ctx):  # type: ignore[no-untyped-def]
    with _EXEC_LOCK:
        EXECUTIONS.append(ctx.job_id)
    time.sleep(0.05)  # long enough for the other runner to try too
    return {}


def quick(ctx):  # type: ignore[no-untyped-def]
    return {"attempt": ctx.attempt}


def _on_end(s, job: Job) -> None:  # type: ignore[no-untyped-def]
    ENDED.append((job.id, job.status))


KINDS = {
    k.name: k
    for k in [
        JobKind("progress", progress_kind, on_end=_on_end),
        JobKind("loop", loop_until_cancelled, on_end=_on_end),
        JobKind("fail", fail_on_purpose, on_end=_on_end),
        JobKind("crash", crash, on_end=_on_end),
        JobKind("resumable", resumable, rerunnable=True),
        JobKind("count", count_execution),
        JobKind("rerun", quick, rerunnable=True, on_end=_on_end),
        JobKind("once", quick, rerunnable=False, on_end=_on_end),
    ]
}


@pytest.fixture
def app(tmp_path, database_url):  # type: ignore[no-untyped-def]
    application = create_app(make_settings(tmp_path, database_url), job_kinds=KINDS, configure_logs=False)
    GATES.clear()
    ENDED.clear()
    EXECUTIONS.clear()
    yield application
    for gate in GATES.values():
        gate.release.set()
    application.extensions["gpusnap"].engine.dispose()


@pytest.fixture
def other_session(database_url):  # type: ignore[no-untyped-def]
    """A second engine: what another process (the API, a dashboard) would see."""
    engine = make_engine(database_url)
    factory = make_session_factory(engine)

    def read(job_id: str) -> Job:
        with factory() as s:
            return s.get(Job, job_id)

    yield read
    engine.dispose()


def _c(app):  # type: ignore[no-untyped-def]
    return app.extensions["gpusnap"]


def _add(
    app,
    kind: str,
    *,
    lock_key: str | None = LOCK,
    gate: str | None = None,  # type: ignore[no-untyped-def]
    **params: Any,
) -> str:
    if gate is not None:
        GATES[gate] = Gate()
        params["gate"] = gate
    with transaction(_c(app).session_factory) as s:
        return job_service.add_job(s, kind=kind, params=params, lock_key=lock_key, machine_id="engine-test").id


def _in_thread(target: Callable[[], None]) -> threading.Thread:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def _wait_for(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def _lock_is_free(app) -> bool:  # type: ignore[no-untyped-def]
    with transaction(_c(app).session_factory) as s:
        job_service.add_job(s, kind="rerun", params={}, lock_key=LOCK)  # raises Conflict while held
        s.rollback()
    return True


def _age(app, job_id: str, **values: Any) -> None:  # type: ignore[no-untyped-def]
    with transaction(_c(app).session_factory) as s:
        s.execute(update(Job).where(Job.id == job_id).values(**values))


def _requeue_stale(app) -> list[str]:  # type: ignore[no-untyped-def]
    """What recovery does to jobs whose heartbeat is over a minute old, every kind counted as rerunnable."""
    c = _c(app)
    return job_service.requeue_stale(
        c.session_factory,
        stale_after=dt.timedelta(seconds=60),
        max_attempts=c.settings.job_max_attempts,
        rerunnable=lambda k: True,
        on_end=lambda k: None,
    )


OLD = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)


# ---- progress, cancel, failures ----------------------------------------------------------------


def test_progress_is_visible_from_another_session_while_the_job_runs(app, other_session):
    job_id = _add(app, "progress", gate="g")
    gate = GATES["g"]
    thread = _in_thread(lambda: JobRunner(_c(app)).run(job_id))
    assert gate.reached.wait(5)

    row = other_session(job_id)
    assert row.status == "running" and row.attempts == 1 and row.phase == "copying"
    assert (row.bytes_done, row.bytes_total, row.parts_done, row.parts_total) == (40, 100, 1, 4)
    assert row.worker and row.worker.endswith(f":{os.getpid()}") and row.heartbeat_at is not None
    first_beat = row.heartbeat_at

    gate.release.set()
    # A throttled counter update reaches the database with the next heartbeat (every 0.2 s here).
    _wait_for(lambda: other_session(job_id).bytes_done == 70)
    assert other_session(job_id).heartbeat_at > first_beat
    gate.notes.append("continue")
    thread.join(10)
    assert not thread.is_alive()

    row = other_session(job_id)
    assert row.status == "succeeded" and row.phase == "finishing" and row.bytes_done == 100 and row.parts_done == 4
    assert row.result == {"copied": 100} and row.lock_key is None and row.finished_at is not None
    assert ENDED == [(job_id, "succeeded")]


def test_cancel_of_a_running_job_stops_its_handler_and_frees_the_lock(app, other_session):
    job_id = _add(app, "loop", gate="g")
    thread = _in_thread(lambda: JobRunner(_c(app)).run(job_id))
    assert GATES["g"].reached.wait(5)

    client = app.test_client()
    r = client.post(f"/api/jobs/{job_id}/cancel", headers=AUTH)
    assert r.status_code == 202
    assert r.get_json()["status"] == "running" and r.get_json()["cancel_requested"] is True

    thread.join(5)
    assert not thread.is_alive(), "the handler did not stop after cancel"
    assert GATES["g"].notes == ["JobCancelled"]
    row = other_session(job_id)
    assert row.status == "cancelled" and row.error_code == "cancelled" and row.lock_key is None
    assert ENDED == [(job_id, "cancelled")]
    assert _lock_is_free(app)
    job = client.get(f"/api/jobs/{job_id}", headers=AUTH).get_json()
    assert job["status"] == "cancelled" and job["error"]["code"] == "cancelled"


def test_handler_raising_job_failed_fails_the_job_with_its_code(app, other_session):
    job_id = _add(app, "fail")
    JobRunner(_c(app)).run(job_id)
    row = other_session(job_id)
    assert row.status == "failed" and row.error_code == "disk_full"
    assert row.error_message == "the workspace disk is full (3 GB free, 9 GB needed)"
    assert row.lock_key is None and row.result is None
    assert ENDED == [(job_id, "failed")]
    assert _lock_is_free(app)


def test_unexpected_exception_fails_as_internal_without_traceback_or_details(app, other_session, caplog):
    job_id = _add(app, "crash")
    with caplog.at_level("ERROR"):
        JobRunner(_c(app)).run(job_id)
    row = other_session(job_id)
    assert row.status == "failed" and row.error_code == "internal"
    for leak in ("Traceback", "RuntimeError", "secret-detail", "hunter2", 'File "'):
        assert leak not in row.error_message
    assert job_id in row.error_message
    body = app.test_client().get(f"/api/jobs/{job_id}", headers=AUTH).get_data(as_text=True)
    assert "hunter2" not in body and "Traceback" not in body
    assert any("hunter2" in (r.exc_text or "") or r.exc_info for r in caplog.records)  # the worker log has it
    assert ENDED == [(job_id, "failed")]


def test_job_of_an_unknown_kind_fails_cleanly(app, other_session):
    with transaction(_c(app).session_factory) as s:
        job_id = job_service.add_job(s, kind="from_the_future", params={}, lock_key=LOCK).id
    JobRunner(_c(app)).run(job_id)
    row = other_session(job_id)
    assert row.status == "failed" and row.error_code == "unknown_kind" and row.lock_key is None


# ---- recovery of jobs whose worker died --------------------------------------------------------


def test_recovery_requeues_rerunnable_and_fails_the_rest(app, other_session):
    c = _c(app)
    rerun = _add(app, "rerun", lock_key="machine:r1")
    once = _add(app, "once", lock_key="machine:o1")
    exhausted = _add(app, "rerun", lock_key="machine:x1")
    alive = _add(app, "rerun", lock_key="machine:a1")
    forgotten = _add(app, "rerun", lock_key="machine:f1")
    for job_id in (rerun, once, exhausted, alive):
        assert job_service.claim(c.session_factory, job_id, worker="dead-host:1") is not None
    for job_id in (rerun, once, exhausted):
        _age(app, job_id, heartbeat_at=OLD)
    _age(app, exhausted, attempts=c.settings.job_max_attempts)
    _age(app, forgotten, created_at=OLD)  # queued long ago; its enqueue was lost
    run_jobs(app)  # drop what add_job's callers would have enqueued: nothing was (direct inserts)

    ids = c.queue.recover_stale_jobs()
    assert sorted(ids) == sorted([rerun, forgotten])

    row = other_session(rerun)
    assert row.status == "queued" and row.phase == "requeued" and row.worker is None
    assert row.lock_key == "machine:r1"  # still held: nobody else may touch the machine meanwhile
    for job_id in (once, exhausted):
        row = other_session(job_id)
        assert row.status == "failed" and row.error_code == "interrupted" and row.lock_key is None, job_id
    assert other_session(alive).status == "running"
    assert sorted(ENDED) == sorted([(once, "failed"), (exhausted, "failed")])

    # Recovery put the ids back in the real queue: draining it runs them, as a worker would.
    assert run_jobs(app) == 2
    row = other_session(rerun)
    assert row.status == "succeeded" and row.attempts == 2 and row.result == {"attempt": 2}
    assert other_session(forgotten).status == "succeeded"
    assert c.queue.recover_stale_jobs() == []  # nothing moves twice


def test_recovery_with_max_attempts_left_then_exhausted(app, other_session):
    c = _c(app)
    job_id = _add(app, "rerun")
    for attempt in range(1, c.settings.job_max_attempts + 1):
        assert job_service.claim(c.session_factory, job_id, worker="dead-host:1").attempts == attempt
        _age(app, job_id, heartbeat_at=OLD)
        ids = _requeue_stale(app)
        if attempt < c.settings.job_max_attempts:
            assert ids == [job_id] and other_session(job_id).status == "queued"
    row = other_session(job_id)
    assert row.status == "failed" and row.error_code == "interrupted" and row.attempts == 3


# ---- fencing: a stale attempt cannot overwrite its successor -----------------------------------


def test_stale_attempt_heartbeat_and_finish_are_refused_after_takeover(app, other_session):
    sf = _c(app).session_factory
    job_id = _add(app, "rerun")
    first = job_service.claim(sf, job_id, worker="host-a:1")
    assert first.attempts == 1
    _age(app, job_id, heartbeat_at=OLD)
    assert _requeue_stale(app) == [job_id]
    assert job_service.heartbeat(sf, job_id, attempt=1, progress={"phase": "stale"}) == "lost"  # while queued
    second = job_service.claim(sf, job_id, worker="host-b:2")
    assert second.attempts == 2
    assert job_service.claim(sf, job_id, worker="host-c:3") is None  # only one claim wins

    assert (
        job_service.heartbeat(
            sf, job_id, attempt=1, progress={"phase": "stale", "bytes_done": 1}, state={"by": "stale"}
        )
        == "lost"
    )
    assert job_service.heartbeat(sf, job_id, attempt=2, progress={"phase": "current", "bytes_done": 5}) == "ok"
    assert job_service.finish(sf, job_id, attempt=1, status="succeeded", result={"by": "stale"}) is False
    row = other_session(job_id)
    assert (row.status, row.attempts, row.worker, row.phase, row.bytes_done) == ("running", 2, "host-b:2", "current", 5)
    assert row.result is None and row.state == {} and row.lock_key == LOCK

    assert job_service.finish(sf, job_id, attempt=2, status="succeeded", result={"by": "current"}) is True
    assert job_service.finish(sf, job_id, attempt=2, status="failed", error=("x", "y")) is False
    row = other_session(job_id)
    assert row.status == "succeeded" and row.result == {"by": "current"} and row.lock_key is None


def test_saved_state_survives_takeover_and_the_stale_attempt_is_fenced_off(app, other_session):
    c = _c(app)
    job_id = _add(app, "resumable", gate="g", marker="m-1")
    gate = GATES["g"]
    first = _in_thread(lambda: JobRunner(c).run(job_id))
    assert gate.reached.wait(5)
    row = other_session(job_id)
    assert row.state == {"uploaded_parts": [0, 1, 2], "manifest": False}  # save_state writes at once

    # Its worker is presumed dead (the lease is stale); recovery hands the job to another runner.
    _age(app, job_id, heartbeat_at=OLD)
    assert _requeue_stale(app) == [job_id]
    JobRunner(c).run(job_id)
    row = other_session(job_id)
    assert row.status == "succeeded" and row.attempts == 2
    assert row.result == {"resumed_from": "m-1", "state_seen": {"uploaded_parts": [0, 1, 2], "manifest": False}}
    assert row.state == {"uploaded_parts": [0, 1, 2], "manifest": True, "by": "attempt 2"}

    gate.release.set()  # the first attempt wakes up and tries to write
    first.join(10)
    assert not first.is_alive()
    row = other_session(job_id)
    assert row.status == "succeeded" and row.result["resumed_from"] == "m-1" and row.state["by"] == "attempt 2"
    assert [n[1] for n in gate.notes] == [1, 2]


# ---- claim races --------------------------------------------------------------------------------


def test_two_runners_racing_on_the_same_job_execute_it_exactly_once(app, other_session):
    c = _c(app)
    job_ids = [_add(app, "count", lock_key=None) for _ in range(8)]
    for job_id in job_ids:
        barrier = threading.Barrier(2)

        def race(job_id: str = job_id, barrier: threading.Barrier = barrier) -> None:
            runner = JobRunner(c)
            barrier.wait(5)
            runner.run(job_id)

        threads = [_in_thread(race), _in_thread(race)]
        for t in threads:
            t.join(20)
            assert not t.is_alive()
    assert sorted(EXECUTIONS) == sorted(job_ids)
    for job_id in job_ids:
        row = other_session(job_id)
        assert row.status == "succeeded" and row.attempts == 1
