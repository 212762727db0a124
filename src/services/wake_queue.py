"""The wake queue: at most WAKE_CONCURRENCY wakes rent and restore at once (0: no limit); the others
wait as queued jobs (phase `wake_queued`), highest `priority` (0-9) first, then oldest first.

A wake job is created waiting (`state.wake_queued_at`) and handed to the workers only once admitted
(`state.admitted_at`). Admission runs when a wake is requested, when a wake ends (its worker admits the
next), and on every scheduler tick (a catch-up after a crash or a cancel). Admissions are serialised
(PostgreSQL: an advisory lock; SQLite: the write that starts the transaction), so two admitters cannot
both take the last free place. A waiting wake that reaches a worker anyway (recovery re-sends queued
jobs that waited long) is put back, unclaimed (`hold_unless_admitted`)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, text, update
from sqlalchemy.orm import Session

from src.db import transaction
from src.models import Job, utcnow
from src.services import jobs as job_service
from src.services.views import iso

if TYPE_CHECKING:
    from src.container import Container

logger = logging.getLogger(__name__)
WAITING_PHASE = "wake_queued"
_ADVISORY_KEY = 0x67707375  # "gpsu": any constant of our own


def mark_waiting(job: Job, *, priority: int) -> None:
    """Called in the transaction that creates a wake job: it waits for admission."""
    job.phase = WAITING_PHASE
    job.state = {**(job.state or {}), "wake_queued_at": iso(utcnow()), "priority": priority}


def is_waiting(state: dict[str, Any]) -> bool:
    return state.get("admitted_at") is None and "wake_queued_at" in state


def admit_wakes(c: Container, *, finishing: str | None = None) -> list[str]:
    """Admit waiting wakes into the free places and enqueue them. `finishing`: a wake job that is ending
    (still running in the database) and so no longer holds its place. Returns the admitted ids."""
    cap = int(c.settings.wake_concurrency)
    with transaction(c.session_factory) as s:
        _serialise(s)
        active = s.scalars(select(Job).where(Job.kind == "wake", Job.status.in_(job_service.ACTIVE))).all()
        waiting = [j for j in active if is_waiting(j.state or {}) and j.status == "queued"]
        holding = [j for j in active if not is_waiting(j.state or {}) and j.id != finishing]
        free = len(waiting) if cap <= 0 else max(0, cap - len(holding))
        waiting.sort(key=lambda j: (-int((j.state or {}).get("priority", 5)), j.id))
        admitted = []
        for job in waiting[:free]:
            job.state = {**(job.state or {}), "admitted_at": iso(utcnow())}
            job.phase = "queued"
            admitted.append(job.id)
    for job_id in admitted:
        c.queue.enqueue(job_id)
    if admitted:
        logger.info("wake queue: admitted %s (WAKE_CONCURRENCY=%s)", ", ".join(admitted), cap or "unlimited")
    return admitted


def hold_unless_admitted(c: Container, job_id: str, *, attempt: int, state: dict[str, Any]) -> bool:
    """For a wake job a worker just claimed: True when it may run. A waiting one is put back as it was
    (queued, its attempt undone) and False is returned: it runs once admitted."""
    if not is_waiting(state):
        return True
    with transaction(c.session_factory) as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "running", Job.attempts == attempt)
            .values(
                status="queued",
                attempts=Job.attempts - 1,
                worker=None,
                started_at=None,
                heartbeat_at=None,
                phase=WAITING_PHASE,
            )
        )
    return False


def _serialise(s: Session) -> None:
    if s.get_bind().dialect.name == "postgresql":
        s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _ADVISORY_KEY})
    else:  # SQLite: a write first takes the database's write lock until commit (reads after it are current)
        s.execute(update(Job).where(Job.id == "").values(phase=None))
