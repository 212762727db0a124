"""Attacks on GET /api/events and stream tokens that once got through: each test is a finding."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from src.app import create_app
from src.db import transaction
from src.models import Event
from src.services.events import Follower
from tests.support.fixtures_app import AUTH, make_settings
from tests.support.test_kinds import make_kinds


@pytest.fixture
def app(tmp_path, sqlite_url):  # type: ignore[no-untyped-def]
    application = create_app(
        make_settings(tmp_path, sqlite_url, events_poll_s=0.05, events_max_streams=2, events_heartbeat_s=0.3),
        job_kinds=make_kinds(),
        configure_logs=False,
    )
    yield application
    application.extensions["gpusnap"].engine.dispose()


def test_head_requests_do_not_use_up_the_stream_slots(app):
    client = app.test_client()
    for _ in range(5):
        r = client.head("/api/events", headers=AUTH)
        r.close()
    r = client.get("/api/events", headers=AUTH, buffered=False)
    assert r.status_code == 200, r.get_data(as_text=True)
    r.close()


def test_a_stream_token_opens_one_stream_only(app):
    """The token travels in the URL, so access logs (gunicorn's `%(r)s`), proxies and history keep it: a
    copy read from there within its minute must not open another stream (or take the stream slots)."""
    client = app.test_client()
    token = client.post("/api/stream-tokens", headers=AUTH).get_json()["token"]
    first = client.get(f"/api/events?token={token}", buffered=False)
    assert first.status_code == 200
    first.close()
    replay = client.get(f"/api/events?token={token}")
    assert replay.status_code == 401 and replay.get_json()["error"]["code"] == "invalid_stream_token"


def _add_event(app, machine_id: str = "m-1") -> int:  # type: ignore[no-untyped-def]
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        e = Event(kind="machine.event", machine_id=machine_id, data={"event": {"kind": "note", "message": "x"}})
        s.add(e)
        s.flush()
        return int(e.id)


def _first_event(resp, timeout: float = 30) -> dict[str, str]:  # type: ignore[no-untyped-def]
    buffer, deadline = "", time.monotonic() + timeout
    for chunk in resp.response:
        buffer += chunk.decode() if isinstance(chunk, bytes) else chunk
        while "\n\n" in buffer:
            block, buffer = buffer.split("\n\n", 1)
            fields = dict(line.split(": ", 1) for line in block.split("\n") if ": " in line and line[0] != ":")
            if "data" in fields:
                return fields
        assert time.monotonic() < deadline, "no event"
    raise AssertionError("the stream ended")


def test_a_resume_point_beyond_the_log_does_not_silence_the_stream(app):
    """A tab kept its last id across a database restore or a move to another deployment behind the same
    URL: ids it never could have been sent must not hide every event to come."""
    _add_event(app)
    resp = app.test_client().get("/api/events", headers={**AUTH, "Last-Event-ID": "900000"}, buffered=False)
    assert resp.status_code == 200
    new_id = _add_event(app)
    assert _first_event(resp)["id"] == str(new_id)
    resp.close()


def test_holes_left_by_pruned_progress_events_are_not_waited_for(app):
    """Pruning old `job.progress` events leaves holes in the ids. Waiting the grace (5 s) on each one
    made a resume from an old id crawl; a stream filtered to a quiet machine (its Last-Event-ID stays
    old) met the same holes on every reconnect and, past EVENTS_MAX_STREAM_S worth of them, never got
    through to new events at all. A hole behind an event written long ago is no open transaction."""
    sf = app.extensions["gpusnap"].session_factory
    week_ago = dt.datetime.now(dt.timezone.utc) - dt.timedelta(days=8)
    with transaction(sf) as s:
        for event_id in range(1, 40, 2):  # 2, 4, 6, ... were pruned
            s.add(Event(id=event_id, kind="machine.event", machine_id="busy", data={}, created_at=week_ago))
    follower = Follower(sf, 0)
    started = time.monotonic()
    assert [e["id"] for e in follower.poll()] == list(range(1, 40, 2))
    assert time.monotonic() - started < 5


def test_an_empty_last_event_id_is_no_resume_point(app):
    """The SSE format lets a stream reset the id (`id:` with no value) and clients then send it empty;
    it means "no event seen", not a malformed id."""
    r = app.test_client().get("/api/events", headers={**AUTH, "Last-Event-ID": ""}, buffered=False)
    assert r.status_code == 200, r.get_data(as_text=True)
    r.close()
