"""The task queue: Huey over a SQLite file by default, Redis when REDIS_URL is set. The queue carries only
job ids; everything else is in the jobs table."""

from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from typing import TYPE_CHECKING

from huey import Huey, RedisHuey, SqliteHuey, crontab
from sqlalchemy.exc import SQLAlchemyError

from src.db import prepare_private_file
from src.services import jobs as job_service

if TYPE_CHECKING:
    from src.container import Container
    from src.settings import Settings

logger = logging.getLogger(__name__)


def make_huey(settings: Settings) -> Huey:
    if settings.redis_url:
        return RedisHuey("gpusnap", url=settings.redis_url)
    prepare_private_file(settings.queue_path)  # 0600: Huey pickles task payloads into this file
    return SqliteHuey("gpusnap", filename=settings.queue_path)


class JobQueue:
    """Binds the Huey tasks to a container: `enqueue(job_id)` on the API side, the consumer runs them."""

    def __init__(self, container: Container, huey: Huey) -> None:
        from src.jobs.runner import JobRunner

        self.huey = huey
        self._container = container
        runner = JobRunner(container)
        self._execute = huey.task(name="gpusnap.execute_job")(runner.run)
        huey.periodic_task(crontab(minute="*"), name="gpusnap.recover_stale_jobs")(self.recover_stale_jobs)
        huey.periodic_task(crontab(minute="17"), name="gpusnap.prune_events")(self.prune_events)
        huey.periodic_task(crontab(minute="*"), name="gpusnap.policy_tick")(self.policy_tick)

    def enqueue(self, job_id: str) -> bool:
        """Hand `job_id` to the workers; False when the queue refused. Called after the job's row is
        committed, and that row is the truth: a queued row nobody picked up is enqueued again by
        `recover_stale_jobs` once it has waited JOB_STALE_AFTER_S. So a queue that is down (Redis
        unreachable, the SQLite queue file locked or gone) delays the job but neither loses it nor fails
        the request that created it (which answers 202; a retry would find the machine busy). The job's
        phase says `enqueue_failed` meanwhile."""
        try:
            self._execute(job_id)
            return True
        except Exception as e:  # noqa: BLE001 - whatever the backend raises, the job runs later through recovery
            logger.warning(
                "could not enqueue job %s (%s: %s); it starts when recovery re-sends queued jobs "
                "(within JOB_STALE_AFTER_S once the queue answers)",
                job_id,
                type(e).__name__,
                e,
                extra={"job_id": job_id},
            )
            try:
                job_service.note_enqueue_failed(self._container.session_factory, job_id)
            except SQLAlchemyError:  # the phase is only a hint; the queued row alone gets the job run
                logger.warning("could not mark job %s enqueue_failed", job_id, exc_info=True)
            return False

    def recover_stale_jobs(self, *, local_dead_workers: bool = False) -> list[str]:
        """Re-queue or fail jobs whose worker died (see `job_service.requeue_stale`). Runs every minute in
        each worker and once when a worker starts; at start (`local_dead_workers`) the jobs of workers on
        this host whose process is gone are recovered at once instead of after JOB_STALE_AFTER_S."""
        c = self._container
        kinds = c.job_kinds
        if local_dead_workers:
            job_service.expire_dead_local_workers(c.session_factory, hostname=socket.gethostname(), is_alive=_pid_alive)
        ids = job_service.requeue_stale(
            c.session_factory,
            stale_after=dt.timedelta(seconds=c.settings.job_stale_after_s),
            max_attempts=c.settings.job_max_attempts,
            rerunnable=lambda k: k in kinds and kinds[k].rerunnable,
            on_end=lambda k: kinds[k].on_end if k in kinds else None,
            cleans_up=lambda k: k in kinds and kinds[k].cleans_up,
        )
        for job_id in ids:
            self.enqueue(job_id)
        return ids

    def prune_events(self) -> int:
        """Hourly in each worker: drop progress events older than EVENTS_PROGRESS_RETENTION_S."""
        from src.services.events import prune_progress

        return prune_progress(
            self._container.session_factory, older_than_s=self._container.settings.events_progress_retention_s
        )

    def policy_tick(self) -> None:
        """Carry out machine policies (src/jobs/scheduler.py): every minute in each worker, unless
        SCHEDULER_ENABLED is false there."""
        if self._container.settings.scheduler_enabled:
            from src.jobs.scheduler import tick

            tick(self._container)

    def ping(self) -> None:
        """Raise if the queue's storage cannot be reached (for /readyz)."""
        self.huey.pending_count()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
