"""Job kinds for tests that run real worker processes (`tests.support.test_worker`). They do nothing
useful; they leave evidence of having run (a line in a file) and can be made slow, cancellable and
resumable, which is what the queue and recovery tests need.

(Named for the brief; pytest collects this module but finds no tests in it.)"""

from __future__ import annotations

import os
import time
from typing import Any

from src.jobs.context import JobContext
from src.jobs.kinds import JobKind


def append_line(path: str, line: str) -> None:
    """One `write` on an O_APPEND descriptor: lines from several processes never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (line.rstrip("\n") + "\n").encode())
    finally:
        os.close(fd)


def _sleep(ctx: JobContext, seconds: float, *, phase: str) -> None:
    """Sleep in small steps, reporting progress and stopping at once when cancelled."""
    total_ms = int(seconds * 1000)
    ctx.progress(phase=phase, bytes_total=total_ms, bytes_done=0)
    started = time.monotonic()
    while True:
        ctx.check_cancelled()
        elapsed_ms = int((time.monotonic() - started) * 1000)
        if elapsed_ms >= total_ms:
            break
        ctx.progress(bytes_done=elapsed_ms)
        time.sleep(min(0.02, (total_ms - elapsed_ms) / 1000))
    ctx.progress(bytes_done=total_ms)


def record(ctx: JobContext) -> dict[str, Any]:
    """params: `path` (file to append "<job_id> <pid> <attempt>" to), optional `sleep` seconds before."""
    if ctx.params.get("sleep"):
        _sleep(ctx, float(ctx.params["sleep"]), phase="waiting")
    append_line(ctx.params["path"], f"{ctx.job_id} {os.getpid()} {ctx.attempt}")
    return {"pid": os.getpid(), "attempt": ctx.attempt}


def sleep(ctx: JobContext) -> dict[str, Any]:
    """params: `seconds` to sleep on the first attempt, `retry_seconds` on later ones (default 0), optional
    `started_path` to append "<job_id> <pid> <attempt>" to when an attempt starts. Each attempt records
    itself in `ctx.state` first, so a re-run can show what the attempt before it had saved."""
    seen = dict(ctx.state)
    ctx.save_state(**{f"attempt_{ctx.attempt}_pid": os.getpid()})
    if ctx.params.get("started_path"):
        append_line(ctx.params["started_path"], f"{ctx.job_id} {os.getpid()} {ctx.attempt}")
    seconds = ctx.params.get("seconds", 1.0) if ctx.attempt == 1 else ctx.params.get("retry_seconds", 0.0)
    _sleep(ctx, float(seconds), phase="sleeping")
    return {"attempt": ctx.attempt, "pid": os.getpid(), "state_seen": seen}


def make_kinds() -> dict[str, JobKind]:
    kinds = [
        JobKind("record", record, rerunnable=True),
        JobKind("sleep", sleep, rerunnable=True),
        JobKind("sleep_once", sleep, rerunnable=False),  # same work, but not safe to re-run
    ]
    return {k.name: k for k in kinds}
