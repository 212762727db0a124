"""vast.ai steps that jobs share: wait for an instance to run, destroy one and see it gone."""

from __future__ import annotations

import time
from typing import Any

from src.errors import ExternalError, JobFailed
from src.jobs.context import JobContext

# Container states from which an instance will not come up by itself.
DEAD_STATES = ("exited", "unknown", "offline", "error")


def wait_running(ctx: JobContext, vast: Any, instance_id: int, *, deadline_s: float) -> Any:
    """Poll until the instance runs with an SSH endpoint; return it. Raises JobFailed(`instance_not_ready`)
    past the deadline or when it sits in a dead state, JobFailed(`instance_gone`) when it vanished."""
    deadline = time.monotonic() + deadline_s
    interval = ctx.settings.vast_poll_interval_s
    last = None
    while True:
        ctx.check_cancelled()
        instance = _show(vast, instance_id)
        if instance is None:
            raise JobFailed(f"vast.ai instance {instance_id} disappeared while starting", code="instance_gone")
        last = instance
        if instance.is_running and instance.ssh_endpoint is not None:
            return instance
        if instance.actual_status in DEAD_STATES and instance.intended_status != "stopped":
            raise JobFailed(
                f"vast.ai instance {instance_id} is {instance.actual_status}: {instance.status_msg or 'no message'}",
                code="instance_not_ready",
            )
        if time.monotonic() >= deadline:
            raise JobFailed(
                f"vast.ai instance {instance_id} not running after {deadline_s:.0f}s "
                f"(status {last.actual_status}: {last.status_msg or 'no message'})",
                code="instance_not_ready",
            )
        ctx.sleep(interval)  # a cancel during a long boot is acted on now, not after the deadline


def destroy_confirmed(
    ctx: JobContext, vast: Any, instance_id: int, *, deadline_s: float | None = None, fenced: bool = True
) -> None:
    """Destroy the instance and poll until vast.ai no longer shows it, or shows it released (`cur_state`
    `unloaded`). Retries failed destroys with
    backoff; never assumes success. Raises JobFailed(`destroy_unconfirmed`) past the deadline, and
    JobLost, before sending anything, once this attempt no longer owns the job (a frozen worker that
    wakes up must not destroy what its successor now runs on). A cancel does not stop it: it is often
    the clean-up a cancel asked for, or past the point of no return. `fenced=False` only for what this
    attempt alone can own (its own rentals, labelled with its attempt number), cleaned up after it lost
    the job."""
    deadline = time.monotonic() + (deadline_s if deadline_s is not None else ctx.settings.vast_destroy_deadline_s)
    interval = ctx.settings.vast_poll_interval_s
    attempt = 0
    last_error = "no answer yet"
    while True:
        attempt += 1
        if fenced:
            ctx.ensure_owner()
        try:
            vast.destroy_instance(instance_id)
            for _ in range(5):  # vast.ai may show a destroyed instance briefly; look again before re-sending
                shown = _show(vast, instance_id)
                if shown is None or shown.is_released:  # gone, or shown as released (`unloaded`)
                    return
                time.sleep(interval)
            last_error = "still listed after destroy"
        except ExternalError as e:
            if not e.retryable:
                raise JobFailed(
                    f"vast.ai refused to destroy instance {instance_id}: {e.message}", code="destroy_failed"
                ) from e
            last_error = e.message
        if time.monotonic() >= deadline:
            raise JobFailed(
                f"could not confirm vast.ai instance {instance_id} is destroyed after {attempt} tries: {last_error}",
                code="destroy_unconfirmed",
            )
        time.sleep(min(interval * 2 ** min(attempt, 6), 30.0))


def _show(vast: Any, instance_id: int) -> Any:
    """show_instance, with a transient vast.ai failure treated as "ask again" by the callers' loops."""
    for attempt in range(3):
        try:
            return vast.show_instance(instance_id)
        except ExternalError as e:
            if not e.retryable or attempt == 2:
                raise
            time.sleep(1.0)
    return None  # pragma: no cover
