"""The task queue: Huey over a SQLite file by default, Redis when REDIS_URL is set. The queue carries only
job ids; everything else is in the jobs table."""
from __future__ import annotations

import datetime as dt
import logging
import os
import socket
from typing import TYPE_CHECKING

from huey import Huey, RedisHuey, SqliteHuey, crontab

from src.db import prepare_private_file
from src.services import jobs as job_service

if TYPE_CHECKING:
    from src.container import Container
    from src.settings import Settings

logger = logging.getLogger(__name__)


def make_huey(settings: "Settings") -> Huey:
    if settings.redis_url:
        return RedisHuey("gpusnap", url=settings.redis_url)
    prepare_private_file(settings.queue_path)  # 0600: Huey pickles task payloads into this file
    return SqliteHuey("gpusnap", filename=settings.queue_path)


class JobQueue:
    """Binds the Huey tasks to a container: `enqueue(job_id)` on the API side, the consumer runs them."""

    def __init__(self, container: "Container", huey: Huey) -> None:
        from src.jobs.runner import JobRunner

        self.huey = huey
        self._container = container
        runner = JobRunner(container)
        self._execute = huey.task(name="gpusnap.execute_job")(runner.run)
        huey.periodic_task(crontab(minute="*"), name="gpusnap.recover_stale_jobs")(self.recover_stale_jobs)

    def enqueue(self, job_id: str) -> None:
        self._execute(job_id)

    def recover_stale_jobs(self, *, local_dead_workers: bool = False) -> list[str]:
        """Re-queue or fail jobs whose worker died (see `job_service.requeue_stale`). Runs every minute in
        each worker and once when a worker starts; at start (`local_dead_workers`) the jobs of workers on
        this host whose process is gone are recovered at once instead of after JOB_STALE_AFTER_S."""
        c = self._container
        kinds = c.job_kinds
        if local_dead_workers:
            job_service.expire_dead_local_workers(c.session_factory, hostname=socket.gethostname(),
                                                  is_alive=_pid_alive)
        ids = job_service.requeue_stale(
            c.session_factory,
            stale_after=dt.timedelta(seconds=c.settings.job_stale_after_s),
            max_attempts=c.settings.job_max_attempts,
            rerunnable=lambda k: k in kinds and kinds[k].rerunnable,
            on_end=lambda k: kinds[k].on_end if k in kinds else None,
        )
        for job_id in ids:
            self.enqueue(job_id)
        return ids

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
