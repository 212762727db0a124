"""Fencing and the point of no return, over a real database (SQLite and PostgreSQL): an accepted cancel
is final, a cancel after the point of no return is refused, and an attempt that lost its job (recovered
and handed to another worker) writes nothing. Jobs are claimed and driven through `JobContext` the way
the runner does, so every interleaving is exact instead of timed."""

from __future__ import annotations

import datetime as dt

import pytest

from src.db import transaction
from src.errors import JobCancelled
from src.jobs.context import JobContext, JobLost
from src.jobs.rows import set_machine, set_snapshot
from src.models import Job, Machine, Snapshot
from src.services import jobs as job_service
from tests.support.fixtures_app import AUTH


def _started(client, app, instance_id: str = "4242") -> JobContext:  # type: ignore[no-untyped-def]
    """A create_snapshot job made through the API and claimed by a worker (attempt 1)."""
    body = {"instance_id": instance_id, "ssh_host": "10.1.2.3", "ssh_port": 2222, "workspace_path": "/workspace"}
    r = client.post("/api/gpu-snapshots", json=body, headers=AUTH)
    assert r.status_code == 202, r.get_json()
    c = app.extensions["gpusnap"]
    job = job_service.claim(c.session_factory, r.get_json()["job"]["id"], worker="test:1")
    assert job is not None
    return JobContext(container=c, job=job)


def _row(app, job_id: str) -> Job:  # type: ignore[no-untyped-def]
    with app.extensions["gpusnap"].session_factory() as s:
        return s.get(Job, job_id)


def _machine(app, machine_id: str) -> Machine:  # type: ignore[no-untyped-def]
    with app.extensions["gpusnap"].session_factory() as s:
        return s.get(Machine, machine_id)


def _requeue_all_running(app) -> list[str]:  # type: ignore[no-untyped-def]
    """Recovery, as if every running job's lease had run out."""
    c = app.extensions["gpusnap"]
    return job_service.requeue_stale(
        c.session_factory,
        stale_after=dt.timedelta(seconds=-60),
        max_attempts=3,
        rerunnable=lambda _k: True,
        on_end=lambda k: c.job_kinds[k].on_end,
    )


def test_a_cancel_accepted_before_the_point_of_no_return_is_final(client, app):
    ctx = _started(client, app)
    r = client.post(f"/api/jobs/{ctx.job_id}/cancel", headers=AUTH)
    assert r.status_code == 202 and r.get_json()["cancel_requested"] is True
    # The handler has not noticed yet (no heartbeat ran): the point of no return asks the database.
    assert not ctx.cancel_event.is_set()
    with pytest.raises(JobCancelled):
        ctx.point_of_no_return("destroy", destroying=77)
    row = _row(app, ctx.job_id)
    assert job_service.NO_RETURN not in row.state and "destroying" not in row.state
    # Even a handler that then returns success ends cancelled: the 202 was not a lie.
    assert (
        job_service.finish(
            app.extensions["gpusnap"].session_factory, ctx.job_id, attempt=1, status="succeeded", result={"done": True}
        )
        is True
    )
    row = _row(app, ctx.job_id)
    assert (row.status, row.error_code, row.result, row.lock_key) == ("cancelled", "cancelled", {"done": True}, None)


def test_a_cancel_after_the_point_of_no_return_is_409_and_the_job_finishes(client, app):
    ctx = _started(client, app)
    ctx.point_of_no_return("destroy", destroying=77)
    assert ctx.state["destroying"] == 77 and ctx.state[job_service.NO_RETURN]["step"] == "destroy"
    r = client.post(f"/api/jobs/{ctx.job_id}/cancel", headers=AUTH)
    assert r.status_code == 409, r.get_json()
    assert r.get_json()["error"]["code"] == "too_late_to_cancel"
    assert "destroy" in r.get_json()["error"]["message"]
    row = _row(app, ctx.job_id)
    assert row.cancel_requested is False and row.state["destroying"] == 77  # the refused cancel left no trace
    ctx.point_of_no_return("destroy")  # a re-run reaching the same step again: allowed, nothing changes
    ctx.save_state(destroyed=True)  # later saves keep the mark (ctx.state carries it)
    assert job_service.NO_RETURN in _row(app, ctx.job_id).state
    assert (
        job_service.finish(
            app.extensions["gpusnap"].session_factory, ctx.job_id, attempt=1, status="succeeded", result={}
        )
        is True
    )
    assert _row(app, ctx.job_id).status == "succeeded"


def test_cancel_of_unknown_queued_and_finished_jobs_keeps_its_answers(client, app):
    assert client.post("/api/jobs/job_nope/cancel", headers=AUTH).status_code == 404
    body = {"instance_id": "q1", "ssh_host": "10.1.2.3", "ssh_port": 22, "workspace_path": "/w"}
    job_id = client.post("/api/gpu-snapshots", json=body, headers=AUTH).get_json()["job"]["id"]
    r = client.post(f"/api/jobs/{job_id}/cancel", headers=AUTH)
    assert r.status_code == 202 and r.get_json()["status"] == "cancelled"
    assert client.post(f"/api/jobs/{job_id}/cancel", headers=AUTH).status_code == 202  # no-op
    # A queued job cancelled is never claimed.
    assert job_service.claim(app.extensions["gpusnap"].session_factory, job_id, worker="w:1") is None


def test_an_attempt_that_lost_its_job_writes_nothing(client, app):
    stale = _started(client, app, "fenced")
    assert _requeue_all_running(app) == [stale.job_id]
    c = app.extensions["gpusnap"]
    successor = JobContext(container=c, job=job_service.claim(c.session_factory, stale.job_id, worker="test:2"))
    assert successor.attempt == 2

    set_machine(successor, "fenced", status="running", ssh_host="10.9.9.9", event=("instance_ready", "new"))
    before = _machine(app, "fenced")
    with pytest.raises(JobLost):
        set_machine(stale, "fenced", status="hibernated", ssh_host=None, event=("woke", "stale"))
    with pytest.raises(JobLost):
        set_snapshot(stale, successor.snapshot_id, status="failed")
    with pytest.raises(JobLost):
        stale.ensure_owner()
    with pytest.raises(JobLost):
        stale.point_of_no_return("destroy")
    with pytest.raises(JobLost):
        stale.save_state(destroying=1)
    assert stale.lost and stale.cancel_event.is_set()
    after = _machine(app, "fenced")
    assert (after.status, after.ssh_host, after.updated_at) == ("running", "10.9.9.9", before.updated_at)
    with c.session_factory() as s:
        assert s.get(Snapshot, successor.snapshot_id).status == "pending"
    row = _row(app, stale.job_id)
    assert row.attempts == 2 and "destroying" not in row.state and job_service.NO_RETURN not in row.state
    assert job_service.finish(c.session_factory, stale.job_id, attempt=1, status="failed", error=("x", "y")) is False
    assert job_service.finish(c.session_factory, stale.job_id, attempt=2, status="succeeded", result={}) is True


def test_a_job_cancelled_while_its_worker_was_gone_is_not_run_again(client, app):
    ctx = _started(client, app, "gone")
    assert client.post(f"/api/jobs/{ctx.job_id}/cancel", headers=AUTH).status_code == 202
    assert _requeue_all_running(app) == []
    row = _row(app, ctx.job_id)
    assert (row.status, row.error_code, row.lock_key) == ("cancelled", "cancelled", None)
    with app.extensions["gpusnap"].session_factory() as s:
        assert s.get(Snapshot, ctx.snapshot_id).status == "failed"  # create_snapshot's end hook ran


def test_recovery_leaves_a_job_whose_worker_heartbeated_since_it_was_read(client, app):
    """The stale-row read and the re-queue are separate statements; a heartbeat in between wins."""
    ctx = _started(client, app, "alive")
    c = app.extensions["gpusnap"]
    with transaction(c.session_factory) as s:
        s.get(Job, ctx.job_id).heartbeat_at = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
    ids = job_service.requeue_stale(
        c.session_factory,
        stale_after=dt.timedelta(days=365 * 20),
        max_attempts=3,
        rerunnable=lambda _k: True,
        on_end=lambda _k: None,
    )
    assert ids == [ctx.job_id]  # stale: re-queued
    ctx2 = JobContext(container=c, job=job_service.claim(c.session_factory, ctx.job_id, worker="w:2"))
    ctx2.flush()  # a fresh heartbeat
    assert (
        job_service.requeue_stale(
            c.session_factory,
            stale_after=dt.timedelta(days=365 * 20),
            max_attempts=3,
            rerunnable=lambda _k: True,
            on_end=lambda _k: None,
        )
        == []
    )
    assert _row(app, ctx.job_id).status == "running"


def test_a_requeued_job_past_its_point_of_no_return_cannot_be_cancelled_either(client, app):
    ctx = _started(client, app, "requeued")
    ctx.point_of_no_return("destroy", destroying=5)
    assert _requeue_all_running(app) == [ctx.job_id]  # its worker died after the destroy was sent
    r = client.post(f"/api/jobs/{ctx.job_id}/cancel", headers=AUTH)
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "too_late_to_cancel"
    row = _row(app, ctx.job_id)
    assert row.status == "queued" and row.cancel_requested is False  # the next attempt finishes the destroy
