"""Jobs: creating them (with the per-machine lock and idempotency), the worker's claim / heartbeat /
finish steps, cancel, and reads. The runner in `src/jobs` calls the worker-side functions; the API calls
the rest."""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from src.db import rowcount, transaction
from src.errors import Conflict, InvalidRequest, NotFound, storable
from src.models import Job, new_id, utcnow
from src.services import events
from src.services.pagination import Page, fetch_page
from src.services.views import job_view

logger = logging.getLogger(__name__)

ACTIVE = ("queued", "running")
FINISHED = ("succeeded", "failed", "cancelled")
STATUSES = ACTIVE + FINISHED

# Called inside the transaction that finishes a job, so domain rows (a snapshot marked failed, a
# machine's status) change together with the job's status.
OnEnd = Callable[[Session, Job], None]

# Key in `jobs.state` set (by `JobContext.owned(no_return=...)`) when a job is about to take an action that
# cannot be undone (hibernate's destroy, wake's hand-over, pause's stop, resume's start). From then on a cancel is refused with
# 409 `too_late_to_cancel`; before it, an accepted cancel is final.
NO_RETURN = "no_return"
T = TypeVar("T")


@dataclass(frozen=True)
class Idempotency:
    key: str
    request_hash: str

    @staticmethod
    def of(key: str | None, *, method: str, path: str, body: Any) -> Idempotency | None:
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
        raise Conflict("this Idempotency-Key was already used for a different request", code="idempotency_key_reused")
    return job


def settle_idempotency_race(replay: Callable[[Session, Job], T]) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Decorate a service that starts a job (first argument the container, keyword `idem`). Two requests
    with the same Idempotency-Key and body that arrive together both miss `find_replay`; the one that
    commits second then fails on a unique index (the key itself, the machine lock, the machine row) or
    finds the machine busy. It answers with the winner's job (`replay(session, job)`), as a replay one
    second later would. Without a key, or when no job carries it, the Conflict stands; a bare
    IntegrityError (a concurrent request won a unique index) becomes Conflict `concurrent_request`."""

    def decorate(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def wrapper(c: Any, *args: Any, idem: Idempotency | None = None, **kwargs: Any) -> T:
            try:
                return fn(c, *args, idem=idem, **kwargs)
            except (Conflict, IntegrityError) as e:
                if idem is not None:
                    with transaction(c.session_factory) as s:
                        winner = find_replay(s, idem)
                        if winner is not None:
                            logger.info("Idempotency-Key race: answering with the winner's job %s", winner.id)
                            return replay(s, winner)
                if isinstance(e, IntegrityError):
                    raise Conflict(
                        "a concurrent request changed the same records; try again", code="concurrent_request"
                    ) from e
                raise

        return wrapper

    return decorate


def add_job(
    session: Session,
    *,
    kind: str,
    params: dict[str, Any],
    lock_key: str | None,
    machine_id: str | None = None,
    snapshot_id: str | None = None,
    idem: Idempotency | None = None,
) -> Job:
    """Insert a queued job in the caller's transaction. Raises Conflict when another active job holds
    `lock_key`; the unique index on `jobs.lock_key` settles races between concurrent requests."""
    if lock_key is not None:
        holder = session.scalar(select(Job.id).where(Job.lock_key == lock_key))
        if holder is not None:
            raise Conflict(f"another operation ({holder}) is in progress on {lock_key}", code="machine_busy")
    job = Job(
        id=new_id("job"),
        kind=kind,
        status="queued",
        params=params,
        state={},
        lock_key=lock_key,
        machine_id=machine_id,
        snapshot_id=snapshot_id,
        idempotency_key=idem.key if idem else None,
        request_hash=idem.request_hash if idem else None,
    )
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


def list_jobs(
    session_factory: sessionmaker[Session],
    *,
    kind: str | None = None,
    status: str | None = None,
    machine_id: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page:
    """Newest first. `cursor` is the `next_cursor` of the previous page."""
    query = select(Job)
    if kind:
        query = query.where(Job.kind == kind)
    if status:
        query = query.where(Job.status == status)
    if machine_id:
        query = query.where(Job.machine_id == machine_id)
    return fetch_page(
        session_factory, query, id_column=Job.id, limit=limit, cursor=cursor, view=lambda _s, job: job_view(job)
    )


def cancel_job(
    session_factory: sessionmaker[Session], job_id: str, *, on_end: Callable[[str], OnEnd | None]
) -> dict[str, Any]:
    """Cancel a job. A queued job is cancelled at once; a running one is flagged and its runner stops it
    (remote processes included) at its next check, and an accepted cancel is final: the job ends
    `cancelled`. An active job past its point of no return (`NO_RETURN`: hibernate's destroy is being
    sent) gives Conflict `too_late_to_cancel` and will finish. Cancelling a cancelled job is a no-op; a
    job that already succeeded or failed gives Conflict `job_finished`."""
    with transaction(session_factory) as s:
        # The write comes first: it takes the row (PostgreSQL) or the database (SQLite) until commit, so
        # the worker's fenced point-of-no-return write is either wholly before this or wholly after it.
        s.execute(update(Job).where(Job.id == job_id, Job.status == "running").values(cancel_requested=True))
        job = s.get(Job, job_id, with_for_update=True, populate_existing=True)
        if job is None:
            raise NotFound(f"job {job_id} not found")
        if job.status in ("succeeded", "failed"):
            raise Conflict(f"job {job_id} already {job.status}", code="job_finished")
        if job.status in ACTIVE and NO_RETURN in (job.state or {}):  # queued too: a re-queued job past it
            step = (job.state or {})[NO_RETURN].get("step", "its last step")
            raise Conflict(
                f"too late to cancel job {job_id}: it is past its point of no return (step {step!r}: an "
                "action that cannot be undone was sent); it will finish",
                code="too_late_to_cancel",
            )  # rolls the flag back
        if job.status == "queued":
            finish_in_session(
                s, job, status="cancelled", error=("cancelled", "cancelled before it started"), on_end=on_end(job.kind)
            )
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
            .values(
                status="running",
                attempts=Job.attempts + 1,
                heartbeat_at=now,
                worker=worker,
                started_at=now,
                cancel_requested=False,
            )
        )
        if rowcount(res) != 1:
            return None
        job = s.get(Job, job_id)
        assert job is not None
        events.job_claimed(s, job)
        return job


def heartbeat(
    session_factory: sessionmaker[Session],
    job_id: str,
    *,
    attempt: int,
    progress: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
) -> str:
    """Refresh the lease (and write progress/state). Returns "ok", "cancel" when a cancel was requested,
    or "lost" when this attempt no longer owns the job (it was recovered and re-run elsewhere): `attempt`
    is a fencing token, so a stalled worker that wakes up cannot overwrite its successor."""
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    values.update(progress or {})
    if state is not None:
        values["state"] = state
    with transaction(session_factory) as s:
        before = events.progress_before(s, job_id) if progress else None
        res = s.execute(
            update(Job).where(Job.id == job_id, Job.status == "running", Job.attempts == attempt).values(**values)
        )
        if rowcount(res) != 1:
            return "lost"
        if progress:
            events.progress_written(s, job_id, before)
        cancel = s.scalar(select(Job.cancel_requested).where(Job.id == job_id))
    return "cancel" if cancel else "ok"


def fence(
    s: Session, job_id: str, *, attempt: int, state: dict[str, Any] | None = None, refuse_if_cancelled: bool = False
) -> str:
    """The first statement of every worker-side write: touch the job row only if `attempt` still owns it
    (status running, `jobs.attempts == attempt`). It holds the row (PostgreSQL) or the database (SQLite)
    until the caller's transaction ends, so what the caller writes next is fenced by the same check.
    `state` replaces `jobs.state`; `refuse_if_cancelled` also requires that no cancel was requested (the
    point of no return). Returns "ok", "cancel" (a cancel came first: nothing written), or "lost"
    (another attempt owns the job, or it ended)."""
    conditions = [Job.id == job_id, Job.status == "running", Job.attempts == attempt]
    if refuse_if_cancelled:
        conditions.append(Job.cancel_requested.is_(False))
    values: dict[str, Any] = {"heartbeat_at": utcnow()}
    if state is not None:
        values["state"] = state
    if rowcount(s.execute(update(Job).where(*conditions).values(**values))) == 1:
        return "ok"
    row = s.execute(select(Job.status, Job.attempts, Job.cancel_requested).where(Job.id == job_id)).first()
    if row is None or row.status != "running" or row.attempts != attempt:
        return "lost"
    return "cancel" if row.cancel_requested else "lost"


def finish(
    session_factory: sessionmaker[Session],
    job_id: str,
    *,
    attempt: int,
    status: str,
    result: dict[str, Any] | None = None,
    error: tuple[str, str] | None = None,
    on_end: OnEnd | None = None,
) -> bool:
    """End a running job owned by `attempt`. Returns False when this attempt lost the job meanwhile.
    A job whose cancel was accepted ends `cancelled` even when its handler returned success (the cancel
    came after its last check; what it did is kept in `result`), unless it had passed its point of no
    return, after which no cancel is accepted."""
    with transaction(session_factory) as s:
        if fence(s, job_id, attempt=attempt) == "lost":
            return False
        job = s.get(Job, job_id, with_for_update=True, populate_existing=True)
        assert job is not None
        if status == "succeeded" and job.cancel_requested and NO_RETURN not in (job.state or {}):
            status, error = (
                "cancelled",
                ("cancelled", "the job was cancelled after its last step had run; what it did is in `result`"),
            )
        finish_in_session(s, job, status=status, result=result, error=error, on_end=on_end)
        return True


def finish_in_session(
    s: Session,
    job: Job,
    *,
    status: str,
    result: dict[str, Any] | None = None,
    error: tuple[str, str] | None = None,
    on_end: OnEnd | None = None,
) -> None:
    assert status in FINISHED, status
    job.status = status
    job.finished_at = utcnow()
    job.lock_key = None  # frees the machine for the next operation
    if result is not None:
        job.result = result
    if error is not None:
        job.error_code, job.error_message = error[0], storable(error[1])[:4000]
    if on_end is not None:
        on_end(s, job)


def requeue_stale(
    session_factory: sessionmaker[Session],
    *,
    stale_after: dt.timedelta,
    max_attempts: int,
    rerunnable: Callable[[str], bool],
    on_end: Callable[[str], OnEnd | None],
    cleans_up: Callable[[str], bool] = lambda _kind: False,
) -> list[str]:
    """Recover from dead workers: a running job whose heartbeat is older than `stale_after` is put back
    in the queue when its kind is safe to re-run and attempts remain, else failed with `interrupted`.
    Also returns queued jobs that were never picked up for that long (their enqueue may have been lost).
    Returns the ids to enqueue; safe to run from several workers at once (each row moves only once)."""
    cutoff = utcnow() - stale_after
    to_enqueue: list[str] = []
    with transaction(session_factory) as s:
        stale = s.scalars(
            select(Job).where(Job.status == "running", Job.heartbeat_at < cutoff).with_for_update(skip_locked=True)
        ).all()
        for job in stale:
            # Re-check in a write (SQLite has no row locks): a worker that heartbeated since the read keeps it.
            still = rowcount(
                s.execute(
                    update(Job)
                    .where(
                        Job.id == job.id,
                        Job.status == "running",
                        Job.attempts == job.attempts,
                        Job.heartbeat_at < cutoff,
                    )
                    .values(worker=None)
                    .execution_options(synchronize_session=False)
                )
            )
            if still != 1:
                continue
            s.refresh(job)
            ending = (job.cancel_requested and NO_RETURN not in (job.state or {})) or not (
                rerunnable(job.kind) and job.attempts < max_attempts
            )
            if ending and cleans_up(job.kind) and not (job.state or {}).get("abandoned"):
                # It would end here, but its dead attempts may have left things behind (a wake's rentals):
                # one more run undoes them, then ends the job as it would have ended now.
                why = "cancelled" if job.cancel_requested else "interrupted"
                logger.warning(
                    "job %s (%s) lost its worker; one more run to clean up, then %s",
                    job.id,
                    job.kind,
                    why,
                    extra={"job_id": job.id},
                )
                job.state = {**(job.state or {}), "abandoned": why}
                job.status, job.phase = "queued", "cleanup"
                to_enqueue.append(job.id)
            elif job.cancel_requested and NO_RETURN not in (job.state or {}):
                # The cancel was accepted while its worker was gone: it is final, the job does not run again.
                logger.warning(
                    "job %s (%s) lost its worker after a cancel; cancelled", job.id, job.kind, extra={"job_id": job.id}
                )
                finish_in_session(
                    s, job, status="cancelled", error=("cancelled", "the job was cancelled"), on_end=on_end(job.kind)
                )
            elif rerunnable(job.kind) and job.attempts < max_attempts:
                logger.warning(
                    "job %s (%s) lost its worker; re-queued (attempt %d of %d)",
                    job.id,
                    job.kind,
                    job.attempts + 1,
                    max_attempts,
                    extra={"job_id": job.id},
                )
                job.status, job.phase = "queued", "requeued"
                to_enqueue.append(job.id)
            else:
                logger.warning("job %s (%s) lost its worker; marked failed", job.id, job.kind, extra={"job_id": job.id})
                finish_in_session(
                    s,
                    job,
                    status="failed",
                    error=("interrupted", "the worker running this job stopped"),
                    on_end=on_end(job.kind),
                )
        forgotten = s.scalars(select(Job.id).where(Job.status == "queued", Job.created_at < cutoff)).all()
        to_enqueue.extend(j for j in forgotten if j not in to_enqueue)
    return to_enqueue


def note_enqueue_failed(session_factory: sessionmaker[Session], job_id: str) -> None:
    """Say on a queued job (phase `enqueue_failed`) that handing it to the workers failed: recovery
    (`requeue_stale`) enqueues it once it has waited JOB_STALE_AFTER_S."""
    with transaction(session_factory) as s:
        s.execute(update(Job).where(Job.id == job_id, Job.status == "queued").values(phase="enqueue_failed"))


def expire_dead_local_workers(
    session_factory: sessionmaker[Session], *, hostname: str, is_alive: Callable[[int], bool]
) -> int:
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
