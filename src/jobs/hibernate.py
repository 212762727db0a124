"""The `hibernate` job: snapshot the machine, verify the snapshot, destroy the vast.ai instance, and see
it gone. Each step is recorded in `ctx.state` as it completes, so a re-run after a crash continues
from the step it reached; the instance is destroyed only after the snapshot is complete and verified."""
from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from src.errors import JobFailed
from src.jobs.context import JobContext
from src.jobs.failpoints import failpoint
from src.jobs.kinds import JobKind
from src.jobs.remote import Endpoint
from src.jobs.rows import machine_fields, set_machine, snapshot_fields
from src.jobs.storage_jobs import check_objects
from src.jobs.transfer_jobs import mark_snapshot_failed_unless_complete, take_snapshot
from src.jobs.vast_steps import destroy_confirmed
from src.models import Job, Machine
from src.services.machines import add_event


def hibernate(ctx: JobContext) -> dict[str, Any]:
    machine_id = ctx.machine_id
    assert machine_id is not None
    snapshot_id = ctx.params["snapshot_id"]
    destroy_after = bool(ctx.params.get("destroy_after", True))

    if not ctx.state.get("snapshot_done"):
        take_snapshot(ctx, snapshot_id, _endpoint(ctx, machine_id))
        ctx.save_state(snapshot_done=True)
    failpoint("hibernate.after_snapshot")

    if not ctx.state.get("verified"):
        snap = snapshot_fields(ctx, snapshot_id)
        deep = bool(ctx.params.get("deep_verify"))
        ctx.progress(phase="verify")
        check_objects(ctx, prefix=snap["storage_prefix"], manifest_sha256=snap["manifest_sha256"], deep=deep)
        ctx.save_state(verified=True)
    failpoint("hibernate.after_verify")

    snap = snapshot_fields(ctx, snapshot_id)
    result = {"snapshot_id": snapshot_id, "raw_bytes": snap["raw_bytes"], "stored_bytes": snap["stored_bytes"],
              "destroyed_instance_id": None}
    if not destroy_after:
        set_machine(ctx, machine_id, status="running", event=("snapshot_only", f"snapshot {snapshot_id} taken; "
                                                               "instance kept (destroy_after false)"))
        return result

    instance_id = ctx.state.get("destroying") or machine_fields(ctx, machine_id).get("vast_instance_id")
    if instance_id is None:
        raise JobFailed("the machine has no vast.ai instance to destroy", code="no_vast_instance")
    ctx.progress(phase="destroy")
    ctx.save_state(destroying=instance_id)
    failpoint("hibernate.before_destroy")
    destroy_confirmed(ctx, ctx.container.vast(), int(instance_id))
    set_machine(ctx, machine_id, status="hibernated", vast_instance_id=None, ssh_host=None, ssh_port=None,
                host_key=None, event=("hibernated", f"instance {instance_id} destroyed after snapshot {snapshot_id} "
                                      "was verified"))
    ctx.save_state(destroyed=True)
    result["destroyed_instance_id"] = instance_id
    return result


def _endpoint(ctx: JobContext, machine_id: str) -> Endpoint:
    """The machine's SSH endpoint; asked of vast.ai when the request gave none."""
    m = machine_fields(ctx, machine_id)
    if m.get("ssh_host") and m.get("ssh_port"):
        return Endpoint(machine_id=machine_id, host=m["ssh_host"], port=m["ssh_port"],
                        user=m.get("ssh_user") or ctx.settings.ssh_user, host_key=m.get("host_key"))
    if m.get("vast_instance_id") is None:
        raise JobFailed(f"machine {machine_id} has no SSH endpoint and no vast.ai instance", code="no_ssh_endpoint")
    instance = ctx.container.vast().show_instance(int(m["vast_instance_id"]))
    if instance is None or instance.ssh_endpoint is None:
        raise JobFailed(f"vast.ai instance {m['vast_instance_id']} has no SSH endpoint", code="no_ssh_endpoint")
    ep = instance.ssh_endpoint
    ctx.container.ssh_policy().check(ep.host)
    # The same instance under the address vast.ai reports: its pinned host key still applies.
    set_machine(ctx, machine_id, ssh_host=ep.host, ssh_port=ep.port,
                event=("endpoint_discovered", f"SSH endpoint {ep.host}:{ep.port} from vast.ai"))
    return Endpoint(machine_id=machine_id, host=ep.host, port=ep.port,
                    user=m.get("ssh_user") or ctx.settings.ssh_user, host_key=m.get("host_key"))


def _hibernate_ended(s: Session, job: Job) -> None:
    """Keep the machine's status honest when hibernate did not finish."""
    mark_snapshot_failed_unless_complete(s, job)
    if job.status == "succeeded" or job.machine_id is None:
        return
    machine = s.get(Machine, job.machine_id)
    if machine is None:
        return
    state = job.state or {}
    if state.get("destroying") and not state.get("destroyed"):
        # The destroy was sent but never confirmed: the instance may or may not be alive. The snapshot
        # is complete and verified, so nothing is lost; a person (or a new hibernate) must look.
        machine.status = "error"
        add_event(s, machine.id, "hibernate_failed", f"destroy of instance {state['destroying']} not confirmed: "
                  f"{job.error_code}: {job.error_message}", job_id=job.id)
    else:
        machine.status = "running"
        add_event(s, machine.id, "hibernate_failed", f"{job.error_code}: {job.error_message}; instance left "
                  "running", job_id=job.id)


KIND = JobKind("hibernate", hibernate, rerunnable=True, on_end=_hibernate_ended)
