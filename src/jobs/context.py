"""What a job handler gets: its parameters, a place to record steps done, progress reporting, cancel."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy.orm import Session

from src.db import transaction
from src.errors import JobCancelled, JobFailed
from src.models import utcnow
from src.services import jobs as job_service

if TYPE_CHECKING:
    from src.container import Container
    from src.models import Job

logger = logging.getLogger(__name__)

_PROGRESS_FIELDS = ("phase", "bytes_done", "bytes_total", "parts_done", "parts_total")
T = TypeVar("T")


class JobLost(Exception):
    """This attempt no longer owns the job (it was recovered and handed to another worker)."""


class JobContext:
    """Handed to a job kind's `run`. Progress writes are throttled to one per `min_write_interval_s`
    (a snapshot emits several progress events a second); steps saved with `save_state` are written at once,
    because a re-run after a crash resumes from them."""

    def __init__(self, *, container: Container, job: Job, min_write_interval_s: float = 1.0) -> None:
        self.container = container
        self.job_id = job.id
        self.kind = job.kind
        self.params: dict[str, Any] = dict(job.params or {})
        self.state: dict[str, Any] = dict(job.state or {})
        self.attempt = job.attempts
        self.machine_id = job.machine_id
        self.snapshot_id = job.snapshot_id
        self.cancel_event = threading.Event()
        self.lost = False
        # The kind's overall deadline, per attempt. Past it the heartbeat sets `timed_out` and the
        # cancel event, so the job stops the way a cancel stops it (remote scripts killed, rentals
        # cleaned up) and the runner records `remote_timeout`.
        self.deadline_s = container.settings.job_deadline_s(job.kind)
        self.deadline_at = time.monotonic() + self.deadline_s
        self.timed_out = False
        self._lock = threading.Lock()
        self._pending: dict[str, Any] = {}
        self._last_write = 0.0
        self._min_interval = min_write_interval_s

    @property
    def settings(self):  # type: ignore[no-untyped-def]
        return self.container.settings

    def progress(self, **fields: Any) -> None:
        """Record progress (`phase`, `bytes_done`, `bytes_total`, `parts_done`, `parts_total`). A new phase
        is written at once; byte counters at most once per interval."""
        unknown = set(fields) - set(_PROGRESS_FIELDS)
        if unknown:
            raise TypeError(f"unknown progress fields {sorted(unknown)}")
        with self._lock:
            phase_changed = "phase" in fields and fields["phase"] != self._pending.get("phase")
            self._pending.update({k: v for k, v in fields.items() if v is not None or k == "phase"})
        if phase_changed or time.monotonic() - self._last_write >= self._min_interval:
            self.flush()

    def save_state(self, **updates: Any) -> None:
        """Merge `updates` into the job's step record and write it now."""
        with self._lock:
            self.state.update(updates)
        self.flush(with_state=True)

    def check_cancelled(self) -> None:
        if self.cancel_event.is_set():
            if self.lost:
                raise JobLost(self.job_id)
            if self.timed_out:
                raise JobFailed(self.deadline_message(), code="remote_timeout")
            raise JobCancelled("the job was cancelled")

    def sleep(self, seconds: float) -> None:
        """Wait `seconds`, or less: a cancel (or losing the job) noticed meanwhile raises at once."""
        self.check_cancelled()
        if self.cancel_event.wait(max(0.0, seconds)):
            self.check_cancelled()

    def result(self, future: Future[T], *, poll_s: float = 0.2) -> T:
        """`future.result()`, but a cancel noticed while it runs raises at once (the work itself, a
        read-only request, is left to end by itself)."""
        while True:
            try:
                return future.result(timeout=poll_s)
            except FutureTimeout:
                self.check_cancelled()

    @contextmanager
    def owned(self, *, no_return: str | None = None, **state_updates: Any) -> Iterator[Session]:
        """A transaction that writes only while this attempt owns the job: it starts with a fenced write
        of the job row (`job_service.fence`) that holds the row until commit, so a recovered job's stale
        attempt can never overwrite what its successor wrote. Raises JobLost otherwise.

        `no_return` (a step name) marks the job's point of no return in the same write, and only when no
        cancel was requested (else JobCancelled, nothing written): from then on a cancel answers 409
        `too_late_to_cancel`. Use it right before an action that cannot be undone. `state_updates` are
        merged into `ctx.state` in the same write."""
        with self._lock:
            state = {**self.state, **state_updates}
        first = no_return is not None and job_service.NO_RETURN not in state
        if first:
            state[job_service.NO_RETURN] = {"step": no_return, "attempt": self.attempt, "at": utcnow().isoformat()}
        write_state = state if (state_updates or first) else None
        with transaction(self.container.session_factory) as s:
            verdict = job_service.fence(
                s, self.job_id, attempt=self.attempt, state=write_state, refuse_if_cancelled=first
            )
            if verdict == "cancel":
                self.cancel_event.set()
                raise JobCancelled("the job was cancelled")
            if verdict == "lost":
                self._mark_lost()
            yield s
        if write_state is not None:
            with self._lock:
                self.state = write_state

    def point_of_no_return(self, step: str, **state_updates: Any) -> None:
        """Right before an action that cannot be undone: raise JobCancelled if a cancel was accepted (the
        database is asked, not the heartbeat's last answer), JobLost if another attempt owns the job; else
        record that the job is past its point of no return (with `state_updates`), after which a cancel
        is refused. Idempotent for a re-run that reaches the same step."""
        with self.owned(no_return=step, **state_updates):
            pass

    def ensure_owner(self) -> None:
        """Raise JobLost unless this attempt still owns the job. Called right before an external action
        (rent, destroy): a worker that was frozen past its lease must not act for its successor."""
        with self.owned():
            pass

    def _mark_lost(self) -> None:
        self.lost = True
        self.cancel_event.set()
        raise JobLost(self.job_id)

    def check_deadline(self) -> None:
        """Called by the heartbeat: past the deadline, stop the job like a cancel would."""
        if not self.timed_out and time.monotonic() >= self.deadline_at:
            logger.warning(
                "job %s (%s) ran past its deadline of %gs; stopping it",
                self.job_id,
                self.kind,
                self.deadline_s,
                extra={"job_id": self.job_id},
            )
            self.timed_out = True
            self.cancel_event.set()

    def deadline_message(self) -> str:
        return f"the {self.kind} job ran past its deadline of {self.deadline_s:g}s and was stopped"

    def flush(self, *, with_state: bool = False) -> None:
        """Write pending progress (and the heartbeat). Called by handlers through `progress`, and by the
        heartbeat thread every few seconds."""
        with self._lock:
            progress = dict(self._pending)
            state = dict(self.state) if with_state else None
            verdict = job_service.heartbeat(
                self.container.session_factory, self.job_id, attempt=self.attempt, progress=progress, state=state
            )
            self._last_write = time.monotonic()
        if verdict == "cancel":
            self.cancel_event.set()
        elif verdict == "lost":
            if with_state:
                self._mark_lost()
            self.lost = True
            self.cancel_event.set()


class Heartbeat:
    """Refreshes the job's lease every `interval_s` while the handler runs, and notices cancel requests."""

    def __init__(self, ctx: JobContext, interval_s: float) -> None:
        self._ctx = ctx
        self._interval = interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{ctx.job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=self._interval + 5)

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            self._ctx.check_deadline()
            try:
                self._ctx.flush()
            except Exception:  # a DB hiccup must not kill the heartbeat; the next beat tries again
                logger.warning(
                    "heartbeat write failed for job %s",
                    self._ctx.job_id,
                    exc_info=True,
                    extra={"job_id": self._ctx.job_id},
                )
