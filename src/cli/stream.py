"""`gpusnap jobs wait` over the live event stream (`GET /api/events?job_id=`): progress as it happens, not
at the next poll. Used when the server has the stream; when it has not (an older server, 404), refuses
it (503 `too_many_streams`) or the stream breaks and cannot be reopened, the caller falls back to polling.
A stream that ends (servers close them every EVENTS_MAX_STREAM_S) is reopened after its last event id."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import requests

from src.cli.http import ClientError, seg

READ_TIMEOUT_S = 45.0  # the server sends a heartbeat every EVENTS_HEARTBEAT_S (15 s by default)
FINISHED = ("succeeded", "failed", "cancelled")
RETRY_S = 2.0  # the server's `retry: 2000`: a stream that ended at once is not reopened sooner


class StreamDeadline(Exception):
    """The deadline passed while following the stream; `job` is the last state seen."""

    def __init__(self, job: dict[str, Any] | None) -> None:
        super().__init__("timed out")
        self.job = job


def sse_events(resp: requests.Response) -> Iterator[tuple[str | None, dict[str, Any]]]:
    """(id, data) of each event of an SSE body, as it arrives. Comments (heartbeats) are skipped."""
    event_id: str | None = None
    data: list[str] = []
    for raw in resp.iter_lines(decode_unicode=True):
        line = raw if isinstance(raw, str) else raw.decode("utf-8", "replace")  # typed bytes | str
        if line == "":
            if data:
                try:
                    yield event_id, json.loads("\n".join(data))
                except ValueError:
                    pass  # not one of ours: skip it rather than stop following the job
            event_id, data = None, []
        elif line.startswith(":"):
            continue
        else:
            name, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if name == "id":
                event_id = value
            elif name == "data":
                data.append(value)


def follow_job_stream(
    api: Any,
    job_id: str,
    *,
    display: Any,
    deadline: float | None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any] | None:
    """The finished job, followed over the event stream; None when the stream is not to be had (the caller
    then polls). `display.update(job)` is called with each new state. Raises StreamDeadline at `deadline`
    (a `clock()` value), and the client's error when the job itself cannot be read (404, 401)."""
    last_id: str | None = None
    job: dict[str, Any] | None = None
    pause = 0.0
    while True:
        if pause:  # the last stream ended at once, with nothing in it (a proxy cutting it): do not hammer
            sleep(pause if deadline is None else max(0.0, min(pause, deadline - clock())))
        left = None if deadline is None else deadline - clock()
        if left is not None and left <= 0:
            raise StreamDeadline(job)
        try:
            resp = api.open_events(
                {"job_id": job_id},
                last_event_id=last_id,
                read_timeout=READ_TIMEOUT_S if left is None else max(0.5, min(READ_TIMEOUT_S, left)),
            )
        except ClientError:
            return None
        opened_at, delivered = clock(), False
        try:
            if last_id is None:  # opened before this read, so no change can fall between the two
                job = api.get(f"/api/jobs/{seg(job_id)}")
                display.update(job)
                if job["status"] in FINISHED:
                    return job
            for event_id, data in sse_events(resp):
                delivered = True
                last_id = event_id or last_id
                if isinstance(data.get("job"), dict) and data["job"].get("id") == job_id:
                    job = {**(job or {}), **data["job"]}
                    display.update(job)
                    if job["status"] in FINISHED:
                        return api.get(f"/api/jobs/{seg(job_id)}")  # the whole job: result, timestamps
                if deadline is not None and clock() >= deadline:
                    raise StreamDeadline(job)
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError):
            if deadline is not None and clock() >= deadline:
                raise StreamDeadline(job) from None
            continue  # the stream dropped or went quiet: reopen it after the last event seen
        finally:
            resp.close()
            pause = 0.0 if delivered or clock() - opened_at >= RETRY_S else RETRY_S
