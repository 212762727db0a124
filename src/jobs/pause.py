"""`pause` and `resume`: vast.ai's own stop/start. Cheaper than hibernate for short breaks (the disk
stays, and is billed), and no data moves. A resume can fail when the host's GPUs were rented meanwhile;
the machine then stays paused and the error says so."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy.orm import Session

from src.errors import ExternalError, JobFailed
from src.jobs.context import JobContext
from src.jobs.kinds import JobKind
from src.jobs.rows import machine_fields, set_machine
from src.jobs.vast_steps import wait_running
from src.models import Job, Machine
from src.services.machines import add_event


def pause(ctx: JobContext) -> dict[str, Any]:
    machine_id, instance_id = _instance(ctx)
    vast = ctx.container.vast()
    ctx.progress(phase="stop")
    ctx.point_of_no_return("stop")  # a cancel accepted until now is final; from here on it is refused
    vast.stop_instance(instance_id)
    deadline = time.monotonic() + ctx.settings.vast_ready_deadline_s
    while True:
        instance = vast.show_instance(instance_id)
        if instance is None:
            raise JobFailed(f"vast.ai instance {instance_id} disappeared", code="instance_gone")
        if instance.actual_status in ("stopped", "exited") or instance.cur_state == "stopped":
            break
        if time.monotonic() >= deadline:
            raise JobFailed(f"vast.ai instance {instance_id} still {instance.actual_status}", code="stop_unconfirmed")
        ctx.sleep(ctx.settings.vast_poll_interval_s)  # raises JobLost at once if the job was taken over
    set_machine(ctx, machine_id, status="paused", event=("paused", f"instance {instance_id} stopped"))
    return {"instance_id": instance_id}


def resume(ctx: JobContext) -> dict[str, Any]:
    machine_id, instance_id = _instance(ctx)
    vast = ctx.container.vast()
    ctx.progress(phase="start")
    ctx.point_of_no_return("start")
    try:
        vast.start_instance(instance_id)
    except ExternalError as e:
        if getattr(e, "vast_error", None) == "resources_unavailable":
            # vast.ai queued the start ("state change queued", OpenAPI auto_put_api_v0_instances_id_4ff617.yaml):
            # left alone, it starts (and bills) whenever the GPUs free up, behind our back. Take it back.
            _cancel_queued_start(ctx, vast, instance_id)
            raise JobFailed(
                f"the GPUs of instance {instance_id}'s host are rented by someone else; wake from a "
                "snapshot instead, or try again later",
                code="gpu_unavailable",
            ) from e
        raise
    ctx.progress(phase="wait_running")
    try:
        instance = wait_running(ctx, vast, instance_id, deadline_s=ctx.settings.vast_ready_deadline_s)
    except JobFailed:
        # vast.ai accepted the start but the instance never came up (it sits in "scheduling" while its
        # host's resources are taken: vast-ai/docs cli/reference/start-instance.mdx). Left alone it may
        # start, and bill, later while gpusnap says paused: take the start back before failing.
        _cancel_queued_start(ctx, vast, instance_id)
        raise
    ep = instance.ssh_endpoint
    # Same container, same host keys: the pin stays even if vast.ai maps SSH to another port.
    set_machine(
        ctx,
        machine_id,
        status="running",
        ssh_host=ep.host,
        ssh_port=ep.port,
        event=("resumed", f"instance {instance_id} running at {ep.host}:{ep.port}"),
    )
    return {"instance_id": instance_id, "ssh_host": ep.host, "ssh_port": ep.port}


def _cancel_queued_start(ctx: JobContext, vast: Any, instance_id: int) -> None:
    """Ask for `stopped` again and see vast.ai record it (`intended_status`), so the queued start is gone.
    Raises JobFailed(`queued_start_not_cancelled`) when vast.ai refuses, or still intends to run it at the
    deadline."""
    deadline = time.monotonic() + ctx.settings.vast_ready_deadline_s
    while True:
        try:
            vast.stop_instance(instance_id)
            instance = vast.show_instance(instance_id)
            if instance is None or instance.intended_status == "stopped":
                return  # cancelled (or gone: nothing left to start)
            last = f"intended {instance.intended_status}"
        except ExternalError as e:
            if not e.retryable:
                raise JobFailed(
                    f"could not cancel the queued start of vast.ai instance {instance_id} ({e.message}); "
                    "it may start and bill when its GPUs free up: stop it by hand",
                    code="queued_start_not_cancelled",
                ) from e
            last = e.message
        if time.monotonic() >= deadline:
            raise JobFailed(
                f"vast.ai instance {instance_id} still has a queued start ({last}); it may start and "
                "bill when its GPUs free up: stop it by hand",
                code="queued_start_not_cancelled",
            )
        time.sleep(ctx.settings.vast_poll_interval_s)


def _instance(ctx: JobContext) -> tuple[str, int]:
    assert ctx.machine_id is not None
    instance_id = machine_fields(ctx, ctx.machine_id).get("vast_instance_id")
    if instance_id is None:
        raise JobFailed(f"machine {ctx.machine_id} has no vast.ai instance", code="no_vast_instance")
    return ctx.machine_id, int(instance_id)


def _ended(previous: str):  # type: ignore[no-untyped-def]
    def on_end(s: Session, job: Job) -> None:
        if job.status == "succeeded" or job.machine_id is None:
            return
        machine = s.get(Machine, job.machine_id)
        if machine is not None:
            machine.status = previous
            add_event(s, machine.id, f"{job.kind}_failed", f"{job.error_code}: {job.error_message}", job_id=job.id)

    return on_end


KINDS = [
    JobKind("pause", pause, rerunnable=True, on_end=_ended("running")),
    JobKind("resume", resume, rerunnable=True, on_end=_ended("paused")),
]
