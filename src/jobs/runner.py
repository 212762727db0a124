"""Runs one job: claim it, keep its lease alive, call its kind, record how it ended."""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from src.errors import GpusnapError
from src.jobs.context import Heartbeat, JobContext, JobLost
from src.logging_setup import job_id_var
from src.services import jobs as job_service

if TYPE_CHECKING:
    from src.container import Container

logger = logging.getLogger(__name__)


class JobRunner:
    def __init__(self, container: Container) -> None:
        self.container = container
        self.worker_name = f"{socket.gethostname()}:{os.getpid()}"

    def run(self, job_id: str) -> None:
        """Run `job_id` if it is still queued; a no-op for a job another worker took or that was cancelled."""
        c = self.container
        token = job_id_var.set(job_id)  # every log line below carries the job id
        try:
            job = job_service.claim(c.session_factory, job_id, worker=self.worker_name)
            if job is None:
                logger.info("job %s is not queued any more; skipped", job_id)
                return
            kind = c.job_kinds.get(job.kind)
            if kind is None:  # a row written by a newer version of the service
                job_service.finish(
                    c.session_factory,
                    job_id,
                    attempt=job.attempts,
                    status="failed",
                    error=("unknown_kind", f"this worker cannot run jobs of kind {job.kind!r}"),
                )
                return
            started = time.monotonic()
            ctx = JobContext(container=c, job=job)
            logger.info("job %s (%s) started, attempt %d", job_id, job.kind, job.attempts)
            status, result, error = self._call(kind.run, ctx)
            if ctx.lost:
                logger.warning("job %s was taken over by another worker; this attempt stops here", job_id)
                return
            if error is not None and error[0] == "remote_state_unknown":
                pass  # never softened to "cancelled" or "remote_timeout": the host may have changed
            elif ctx.timed_out and status != "succeeded":
                status, error = "failed", ("remote_timeout", ctx.deadline_message())
            elif status == "failed" and ctx.cancel_event.is_set():
                status, error = "cancelled", ("cancelled", "the job was cancelled")
            ctx.flush()  # last progress numbers
            # Fenced by the attempt; a success after an accepted cancel is recorded as `cancelled` (see finish).
            if not job_service.finish(
                c.session_factory,
                job_id,
                attempt=ctx.attempt,
                status=status,
                result=result,
                error=error,
                on_end=kind.on_end,
            ):
                logger.warning(
                    "job %s was taken over by another worker before it could finish; its end (%s) is not recorded",
                    job_id,
                    status,
                )
                return
            logger.info(
                "job %s (%s) %s in %.1fs%s",
                job_id,
                job.kind,
                status,
                time.monotonic() - started,
                f": {error[0]}: {error[1]}" if error else "",
            )
        finally:
            job_id_var.reset(token)

    def _call(self, run: Any, ctx: JobContext) -> tuple[str, dict[str, Any] | None, tuple[str, str] | None]:
        with Heartbeat(ctx, self.container.settings.job_heartbeat_s):
            try:
                return "succeeded", run(ctx) or {}, None
            except JobLost:
                return "failed", None, ("lost", "taken over by another worker")
            except GpusnapError as e:
                if e.code == "cancelled":  # JobCancelled, or a remote script stopped by the cancel
                    return "cancelled", None, ("cancelled", e.message)
                return "failed", None, (e.code, e.message)
            except Exception:
                # Unexpected: the traceback goes to the worker log, the client gets a stable message.
                logger.exception("job %s crashed", ctx.job_id)
                return "failed", None, ("internal", f"unexpected error; the worker log has details for {ctx.job_id}")
