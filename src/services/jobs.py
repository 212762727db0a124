"""Jobs: creating them (with the per-machine lock and idempotency), the worker's claim / heartbeat /
finish steps, cancel, and reads. The runner in `src/jobs` calls the worker-side functions; the API calls
the rest."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from src.db import transaction
from src.errors import Conflict, InvalidRequest, NotFound
from src.models import Job, new_id, utcnow
from src.services.pagination import Page, fetch_page
from src.services.views import job_view

logger = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")
STATUSES = ACTIVE + FINISHED

# Called inside the transaction that finishes a job, so domain rows (a snapshot marked failed, a
# machine's status) change together with the job's status.
OnEnd = Callable[[Session, Job], None]


@dataclass(frozen=True)
class Idempotency:
    key: str
    request_hash: str

    @staticmethod
    def of(key: str | None, *, method: str, path: str, body: Any) -> "Idempotency | None":
        if key is None:
            return None
        if not (1 <= len(key) <= 255) or not key.isprintable():
            raise InvalidRequest("Idempotency-Key must be 1-255 printable characters", code="invalid_header")
        canonical = json.dumps([method, path, body], sort_keys=True, separators=(",", ":"))
        return Idempotency(key, hashlib.sha256(canonical.encode()).hexdigest())


def find_replay(session: Session, idem: Idempotency | None) -> Job | None:
    """The job an earlier request with this Idempotency-Key created, if any.
    Raises Conflict when the key was used for a different request."""
    if idem is None:
        return None
    job = session.scalar(select(Job).where(Job.idempotency_key == idem.key))
    if job is not None and job.request_hash != idem.request_hash:
        raise Conflict("this Idempotency-Key was already used for a different request",
                       code="idempotency_key_reused")
    return job


def add_job(session: Session, *, kind: str, params: dict[str, Any], lock_key: str | None,
            machine_id: str | None = None, snapshot_id: str | None = None,
            idem: Idempotency | None = None) -> Job:
    """Insert a queued job in the caller's transaction. Raises Conflict when another active job holds
    `lock_key`; the unique index on `jobs.lock_key` settles races between concurrent requests."""
    if lock_key is not None:
        holder = session.scalar(select(Job.id).where(Job.lock_key == lock_key))
        if holder is not None:
            raise Conflict(f"another operation ({holder}) is in progress on {lock_key}", code="machine_busy")
    job = Job(id=new_id("job"), kind=kind, status="queued", params=params, state={}, lock_key=lock_key,
              machine_id=machine_id, snapshot_id=snapshot_id,
              idempotency_key=idem.key if idem else None, request_hash=idem.request_hash if idem else None)
    session.add(job)
    try:
        session.flush()
    except IntegrityError as e:
        raise Conflict(f"another operation is in progress on {lock_key}", code="machine_busy") from e
    return job


def get_job(session_factory: sessionmaker[Session], job_id: str) -> dict[str, Any]:
    with transaction(session_factory) as s:
        job = s.get(Job, job_id)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        return job_view(job)


def list_jobs(session_factory: sessionmaker[Session], *, kind: str | None = None, status: str | None = None,
              machine_id: str | None = None, limit: int = 50, cursor: str | None = None) -> Page:
    """Newest first. `cursor` is the `next_cursor` of the previous page."""
    query = select(Job)
    if kind:
        query = query.where(Job.kind == kind)
    if status:
        query = query.where(Job.status == status)
    if machine_id:
        query = query.where(Job.machine_id == machine_id)
    return fetch_page(session_factory, query, id_column=Job.id, limit=limit, cursor=cursor,
                      view=lambda _s, job: job_view(job))


def cancel_job(session_factory: sessionmaker[Session], job_id: str, *, on_end: Callable[[str], OnEnd | None]
               ) -> dict[str, Any]:
    """Cancel a job. A queued job is cancelled at once; a running one is flagged and its runner stops it
    (remote processes included) at the next heartbeat. Cancelling a cancelled job is a no-op; a job that
    already succeeded or failed gives Conflict."""
    with transaction(session_factory) as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        if job.status in ("succeeded", "failed"):
            raise Conflict(f"job {job_id} already {job.status}", code="job_finished")
        if job.status == "queued":
            finish_in_session(s, job, status="cancelled", error=("cancelled", "cancelled before it started"),
                              on_end=on_end(job.kind))
        elif job.status == "running":
            job.cancel_requested = True
        return job_view(job)


# ---- worker side -------------------------------------------------------------------------------


def claim(session_factory: sessionmaker[Session], job_id: str, *, worker: str) -> Job | None:
    """Move a queued job to running, atomically: of two workers given the same id, one wins. Returns the
    claimed row (detached), or None when it was not queued (already taken, cancelled, or finished)."""
    now = utcnow()
    with transaction(session_factory) as s:
        res = s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "queued")
            .values(status="running", attempts=Job.attempts + 1, heartbeat_at=now, worker=worker,
                    started_at=now, cancel_requested=False)
        )
        if res.rowcount != 1:
            return None
        return s.get(Job, job_id)


def heartbeat(session_factory: sessionmaker[Session], job_id: str, *, attempt: int,
              progress: dict[str, Any] | None = None, state: dict[str, Any] | None = None) -> str:
    """Refresh the lease (and write progress/state). Returns "ok", "cancel" when a cancel was requested,
    or "lost" when this attempt no longer owns the job (it was recovered and re-run elsewhere): `attempt`
    is a fencing token, so a stalled worker that wakes up cannot overwrite its successor."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    values.update(progress or {})
    if state is not None:
        values["state"] = state
    with transaction(session_factory) as s:
        res = s.execute(update(Job).where(Job.id == job_id, Job.status == "running", Job.attempts == attempt)
                        .values(**values))
        if res.rowcount != 1:
            return "lost"
        cancel = s.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return "cancel" if cancel else "ok"


def finish(session_factory: sessionmaker[Session], job_id: str, *, attempt: int, status: str,
           result: dict[str, Any] | None = None, error: tuple[str, str] | None = None,
           on_end: OnEnd | None = None) -> bool:
    """End a running job owned by `attempt`. Returns False when this attempt lost the job meanwhile."""
    with transaction(session_factory) as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or job.status != "running" or job.attempts != attempt:
            return False
        finish_in_session(s, job, status=status, result=result, error=error, on_end=on_end)
        return True


def finish_in_session(s: Session, job: Job, *, status: str, result: dict[str, Any] | None = None,
                      error: tuple[str, str] | None = None, on_end: OnEnd | None = None) -> None:
    assert status in FINISHED, status
    job.status = status
    job.finished_at = utcnow()
    job.lock_key = None  # frees the machine for the next operation
    if result is not None:
        job.result = result
    if error is not None:
        job.error_code, job.error_message = error[0], error[1][:4000]
    if on_end is not None:
        on_end(s, job)


def requeue_stale(session_factory: sessionmaker[Session], *, stale_after: dt.timedelta, max_attempts: int,
                  rerunnable: Callable[[str], bool], on_end: Callable[[str], OnEnd | None]) -> list[str]:
    """Recover from dead workers: a running job whose heartbeat is older than `stale_after` is put back
    in the queue when its kind is safe to re-run and attempts remain, else failed with `interrupted`.
    Also returns queued jobs that were never picked up for that long (their enqueue may have been lost).
    Returns the ids to enqueue; safe to run from several workers at once (each row moves only once)."""
    cutoff = utcnow() - stale_after
    to_enqueue: list[str] = []
    with transaction(session_factory) as s:
        stale = s.scalars(select(Job).where(Job.status == "running", Job.heartbeat_at < cutoff)
                          .with_for_update(skip_locked=True)).all()
        for job in stale:
            if rerunnable(job.kind) and job.attempts < max_attempts:
                logger.warning("job %s (%s) lost its worker; re-queued (attempt %d of %d)",
                               job.id, job.kind, job.attempts + 1, max_attempts, extra={"job_id": job.id})
                job.status, job.worker, job.phase = "queued", None, "requeued"
                to_enqueue.append(job.id)
            else:
                logger.warning("job %s (%s) lost its worker; marked failed", job.id, job.kind,
                               extra={"job_id": job.id})
                finish_in_session(s, job, status="failed",
                                  error=("interrupted", "the worker running this job stopped"),
                                  on_end=on_end(job.kind))
        forgotten = s.scalars(select(Job.id).where(Job.status == "queued", Job.created_at < cutoff)).all()
        to_enqueue.extend(j for j in forgotten if j not in to_enqueue)
    return to_enqueue


def expire_dead_local_workers(session_factory: sessionmaker[Session], *, hostname: str,
                              is_alive: Callable[[int], bool]) -> int:
    """Mark the leases of running jobs whose worker process on `hostname` no longer exists as expired,
    so that `requeue_stale` takes them now. Returns how many."""
    expired = 0
    with transaction(session_factory) as s:
        for job in s.scalars(select(Job).where(Job.status == "running", Job.worker.like(f"{hostname}:%"))):
            pid = job.worker.rsplit(":", 1)[1] if job.worker else ""
            if pid.isdigit() and not is_alive(int(pid)):
                job.heartbeat_at = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
                expired += 1
    return expired
