"""The live event stream's records: what the worker and the API write to `events` when a job's status,
phase or progress changes and when something happens to a machine, and how a stream reads them back.

Writing: `install(session_factory)` hooks every flush of the app's sessions, so that a job or machine row
changed through the ORM (a job created, finished or re-queued; a machine's status; a machine history
entry) records its event in the same transaction as the change, whoever's code made it. The two writes
that bypass the ORM (a worker claiming a job, and its progress heartbeats) call `job_claimed` and
`progress_written`. Progress is throttled to one event per `PROGRESS_MIN_INTERVAL_S` per job.

Reading: `Follower` hands out events in id order without losing one that a slower transaction commits
late (see its docstring)."""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, func, inspect, select
from sqlalchemy import event as sa_event
from sqlalchemy.orm import Session, sessionmaker

from src.db import rowcount, transaction
from src.models import Event, Job, Machine, MachineEvent, utcnow
from src.services.views import iso

logger = logging.getLogger(__name__)

JOB_STATUS, JOB_PHASE, JOB_PROGRESS = "job.status", "job.phase", "job.progress"
MACHINE_STATUS, MACHINE_EVENT = "machine.status", "machine.event"
KINDS = (JOB_STATUS, JOB_PHASE, JOB_PROGRESS, MACHINE_STATUS, MACHINE_EVENT)
PROGRESS_MIN_INTERVAL_S = 0.5  # at most 2 progress events a second per job
OLD_HOLE_S = 120.0  # a hole in the ids behind an event older than this (plus the grace) is not waited for
_COUNTERS = ("bytes_done", "bytes_total", "parts_done", "parts_total")


# ---- writing -----------------------------------------------------------------------------------


def install(session_factory: sessionmaker[Session]) -> None:
    """Record events on every flush of sessions made by `session_factory` (idempotent).

    Marked on the factory itself, not asked of `sa_event.contains`: SQLAlchemy's registry keys a
    target by id(), and a factory made after an earlier one was freed can reuse that id and be taken
    for it (measured: 2,195 of 3,000 fresh sessionmakers), so its sessions recorded nothing (two
    tests' apps, one CI run)."""
    if getattr(session_factory, _INSTALLED, False):
        return
    sa_event.listen(session_factory, "before_flush", _before_flush)
    setattr(session_factory, _INSTALLED, True)


_INSTALLED = "_gpusnap_records_events"


def job_payload(job: Job) -> dict[str, Any]:
    """What a job event says about the job: enough for a progress bar and a status badge."""
    return {
        "job": {
            "id": job.id,
            "kind": job.kind,
            "status": job.status,
            "phase": job.phase,
            "progress": {k: getattr(job, k) for k in _COUNTERS},
            "error": {"code": job.error_code, "message": job.error_message or ""} if job.error_code else None,
            "machine_id": job.machine_id,
            "snapshot_id": job.snapshot_id,
        }
    }


def hourly_price(machine: Machine) -> float | None:
    """USD per hour of the instance the machine runs (or ran) on: the rented offer's `dph_total`."""
    return price_or_none((machine.offer or {}).get("dph_total"))


def price_or_none(value: Any) -> float | None:
    """A price from vast.ai's JSON, or None: not a number, negative, NaN or infinite (which `requests`
    parses, and which would make our answers invalid JSON)."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


def _before_flush(session: Session, _context: Any, _instances: Any) -> None:
    for obj in list(session.new):
        if isinstance(obj, Job):
            _add(session, JOB_STATUS, obj.machine_id, obj.id, job_payload(obj))
        elif isinstance(obj, MachineEvent):
            _add(
                session,
                MACHINE_EVENT,
                obj.machine_id,
                obj.job_id,
                {"event": {"kind": obj.kind, "message": obj.message, "data": obj.data}},
            )
    for obj in list(session.dirty):
        if isinstance(obj, Job):
            changed = _changed(obj, ("status", "phase") + _COUNTERS)
            kind = (
                JOB_STATUS
                if "status" in changed
                else JOB_PHASE
                if "phase" in changed
                else (JOB_PROGRESS if changed else None)
            )
            if kind is not None:
                _add(session, kind, obj.machine_id, obj.id, job_payload(obj))
        elif isinstance(obj, Machine):
            history = inspect(obj).attrs.status.history
            if history.added and history.deleted and history.deleted[0] != history.added[0]:
                _add(
                    session,
                    MACHINE_STATUS,
                    obj.id,
                    None,
                    {"from": history.deleted[0], "to": obj.status, "hourly_usd": hourly_price(obj)},
                )


def _changed(obj: Any, names: Iterable[str]) -> set[str]:
    state = inspect(obj)
    out = set()
    for name in names:
        history = state.attrs[name].history
        if history.added and (not history.deleted or history.deleted[0] != history.added[0]):
            out.add(name)
    return out


def _add(session: Session, kind: str, machine_id: str | None, job_id: str | None, data: dict[str, Any]) -> None:
    session.add(Event(kind=kind, machine_id=machine_id, job_id=job_id, data=data, created_at=utcnow()))


def job_claimed(s: Session, job: Job) -> None:
    """A worker moved `job` to running with a plain UPDATE (no flush sees it): record it."""
    _add(s, JOB_STATUS, job.machine_id, job.id, job_payload(job))


@dataclass(frozen=True)
class ProgressBefore:
    phase: str | None
    counters: tuple[Any, ...]


def progress_before(s: Session, job_id: str) -> ProgressBefore | None:
    row = s.execute(select(Job.phase, *(getattr(Job, k) for k in _COUNTERS)).where(Job.id == job_id)).first()
    return None if row is None else ProgressBefore(row[0], tuple(row[1:]))


def progress_written(s: Session, job_id: str, before: ProgressBefore | None) -> None:
    """After a heartbeat's UPDATE wrote progress: a phase change is always recorded, new counters at most
    once per PROGRESS_MIN_INTERVAL_S (the last counters always reach the stream with the job's final
    status event, which carries them)."""
    if before is None:
        return
    job = s.get(Job, job_id, populate_existing=True)
    if job is None:
        return
    if job.phase != before.phase:
        _add(s, JOB_PHASE, job.machine_id, job.id, job_payload(job))
        return
    if tuple(getattr(job, k) for k in _COUNTERS) == before.counters:
        return
    since = utcnow() - dt.timedelta(seconds=PROGRESS_MIN_INTERVAL_S)
    last = s.scalar(select(func.max(Event.created_at)).where(Event.job_id == job_id, Event.kind == JOB_PROGRESS))
    if last is not None and _aware(last) > since:
        return
    _add(s, JOB_PROGRESS, job.machine_id, job.id, job_payload(job))


def _aware(value: dt.datetime) -> dt.datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.timezone.utc)


HIGH_VOLUME_MACHINE_EVENTS = ("idle_sample",)  # one a minute per machine with an idle policy
_PRUNE_BATCH = 2000


def prune_progress(session_factory: sessionmaker[Session], *, older_than_s: float) -> int:
    """Delete the high-volume events older than `older_than_s` seconds: `job.progress` (a job's final
    counters stay in its last `job.status` event) and the idle samples of machines with an idle policy
    (from the machine's history and from the stream; the policy decides from `idle_samples`, not from
    events). Status, phase and the other machine events are kept: costs are computed from
    `machine.status`. Returns how many were deleted. Safe to run from several workers."""
    cutoff = utcnow() - dt.timedelta(seconds=older_than_s)
    with transaction(session_factory) as s:
        deleted = rowcount(s.execute(delete(Event).where(Event.kind == JOB_PROGRESS, Event.created_at < cutoff)))
        deleted += rowcount(
            s.execute(
                delete(MachineEvent).where(
                    MachineEvent.kind.in_(HIGH_VOLUME_MACHINE_EVENTS), MachineEvent.created_at < cutoff
                )
            )
        )
    return deleted + _prune_stream_machine_events(session_factory, cutoff)


def _prune_stream_machine_events(session_factory: sessionmaker[Session], cutoff: dt.datetime) -> int:
    """The stream's copies of those machine events. Their kind sits in the JSON payload, which SQLite and
    Postgres query differently, so the rows are read and filtered here, a batch per transaction."""
    deleted, after = 0, 0
    while True:
        with transaction(session_factory) as s:
            rows = s.execute(
                select(Event.id, Event.data)
                .where(Event.kind == MACHINE_EVENT, Event.created_at < cutoff, Event.id > after)
                .order_by(Event.id)
                .limit(_PRUNE_BATCH)
            ).all()
            if not rows:
                return deleted
            after = rows[-1].id
            doomed = [
                row.id
                for row in rows
                if isinstance(row.data, dict)
                and isinstance(row.data.get("event"), dict)
                and row.data["event"].get("kind") in HIGH_VOLUME_MACHINE_EVENTS
            ]
            if doomed:
                deleted += rowcount(s.execute(delete(Event).where(Event.id.in_(doomed))))


# ---- reading -----------------------------------------------------------------------------------


def event_view(e: Event) -> dict[str, Any]:
    return {
        "id": e.id,
        "kind": e.kind,
        "at": iso(e.created_at),
        "machine_id": e.machine_id,
        "job_id": e.job_id,
        **(e.data or {}),
    }


def latest_id(session_factory: sessionmaker[Session]) -> int:
    with transaction(session_factory) as s:
        return int(s.scalar(select(func.max(Event.id))) or 0)


@dataclass
class EventFilter:
    machine_id: str | None = None
    job_id: str | None = None
    kinds: tuple[str, ...] = ()  # exact kinds (`job.progress`) or families (`job`, `machine`)

    def matches(self, e: Event) -> bool:
        if self.machine_id is not None and e.machine_id != self.machine_id:
            return False
        if self.job_id is not None and e.job_id != self.job_id:
            return False
        return not self.kinds or any(e.kind == k or e.kind.startswith(k + ".") for k in self.kinds)


@dataclass
class Follower:
    """Reads the events after `last_id`, in id order, for one stream.

    Ids come from a sequence, so on PostgreSQL a transaction can take id 10, commit after the one that
    took 11, and a reader that already passed 11 would never see 10. So a hole in the ids is waited for
    (`gap_grace_s`) before it is skipped as an insert that was rolled back; everything after the hole
    waits with it (not when the event after the hole is minutes old: pruned progress leaves such holes,
    and no transaction stays open that long). SQLite writes one transaction at a time, so it has no
    such holes. (A stream opened without a resume point starts after the highest id committed then: an
    event of a transaction still open at that moment with a lower id is not sent to it; a client that
    must not miss one reads the state it follows after opening the stream, as `gpusnap jobs wait` does.)"""

    session_factory: sessionmaker[Session]
    last_id: int
    where: EventFilter = field(default_factory=EventFilter)
    gap_grace_s: float = 5.0
    batch: int = 500
    _gap: tuple[int, float] | None = None  # (first missing id, when it was first seen missing)

    def poll(self) -> list[dict[str, Any]]:
        """The events now readable after `last_id` that match the filter (advances `last_id`)."""
        with transaction(self.session_factory) as s:
            rows = list(s.scalars(select(Event).where(Event.id > self.last_id).order_by(Event.id).limit(self.batch)))
            out: list[dict[str, Any]] = []
            for e in rows:
                if e.id != self.last_id + 1 and not self._hole_expired(self.last_id + 1, e.created_at):
                    break
                self._gap = None
                self.last_id = e.id
                if self.where.matches(e):
                    out.append(event_view(e))
        return out

    def _hole_expired(self, missing: int, next_written: dt.datetime) -> bool:
        # The missing ids were taken before the event after them was written: when that was long ago
        # (more than any clock skew between hosts), no open transaction holds them. They were pruned
        # (old job.progress) or rolled back, and waiting the grace on each would make a resume from an
        # old id crawl, or never get through before the stream's time is up.
        if _aware(next_written) < utcnow() - dt.timedelta(seconds=self.gap_grace_s + OLD_HOLE_S):
            self._gap = None
            return True
        now = time.monotonic()
        if self._gap is None or self._gap[0] != missing:
            self._gap = (missing, now)
        if now - self._gap[1] >= self.gap_grace_s:
            logger.info("event ids from %d were never committed; skipping them", missing)
            return True
        return False
