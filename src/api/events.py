"""/api/events (Server-Sent Events) and /api/stream-tokens: live job and machine events for dashboards.

A stream reads the `events` table (`src.services.events.Follower`), so any API process serves any
client and a reconnect resumes after its `Last-Event-ID`. Each open stream holds one server thread for
its whole life: at most EVENTS_MAX_STREAMS are open per process (more get 503 `too_many_streams`), and
each ends after EVENTS_MAX_STREAM_S, when EventSource reconnects by itself."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, request

from src.api import schemas as m
from src.api import schemas_events as ev
from src.api.common import container, ok
from src.api.routing import route
from src.errors import GpusnapError, InvalidRequest
from src.services import events as service
from src.services.stream_tokens import create_stream_token

logger = logging.getLogger(__name__)
bp = Blueprint("events", __name__)
TAG = "events"
MIN_WRITE_TIMEOUT_S = 10.0


class TooManyStreams(GpusnapError):
    code = "too_many_streams"
    http_status = 503


def _slots() -> threading.BoundedSemaphore:
    """This process's stream slots (one per app: tests build several apps in one process)."""
    slots = current_app.extensions.get("gpusnap.stream_slots")
    if slots is None:
        slots = current_app.extensions.setdefault(
            "gpusnap.stream_slots", threading.BoundedSemaphore(container().settings.events_max_streams)
        )
    return slots


@route(
    bp,
    "/api/stream-tokens",
    "POST",
    tag=TAG,
    summary="A short-lived token that may only open the event stream",
    body=m.EmptyRequest,
    body_optional=True,
    responses={201: ev.StreamTokenResponse},
    description="For a browser's EventSource, which cannot send `Authorization`: open "
    "`/api/events?token=<token>` within `expires_in` seconds (STREAM_TOKEN_TTL_S); it opens one "
    "stream. The token is refused by every other endpoint.",
)
def create_token(body: m.EmptyRequest) -> Response:
    return ok(create_stream_token(container().session_factory, ttl_s=container().settings.stream_token_ttl_s), 201)


@route(
    bp,
    "/api/events",
    "GET",
    tag=TAG,
    summary="Live job and machine events (Server-Sent Events)",
    query=m.EventsQuery,
    responses={200: ev.StreamEvent, 503: m.ErrorResponse},
    content_type="text/event-stream",
    stream_token=True,
    description="`text/event-stream`. Each event has `id:` (a number that only grows), `event:` (its kind: "
    "`job.status`, `job.phase`, `job.progress` (at most 2 a second per job), `machine.status`, "
    "`machine.event`) and one `data:` line of JSON (the StreamEvent schema). Send `Last-Event-ID` "
    "(or `last_event_id`) to resume after an event (an id past the newest resumes after the "
    "newest); without it the stream starts with the next event. A comment line every "
    "EVENTS_HEARTBEAT_S keeps proxies from closing a quiet stream; "
    "the stream ends after EVENTS_MAX_STREAM_S and EventSource reconnects by itself. Bearer "
    "token, or `token` from POST /api/stream-tokens. 503 `too_many_streams` when this process "
    "already serves EVENTS_MAX_STREAMS streams.",
)
def stream_events(query: m.EventsQuery) -> Response:
    c = container()
    after = _resume_point(query.last_event_id)
    slots = _slots()
    if not slots.acquire(blocking=False):
        raise TooManyStreams(
            f"this server process already serves {c.settings.events_max_streams} event streams; try again shortly"
        )
    try:
        latest = service.latest_id(c.session_factory)
        # A resume point past every committed id was not sent by this log (a database restored or
        # replaced behind the same URL): following it would hide every event until ids caught up.
        start = latest if after is None else min(after, latest)
        follower = service.Follower(
            c.session_factory,
            start,
            service.EventFilter(
                machine_id=query.machine_id,
                job_id=query.job_id,
                kinds=tuple(k for k in (query.kind or "").split(",") if k),
            ),
        )
    except BaseException:
        slots.release()
        raise
    sock = request.environ.get("gunicorn.socket")
    if sock is not None:
        # gunicorn writes on a blocking socket with no timeout: a client that stops reading (a frozen tab,
        # a hostile script) would hold this thread and slot as long as it keeps the connection, since
        # EVENTS_MAX_STREAM_S is only looked at between writes. A write that cannot go out for two
        # heartbeats now fails, and the stream ends. (gunicorn resets the socket for its next request.)
        sock.settimeout(max(MIN_WRITE_TIMEOUT_S, 2 * c.settings.events_heartbeat_s))
    slot = _Slot(slots)
    resp = Response(_frames(follower, c.settings, slot), mimetype="text/event-stream")
    # Also on close: a body that is never read (HEAD, a client gone before the first write) never runs
    # the generator's `finally`, and its slot would be lost for the life of the process.
    resp.call_on_close(slot.release)
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"  # nginx: pass each event on at once
    return resp


def _resume_point(from_query: int | None) -> int | None:
    header = request.headers.get("Last-Event-ID")
    if not header:  # absent, or empty: SSE clients send the id an `id:` with no value reset to ""
        return from_query
    if not (header.isascii() and header.isdigit()) or len(header) > 18:
        raise InvalidRequest("Last-Event-ID must be an event id this stream sent", code="invalid_header")
    return int(header)


class _Slot:
    """One stream's hold on a slot, given back exactly once (by the generator or the response's close)."""

    def __init__(self, slots: threading.BoundedSemaphore) -> None:
        self._slots, self._lock, self._held = slots, threading.Lock(), True

    def release(self) -> None:
        with self._lock:
            if self._held:
                self._held = False
                self._slots.release()


def _frames(follower: service.Follower, settings: Any, slot: _Slot) -> Iterator[str]:
    """The stream's text. The slot is given back when the client goes (the server closes this generator
    when a write fails: at the latest one heartbeat after the client left) or the stream's time is up."""
    try:
        yield f"retry: 2000\n: stream open, after event {follower.last_id}\n\n"
        ends = time.monotonic() + settings.events_max_stream_s
        beat = time.monotonic() + settings.events_heartbeat_s
        while time.monotonic() < ends:
            sent = False
            for e in follower.poll():
                yield f"id: {e['id']}\nevent: {e['kind']}\ndata: {json.dumps(e, separators=(',', ':'))}\n\n"
                sent = True
            now = time.monotonic()
            if now >= beat:
                yield ": keep-alive\n\n"
                beat = now + settings.events_heartbeat_s
            if not sent:
                time.sleep(settings.events_poll_s)
    finally:
        slot.release()
