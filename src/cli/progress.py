"""Progress of a job as the CLI shows it: a redrawn bar on a terminal, plain periodic lines otherwise.

The formatting functions are pure (numbers in, text out) so that they are tested without a terminal;
`ProgressDisplay` only decides when to write what, and where."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(n: float | None) -> str:
    """1536 -> '1.5 KiB'. Binary units, because part sizes and disks are powers of two."""
    if n is None:
        return "?"
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            if unit == "B":
                return f"{int(value)} B"
            # Three significant digits at most, so the bar line keeps its length as numbers grow.
            return f"{value:.1f} {unit}" if abs(value) < 100 else f"{value:.0f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float | None) -> str:
    """65 -> '1m05s', 3725 -> '1h02m'; None or absurd values -> '?'."""
    if seconds is None or seconds != seconds or seconds < 0 or seconds > 100 * 86400:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def eta_seconds(done: int | None, total: int | None, rate: float | None) -> float | None:
    """Time left at `rate` bytes/s, or None when any of the three is unknown or the rate is zero."""
    if done is None or not total or not rate or rate <= 0:
        return None
    return max(0.0, (total - done) / rate)


class RateMeter:
    """Bytes per second, smoothed with an exponential moving average so that one slow poll (a part
    finishing late, a GC pause in the worker) does not make the ETA jump around."""

    def __init__(self, alpha: float = 0.3) -> None:
        self.alpha = alpha
        self.rate: float | None = None
        self._last: tuple[float, int] | None = None

    def update(self, now: float, done: int | None) -> float | None:
        if done is None:
            return self.rate
        if self._last is None or done < self._last[1]:
            # First sample, or the count restarted (a new phase counts from zero): start over.
            self._last, self.rate = (now, done), None
            return None
        elapsed = now - self._last[0]
        if elapsed <= 0:
            return self.rate
        instant = (done - self._last[1]) / elapsed
        self.rate = instant if self.rate is None else self.alpha * instant + (1 - self.alpha) * self.rate
        self._last = (now, done)
        return self.rate


def render_bar(fraction: float | None, width: int = 30, tick: int = 0) -> str:
    """`[#######-------]`; an unknown total gives a block that moves with `tick`, always `width` wide."""
    inner = max(width - 2, 3)
    if fraction is None:
        block = "<=>"
        span = inner - len(block)
        pos = tick % (2 * span) if span > 0 else 0
        pos = pos if pos <= span else 2 * span - pos  # bounce back and forth
        return "[" + " " * pos + block + " " * (inner - pos - len(block)) + "]"
    filled = int(round(min(max(fraction, 0.0), 1.0) * inner))
    return "[" + "#" * filled + "-" * (inner - filled) + "]"


def fraction_of(progress: dict[str, Any]) -> float | None:
    """Bytes if the job counts bytes, else parts, else unknown."""
    for done_key, total_key in (("bytes_done", "bytes_total"), ("parts_done", "parts_total")):
        done, total = progress.get(done_key), progress.get(total_key)
        if total:
            return min(max((done or 0) / total, 0.0), 1.0)
    return None


def bytes_pair(done: int, total: int | None) -> str:
    """'1.5/3.0 GiB' when both are in one unit, else '512 MiB/1.0 GiB'."""
    a, b = human_bytes(done), human_bytes(total)
    if " " in a and " " in b and a.split(" ")[1] == b.split(" ")[1]:
        return f"{a.split(' ')[0]}/{b}"
    return f"{a}/{b}"


def progress_fields(job: dict[str, Any], rate: float | None) -> list[str]:
    """The words both renderings share: percent, bytes, parts, rate, ETA (only those that are known)."""
    p = job.get("progress") or {}
    fields: list[str] = []
    fraction = fraction_of(p)
    if fraction is not None:
        fields.append(f"{fraction * 100:3.0f}%")
    if p.get("bytes_total") or p.get("bytes_done"):
        fields.append(bytes_pair(p.get("bytes_done") or 0, p.get("bytes_total")))
    if p.get("parts_total") or p.get("parts_done"):
        fields.append(f"parts {p.get('parts_done') or 0}/{p.get('parts_total') or '?'}")
    if rate is not None:
        fields.append(f"{human_bytes(rate)}/s")
    eta = eta_seconds(p.get("bytes_done"), p.get("bytes_total"), rate)
    if eta is not None:
        fields.append(f"ETA {human_duration(eta)}")
    return fields


def bar_line(job: dict[str, Any], rate: float | None, *, width: int = 80, tick: int = 0) -> str:
    """One terminal line: `phase [####----] 50% 1.5 MiB/3.0 MiB parts 1/2 1.0 MiB/s ETA 2s`. The bar takes
    the room the words leave (10 to 30 columns); on a narrow terminal the parts count goes first."""
    usable = max(width - 1, 10)  # one column spare: writing the last column wraps on some terminals
    label = str(job.get("phase") or job.get("status") or "")
    fields = progress_fields(job, rate)
    fraction = fraction_of(job.get("progress") or {})
    for words in (fields, [f for f in fields if not f.startswith("parts ")]):
        room = usable - len("  ".join([label, *words])) - 2
        if room >= 10:
            return "  ".join([label, render_bar(fraction, min(room, 30), tick), *words])
    return "  ".join([label, render_bar(fraction, 10, tick), *words])[:usable].rstrip()


def plain_line(job: dict[str, Any], rate: float | None, elapsed: float) -> str:
    """One log line for a pipe or a CI log: `[12s] job_x running phase=upload 50% ...`."""
    head = f"[{human_duration(elapsed)}] {job.get('id')} {job.get('status')}"
    if job.get("phase"):
        head += f" phase={job['phase']}"
    return " ".join([head, *progress_fields(job, rate)])


class ProgressDisplay:
    """Shows successive snapshots of one job. On a TTY the line is redrawn in place at every update;
    otherwise a line is written when the status or phase changes, and at most every `plain_every` s."""

    def __init__(
        self,
        stream: TextIO,
        *,
        tty: bool,
        width: int = 80,
        plain_every: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream, self.tty, self.width, self.plain_every = stream, tty, width, plain_every
        self._clock = clock
        self._start = clock()
        self._meter = RateMeter()
        self._tick = 0
        self._last_key: tuple[Any, ...] | None = None
        self._last_plain = float("-inf")
        self._phase: str | None = None
        self._drawn = False

    def update(self, job: dict[str, Any]) -> None:
        now = self._clock()
        if job.get("phase") != self._phase:  # a new phase counts different bytes: its rate starts over
            self._phase, self._meter = job.get("phase"), RateMeter()
        rate = self._meter.update(now, (job.get("progress") or {}).get("bytes_done"))
        if self.tty:
            self._tick += 1
            self.stream.write("\r" + bar_line(job, rate, width=self.width, tick=self._tick).ljust(self.width - 1))
            self._drawn = True
        else:
            key = (job.get("status"), job.get("phase"))
            if key != self._last_key or now - self._last_plain >= self.plain_every:
                self.stream.write(plain_line(job, rate, now - self._start) + "\n")
                self._last_key, self._last_plain = key, now
        self.stream.flush()

    def note(self, text: str) -> None:
        """A message between updates (a lost connection), on its own line."""
        self.close()
        self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        """Leave the terminal on a fresh line after the bar."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


# ---- waiting for a job ---------------------------------------------------------------------------

FINISHED = ("succeeded", "failed", "cancelled")
# How long the API may stay unreachable while we wait (a restart, a deploy) before we give up.
OUTAGE_LIMIT_S = 120.0


class WaitTimeout(Exception):
    """The timeout ran out first; `job` is the last state seen (None if it was never read)."""

    def __init__(self, job: dict[str, Any] | None) -> None:
        super().__init__("timed out")
        self.job = job


def wait_for_job(
    api: Any,
    job_id: str,
    *,
    timeout: float | None,
    interval: float,
    display: ProgressDisplay | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """Follow the job until it has finished and return it: over the event stream (`GET /api/events`) when
    the client and server have it, else by polling `GET /api/jobs/<id>` every `interval`. Raises
    WaitTimeout, or the client's error when it is not transient (404, 401) or the API stays away longer
    than OUTAGE_LIMIT_S."""
    from src.cli.http import ClientError, seg  # here, so that the formatting above imports nothing

    display = display or terminal_display()
    start, outage_since, job = clock(), None, None
    try:
        if hasattr(api, "open_events"):
            from src.cli.stream import StreamDeadline, follow_job_stream

            try:
                streamed = follow_job_stream(
                    api,
                    job_id,
                    display=display,
                    clock=clock,
                    sleep=sleep,
                    deadline=None if timeout is None else start + timeout,
                )
            except StreamDeadline as e:
                raise WaitTimeout(e.job) from None
            if streamed is not None:
                return streamed
        while True:
            try:
                job = api.get(f"/api/jobs/{seg(job_id)}")
                outage_since = None
            except ClientError as e:
                if not e.transient or (outage_since is not None and clock() - outage_since > OUTAGE_LIMIT_S):
                    raise
                if outage_since is None:
                    outage_since = clock()
                    display.note(f"warning: {e.code}: {e.message}; still trying")
            if job is not None:
                display.update(job)
                if job["status"] in FINISHED:
                    return job
            left = None if timeout is None else timeout - (clock() - start)
            if left is not None and left <= 0:
                raise WaitTimeout(job)
            sleep(interval if left is None else min(interval, left))
    finally:
        display.close()


def terminal_display() -> ProgressDisplay:
    """A display on stderr: the bar when stderr is a terminal, plain lines when it is a pipe or a log."""
    stream = sys.stderr
    tty = bool(getattr(stream, "isatty", lambda: False)())
    width = 80
    if tty:
        try:  # the width of stderr's terminal: stdout may be a pipe (`gpusnap ... --json | jq`)
            width = os.get_terminal_size(stream.fileno()).columns or width  # 0 on a pty nobody sized
        except (OSError, ValueError, AttributeError):
            pass
    return ProgressDisplay(stream, tty=tty, width=width)
