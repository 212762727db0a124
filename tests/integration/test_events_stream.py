"""GET /api/events and POST /api/stream-tokens on a real database (SQLite and PostgreSQL), with jobs run
by the same JobRunner the worker uses: a job's events arrive in order, a reconnect with Last-Event-ID
resumes without losing or repeating one, progress is throttled, stream tokens expire and open nothing
else, and the number of open streams is bounded."""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import select, update

from src.app import create_app
from src.db import transaction
from src.models import Event, StreamToken
from src.services import jobs as job_service
from src.services.events import Follower
from tests.support.fixtures_app import AUTH, make_settings, run_jobs
from tests.support.test_kinds import make_kinds


@pytest.fixture
def app(tmp_path, database_url):  # type: ignore[no-untyped-def]
    application = create_app(
        make_settings(tmp_path, database_url, events_poll_s=0.05, events_max_streams=2, events_heartbeat_s=0.3),
        job_kinds=make_kinds(),
        configure_logs=False,
    )
    yield application
    application.extensions["gpusnap"].engine.dispose()


def _start_sleep_job(app, seconds: float, machine_id: str = "ev-1") -> str:  # type: ignore[no-untyped-def]
    c = app.extensions["gpusnap"]
    with transaction(c.session_factory) as s:
        job_id = job_service.add_job(
            s, kind="sleep", params={"seconds": seconds}, lock_key=f"machine:{machine_id}", machine_id=machine_id
        ).id
    c.queue.enqueue(job_id)
    return job_id


def frames(resp) -> Iterator[dict[str, Any]]:  # type: ignore[no-untyped-def]
    """Parse an SSE body as it arrives: yields {"id", "event", "data"} per event, {"comment": ...} per comment."""
    buffer = ""
    for chunk in resp.response:
        buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            out: dict[str, Any] = {}
            for line in block.split("\n"):
                if line.startswith(":"):
                    out.setdefault("comment", line[1:].strip())
                    continue
                name, _, value = line.partition(": ")
                out[name] = value
            if "data" in out:
                out["data"] = json.loads(out["data"])
            yield out


def read_until(resp, stop, *, timeout: float = 60) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    for frame in frames(resp):
        if "data" in frame:
            got.append(frame)
            if stop(frame):
                return got
        assert time.monotonic() < deadline, f"no stop event within {timeout}s: {[f['event'] for f in got]}"
    raise AssertionError(f"the stream ended early: {[f['event'] for f in got]}")


def _finished(frame: dict[str, Any]) -> bool:
    return frame["event"] == "job.status" and frame["data"]["job"]["status"] in ("succeeded", "failed", "cancelled")


def test_a_jobs_events_arrive_in_order_and_a_reconnect_resumes_without_loss_or_repeat(app):
    client = app.test_client()
    job_id = _start_sleep_job(app, 1.6)
    runner = threading.Thread(target=run_jobs, args=(app,), daemon=True)
    runner.start()
    resp = client.get(f"/api/events?job_id={job_id}&last_event_id=0", headers=AUTH, buffered=False)
    assert resp.status_code == 200 and resp.mimetype == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache"
    events = read_until(resp, _finished)
    resp.close()
    runner.join(30)

    ids = [int(f["id"]) for f in events]
    assert ids == sorted(set(ids)), ids
    assert all(f["data"]["id"] == int(f["id"]) and f["data"]["kind"] == f["event"] for f in events)
    statuses = [f["data"]["job"]["status"] for f in events if f["event"] == "job.status"]
    assert statuses == ["queued", "running", "succeeded"], statuses
    kinds = [f["event"] for f in events]
    assert kinds.index("job.phase") < kinds.index("job.progress") < len(kinds) - 1
    assert events[kinds.index("job.phase")]["data"]["job"]["phase"] == "sleeping"
    done = [f["data"]["job"]["progress"]["bytes_done"] for f in events if f["event"] == "job.progress"]
    assert len(done) >= 2 and done == sorted(done), done  # it moved, forwards
    # Throttled: the sleep kind reports every 20 ms; the stream carries at most 2 a second.
    stamps = [
        dt.datetime.fromisoformat(f["data"]["at"].replace("Z", "+00:00"))
        for f in events
        if f["event"] == "job.progress"
    ]
    assert all((b - a).total_seconds() >= 0.5 for a, b in zip(stamps, stamps[1:])), stamps
    assert events[-1]["data"]["job"]["progress"]["bytes_done"] == 1600

    # Reconnect after the 3rd event, as EventSource does (Last-Event-ID header): exactly the rest.
    again = client.get(
        f"/api/events?job_id={job_id}", headers={**AUTH, "Last-Event-ID": events[2]["id"]}, buffered=False
    )
    rest = read_until(again, _finished)
    again.close()
    assert [f["id"] for f in rest] == [f["id"] for f in events[3:]]
    assert [f["data"] for f in rest] == [f["data"] for f in events[3:]]


def test_filters_by_machine_and_kind_and_a_fresh_stream_starts_with_the_next_event(app):
    client = app.test_client()
    first = _start_sleep_job(app, 0.1, machine_id="ev-a")
    run_jobs(app)
    resp = client.get("/api/events?machine_id=ev-b&kind=job.status", headers=AUTH, buffered=False)
    second = _start_sleep_job(app, 0.1, machine_id="ev-b")
    _start_sleep_job(app, 0.1, machine_id="ev-c")
    threading.Thread(target=run_jobs, args=(app,), daemon=True).start()
    got = read_until(resp, _finished)
    resp.close()
    assert {f["data"]["job"]["id"] for f in got} == {second} != {first}
    assert [f["event"] for f in got] == ["job.status"] * 3
    assert all(f["data"]["machine_id"] == "ev-b" for f in got)


def test_bad_resume_points_and_filters_are_refused(app):
    client = app.test_client()
    r = client.get("/api/events", headers={**AUTH, "Last-Event-ID": "12abc"})
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_header"
    r = client.get("/api/events?kind=snapshot", headers=AUTH)
    assert r.status_code == 400 and r.get_json()["error"]["code"] == "invalid_query"
    r = client.get("/api/events")
    assert r.status_code == 401


def test_stream_tokens_open_the_stream_only_and_expire(app):
    client = app.test_client()
    assert client.post("/api/stream-tokens").status_code == 401
    r = client.post("/api/stream-tokens", headers=AUTH)
    assert r.status_code == 201, r.get_data(as_text=True)
    body = r.get_json()
    token = body["token"]
    assert body["scope"] == "events" and body["expires_in"] == 60 and token.startswith("gst_")

    stream = client.get(f"/api/events?token={token}", buffered=False)
    assert stream.status_code == 200
    assert next(frames(stream)).get("comment", "").startswith("stream open")
    stream.close()

    # Anywhere else it is no token at all: not as a bearer token, not as ?token=, not to mint another.
    bearer = {"Authorization": f"Bearer {token}"}
    for method, path in [
        ("GET", "/api/jobs"),
        ("GET", "/api/summary"),
        ("POST", "/api/stream-tokens"),
        ("GET", f"/api/jobs?token={token}"),
        ("GET", f"/api/instances?token={token}"),
    ]:
        r = client.open(path, method=method, headers=bearer)
        assert r.status_code == 401 and r.get_json()["error"]["code"] == "invalid_token", (method, path)
        r = client.open(path, method=method)
        assert r.status_code == 401, (method, path)
    r = client.get("/api/events", headers=bearer)  # a stream token is not a bearer token even here
    assert r.status_code == 401

    c = app.extensions["gpusnap"]
    with transaction(c.session_factory) as s:  # a minute passes
        s.execute(update(StreamToken).values(expires_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=1)))
    r = client.get(f"/api/events?token={token}")
    assert r.status_code == 401 and r.get_json()["error"]["code"] == "invalid_stream_token"
    assert r.headers["WWW-Authenticate"].startswith("Bearer")
    r = client.get("/api/events?token=gst_madeup")
    assert r.status_code == 401 and r.get_json()["error"]["code"] == "invalid_stream_token"


def test_open_streams_are_bounded_per_process_and_a_closed_one_frees_its_slot(app):
    client = app.test_client()
    open_ = [client.get("/api/events", headers=AUTH, buffered=False) for _ in range(2)]
    for resp in open_:
        assert resp.status_code == 200
        next(frames(resp))
    r = client.get("/api/events", headers=AUTH)
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "too_many_streams"
    # A quiet stream still talks: heartbeats every EVENTS_HEARTBEAT_S.
    assert any(f.get("comment") == "keep-alive" for f, _ in zip(frames(open_[0]), range(3)))
    open_[0].close()
    third = client.get("/api/events", headers=AUTH, buffered=False)
    assert third.status_code == 200
    third.close()
    open_[1].close()


def test_a_stream_ends_after_its_maximum_life(tmp_path, sqlite_url):
    app = create_app(
        make_settings(tmp_path, sqlite_url, events_poll_s=0.05, events_max_stream_s=0.5), configure_logs=False
    )
    started = time.monotonic()
    body = app.test_client().get("/api/events", headers=AUTH).get_data(as_text=True)  # returns: it ended
    assert body.startswith("retry: 2000\n") and time.monotonic() - started < 10
    app.extensions["gpusnap"].engine.dispose()


def _insert_event(session_factory, kind: str = "machine.event") -> None:  # type: ignore[no-untyped-def]
    with transaction(session_factory) as s:
        s.add(Event(kind=kind, machine_id="gap", data={}))


def test_a_late_commit_is_waited_for_not_skipped(tmp_path, database_url):
    """PostgreSQL hands out ids at insert: a transaction that took id N can commit after the one that took
    N+1. A stream must not pass N+1 before N is committed (it would never send N)."""
    if database_url.startswith("sqlite"):
        pytest.skip("SQLite runs one write transaction at a time: ids commit in order")
    app = create_app(make_settings(tmp_path, database_url), configure_logs=False)
    sf = app.extensions["gpusnap"].session_factory
    _insert_event(sf)
    follower = Follower(sf, 0, gap_grace_s=30)
    assert [e["id"] for e in follower.poll()] == [1]
    slow = sf()
    slow.add(Event(kind="machine.event", machine_id="gap", data={"n": 2}))
    slow.flush()  # holds id 2, not committed
    _insert_event(sf)  # id 3, committed
    assert follower.poll() == []  # 3 waits for 2
    slow.commit()
    slow.close()
    assert [e["id"] for e in follower.poll()] == [2, 3]
    app.extensions["gpusnap"].engine.dispose()


def test_a_hole_left_by_a_rollback_is_passed_after_the_grace(tmp_path, database_url):
    app = create_app(make_settings(tmp_path, database_url), configure_logs=False)
    sf = app.extensions["gpusnap"].session_factory
    _insert_event(sf)
    with transaction(sf) as s:  # an id that will never be committed: the insert is rolled back
        s.add(Event(id=2, kind="machine.event", machine_id="gap", data={}))
        s.flush()
        s.rollback()
    with transaction(sf) as s:
        s.add(Event(id=3, kind="machine.event", machine_id="gap", data={}))
    follower = Follower(sf, 1, gap_grace_s=0.3)
    assert follower.poll() == []
    deadline = time.monotonic() + 10
    got: list[int] = []
    while not got and time.monotonic() < deadline:
        time.sleep(0.1)
        got = [e["id"] for e in follower.poll()]
    assert got == [3]
    app.extensions["gpusnap"].engine.dispose()


def test_old_progress_events_are_pruned_and_the_rest_kept(app):
    c = app.extensions["gpusnap"]
    job_id = _start_sleep_job(app, 0.8)
    run_jobs(app)
    with transaction(c.session_factory) as s:
        kinds = [k for (k,) in s.execute(select(Event.kind).order_by(Event.id))]
    assert "job.progress" in kinds
    assert c.queue.prune_events() == 0  # nothing is a week old
    with transaction(c.session_factory) as s:  # a week and a bit passes
        s.execute(update(Event).values(created_at=dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=8)))
    assert c.queue.prune_events() == kinds.count("job.progress")
    with transaction(c.session_factory) as s:
        left = [k for (k,) in s.execute(select(Event.kind).order_by(Event.id))]
    assert left == [k for k in kinds if k != "job.progress"]
    resp = app.test_client().get(f"/api/events?job_id={job_id}&last_event_id=0", headers=AUTH, buffered=False)
    assert [f["data"]["job"]["status"] for f in read_until(resp, _finished)][-1] == "succeeded"
    resp.close()


def test_old_idle_samples_are_pruned_from_history_and_stream_and_other_machine_events_kept(app):
    """An idle policy samples its machine every minute: 1,440 history entries a day per machine. Once a
    week old they go, from the machine's history and from the stream; other machine events stay."""
    from src.jobs.idle_probe import record
    from src.models import MachineEvent
    from src.services.idle import Sample
    from src.services.machines import add_event, ensure_machine

    c = app.extensions["gpusnap"]
    now = dt.datetime.now(dt.timezone.utc)
    with transaction(c.session_factory) as s:
        ensure_machine(s, machine_id="idle-1", host="127.0.0.1", port=22, user="root")
    for _ in range(3):
        record(c, "idle-1", Sample(taken_at=now, ok=True, gpu_util=[0], ssh_sessions=0))
    with transaction(c.session_factory) as s:
        add_event(s, "idle-1", "hibernated", "hibernated to snap_x")
        s.execute(update(Event).values(created_at=now - dt.timedelta(days=8)))
        s.execute(update(MachineEvent).values(created_at=now - dt.timedelta(days=8)))
    record(c, "idle-1", Sample(taken_at=now, ok=True, gpu_util=[0], ssh_sessions=0))  # a fresh one stays

    assert c.queue.prune_events() == 6  # three old samples, each in the history and in the stream
    with transaction(c.session_factory) as s:
        history = [k for (k,) in s.execute(select(MachineEvent.kind).order_by(MachineEvent.id))]
        stream = [e["event"]["kind"] for (e,) in s.execute(select(Event.data).where(Event.kind == "machine.event"))]
    assert history == ["registered", "hibernated", "idle_sample"]
    assert stream == ["registered", "hibernated", "idle_sample"]
    assert c.queue.prune_events() == 0
