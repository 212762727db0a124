"""The `hibernate` job: snapshot the machine, verify the snapshot, destroy the vast.ai instance, and see
it gone. Each step is recorded in `ctx.state` as it completes, so a re-run after a crash continues
from the step it reached; the instance is destroyed only after the snapshot is complete and verified.

Nothing is destroyed unless the snapshot provably came from the instance being destroyed: with
`destroy_after` the snapshot is taken only from an endpoint vast.ai reports for that instance (asked
right before the snapshot; which instance and endpoint is recorded in `state.snapshot_source`), and
right before the destroy the record, the snapshot row and vast.ai are checked again
(`endpoint_mismatch`). A snapshot that holds nothing, or far less than the host's pre-scan of the
workspace found, is kept but destroys nothing (`hollow_snapshot`)."""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

from sqlalchemy.orm import Session

from src.db import transaction
from src.errors import JobFailed
from src.jobs.context import JobContext
from src.jobs.failpoints import failpoint
from src.jobs.kinds import JobKind
from src.jobs.remote import Endpoint
from src.jobs.rows import machine_fields, set_machine, snapshot_fields
from src.jobs.storage_jobs import check_objects
from src.jobs.transfer_jobs import mark_snapshot_failed_unless_complete, take_snapshot
from src.jobs.vast_steps import destroy_confirmed
from src.models import Job, Machine, Snapshot
from src.services.machines import add_event

logger = logging.getLogger(__name__)

# "Far less than the workspace scan said": fewer than half the entries, or under half the bytes, of
# what the host's pre-scan (same excludes) counted just before tar ran. Tar stores what the scan
# counts (hard links once, sparse files by data), so an honest snapshot of a quiet workspace is at
# about 100%; half leaves room for a workspace that shrinks while it is read.
HOLLOW_RATIO = 0.5


def hibernate(ctx: JobContext) -> dict[str, Any]:
    machine_id = ctx.machine_id
    assert machine_id is not None
    snapshot_id = ctx.params["snapshot_id"]
    destroy_after = bool(ctx.params.get("destroy_after", True))

    if not ctx.state.get("snapshot_done"):
        endpoint = _instance_endpoint(ctx, machine_id) if destroy_after else _endpoint(ctx, machine_id)
        taken = take_snapshot(ctx, snapshot_id, endpoint)
        ctx.save_state(snapshot_done=True, scan=taken.get("scan"))
    failpoint("hibernate.after_snapshot")

    if not ctx.state.get("verified"):
        snap = snapshot_fields(ctx, snapshot_id)
        deep = bool(ctx.params.get("deep_verify"))
        ctx.progress(phase="verify")
        check_objects(
            ctx,
            prefix=snap["storage_prefix"],
            manifest_sha256=snap["manifest_sha256"],
            deep=deep,
            snapshot_id=snapshot_id,
        )
        ctx.save_state(verified=True)
    failpoint("hibernate.after_verify")

    snap = snapshot_fields(ctx, snapshot_id)
    result = {
        "snapshot_id": snapshot_id,
        "raw_bytes": snap["raw_bytes"],
        "stored_bytes": snap["stored_bytes"],
        "destroyed_instance_id": None,
    }
    if not destroy_after:
        set_machine(
            ctx,
            machine_id,
            status="running",
            event=("snapshot_only", f"snapshot {snapshot_id} taken; instance kept (destroy_after false)"),
        )
        return result

    instance_id = ctx.state.get("destroying") or machine_fields(ctx, machine_id).get("vast_instance_id")
    if instance_id is None:
        raise JobFailed("the machine has no vast.ai instance to destroy", code="no_vast_instance")
    if not ctx.state.get("destroying"):  # a re-run after the destroy was sent has nothing left to check
        _refuse_hollow(ctx, snap)
        _recheck_source(ctx, machine_id, int(instance_id), snapshot_id)
        _recheck_idle(ctx, machine_id, snapshot_id)
    ctx.progress(phase="destroy")
    # Last chance for a cancel: it is checked in the database, in the same write that records the destroy
    # as begun; after it, a cancel is answered 409 `too_late_to_cancel`.
    ctx.point_of_no_return("destroy", destroying=instance_id)
    failpoint("hibernate.before_destroy")
    destroy_confirmed(ctx, ctx.container.vast(), int(instance_id))
    set_machine(
        ctx,
        machine_id,
        status="hibernated",
        vast_instance_id=None,
        ssh_host=None,
        ssh_port=None,
        host_key=None,
        event=("hibernated", f"instance {instance_id} destroyed after snapshot {snapshot_id} was verified"),
    )
    ctx.save_state(destroyed=True)
    result["destroyed_instance_id"] = instance_id
    return result


def _remember_shape(ctx: JobContext, machine_id: str, instance: Any) -> None:
    """Record the GPUs and image of the instance about to be hibernated: what a later wake rents by default
    (a machine gpusnap did not rent itself has no offer of ours on record)."""
    with ctx.owned() as s:  # fenced: only while this attempt owns the job
        machine = s.get(Machine, machine_id)
        if machine is None:
            return
        # Its price too: what the hibernated hours save (GET /api/instances `costs`) is counted at it.
        shape = {
            "num_gpus": instance.num_gpus,
            "image": instance.raw.get("image_uuid"),
            "dph_total": instance.dph_total,
            "inet_up_cost": instance.raw.get("inet_up_cost"),
            "inet_down_cost": instance.raw.get("inet_down_cost"),
        }
        machine.offer = {**(machine.offer or {}), **{k: v for k, v in shape.items() if v}}
        machine.gpu_name = instance.gpu_name or machine.gpu_name


def _endpoint(ctx: JobContext, machine_id: str) -> Endpoint:
    """The machine's SSH endpoint; asked of vast.ai when the request gave none."""
    m = machine_fields(ctx, machine_id)
    if m.get("ssh_host") and m.get("ssh_port"):
        return Endpoint(
            machine_id=machine_id,
            host=m["ssh_host"],
            port=m["ssh_port"],
            user=m.get("ssh_user") or ctx.settings.ssh_user,
            host_key=m.get("host_key"),
        )
    if m.get("vast_instance_id") is None:
        raise JobFailed(f"machine {machine_id} has no SSH endpoint and no vast.ai instance", code="no_ssh_endpoint")
    instance = ctx.container.vast().show_instance(int(m["vast_instance_id"]))
    if instance is None or instance.ssh_endpoint is None:
        raise JobFailed(f"vast.ai instance {m['vast_instance_id']} has no SSH endpoint", code="no_ssh_endpoint")
    ep = instance.ssh_endpoint
    ctx.container.ssh_policy().check(ep.host)
    # The same instance under the address vast.ai reports: its pinned host key still applies.
    set_machine(
        ctx,
        machine_id,
        ssh_host=ep.host,
        ssh_port=ep.port,
        event=("endpoint_discovered", f"SSH endpoint {ep.host}:{ep.port} from vast.ai"),
    )
    return Endpoint(
        machine_id=machine_id,
        host=ep.host,
        port=ep.port,
        user=m.get("ssh_user") or ctx.settings.ssh_user,
        host_key=m.get("host_key"),
    )


def endpoint_text(host: str, port: int | str) -> str:
    """`host:port` with the host written one way (IP addresses normalised, names lower case without a
    trailing dot, as the API's request models write them), so endpoints compare as text."""
    try:
        host = str(ipaddress.ip_address(host))
    except ValueError:
        host = host.lower().rstrip(".")
    return f"[{host}]:{int(port)}" if ":" in host else f"{host}:{int(port)}"


def own_endpoints(instance: Any) -> set[str]:
    """Every SSH endpoint vast.ai reports as this instance's own: its direct mapping (public_ipaddr and
    the host port of 22/tcp) and its proxy (ssh_host, ssh_port). Empty while it is not running."""
    found = {instance.direct_ssh_endpoint, instance.proxy_ssh_endpoint} - {None}
    return {endpoint_text(ep.host, ep.port) for ep in found}


def _instance_endpoint(ctx: JobContext, machine_id: str) -> Endpoint:
    """The endpoint to snapshot when the instance will be destroyed: one vast.ai reports for it, asked
    now. An endpoint the request named that is not the instance's fails (`endpoint_mismatch`); one only
    remembered from earlier is replaced by the instance's own, with an event. Records the source."""
    m = machine_fields(ctx, machine_id)
    if m.get("vast_instance_id") is None:
        raise JobFailed(f"machine {machine_id} has no vast.ai instance to destroy", code="no_vast_instance")
    vast_id = int(m["vast_instance_id"])
    instance = ctx.container.vast().show_instance(vast_id)
    own = own_endpoints(instance) if instance is not None else set()
    if instance is not None:
        _remember_shape(ctx, machine_id, instance)
    if not own:
        raise JobFailed(
            f"vast.ai reports no SSH endpoint for instance {vast_id} (not running?); nothing was "
            "snapshotted or destroyed",
            code="no_ssh_endpoint",
        )
    requested = ctx.params.get("requested_endpoint")
    if requested and endpoint_text(*requested) not in own:
        raise JobFailed(
            f"{requested[0]}:{requested[1]} is not vast.ai instance {vast_id} (it answers at "
            f"{', '.join(sorted(own))}); nothing was snapshotted or destroyed",
            code="endpoint_mismatch",
        )
    user = m.get("ssh_user") or ctx.settings.ssh_user
    remembered = endpoint_text(m["ssh_host"], m["ssh_port"]) if m.get("ssh_host") and m.get("ssh_port") else None
    if remembered in own:
        endpoint = Endpoint(
            machine_id=machine_id, host=m["ssh_host"], port=m["ssh_port"], user=user, host_key=m.get("host_key")
        )
    else:
        ep = instance.ssh_endpoint
        ctx.container.ssh_policy().check(ep.host)
        why = (
            f"remembered endpoint {remembered} is not vast.ai instance {vast_id}'s; using {ep.host}:{ep.port}"
            if remembered
            else f"SSH endpoint {ep.host}:{ep.port} from vast.ai"
        )
        # The pin stays: whichever way vast.ai routes SSH (direct or proxy), it reaches this instance's own
        # sshd, and a pin is reset only by a wake onto a new instance or by forget-host-key.
        set_machine(
            ctx,
            machine_id,
            ssh_host=ep.host,
            ssh_port=ep.port,
            event=("endpoint_replaced" if remembered else "endpoint_discovered", why),
        )
        endpoint = Endpoint(machine_id=machine_id, host=ep.host, port=ep.port, user=user, host_key=m.get("host_key"))
    ctx.save_state(
        snapshot_source={"vast_instance_id": vast_id, "endpoint": endpoint_text(endpoint.host, endpoint.port)}
    )
    return endpoint


def _recheck_source(ctx: JobContext, machine_id: str, instance_id: int, snapshot_id: str) -> None:
    """Right before the destroy: the snapshot was taken from `instance_id` (job state), the snapshot row
    says the same endpoint, the machine still runs on that instance, and vast.ai does not now report the
    instance at another endpoint. Raises JobFailed(`endpoint_mismatch`); nothing is destroyed."""
    source = ctx.state.get("snapshot_source") or {}
    with transaction(ctx.container.session_factory) as s:
        row = s.get(Snapshot, snapshot_id)
        saved_from = row.source_host if row is not None else None
        machine = s.get(Machine, machine_id)
        bound = machine.vast_instance_id if machine is not None else None
    problem = None
    if source.get("vast_instance_id") != instance_id:
        problem = f"the snapshot was not taken from vast.ai instance {instance_id} (recorded: {source or 'none'})"
    elif not saved_from or endpoint_text(*saved_from.rsplit(":", 1)) != source["endpoint"]:
        problem = f"snapshot {snapshot_id} says it came from {saved_from}, the job recorded {source['endpoint']}"
    elif bound != instance_id:
        problem = f"machine {machine_id} now runs on instance {bound}, not {instance_id}"
    else:
        instance = ctx.container.vast().show_instance(instance_id)
        own = own_endpoints(instance) if instance is not None else set()
        if own and source["endpoint"] not in own:  # none: stopped or gone, so not someone else's now
            problem = (
                f"vast.ai instance {instance_id} now answers at {', '.join(sorted(own))}, not at "
                f"{source['endpoint']} where the snapshot was taken"
            )
    if problem is not None:
        raise JobFailed(f"{problem}; nothing was destroyed", code="endpoint_mismatch")


def _recheck_idle(ctx: JobContext, machine_id: str, snapshot_id: str) -> None:
    """For a hibernate an idle policy started (`params.idle_guard`): ask the host once more, right before
    the destroy, as the idle rule would. The samples were judged before the snapshot and verify, which
    take minutes on a big workspace: someone who logged in or started a run meanwhile keeps the
    instance. A probe that cannot read the GPUs is busy here too. Raises JobFailed(`no_longer_idle`)."""
    guard = ctx.params.get("idle_guard")
    if not guard:
        return
    from src.jobs.remote import machine_endpoint, run_script, ssh_session
    from src.services.idle import parse_probe

    ctx.progress(phase="idle_recheck")
    with ssh_session(ctx, machine_endpoint(ctx, machine_id)) as session:
        util, sessions, error = parse_probe(run_script(ctx, session, "probe_gpu", {}))
    below = int(guard["gpu_util_below"])
    why = None
    if util is None:
        why = f"the GPUs could not be read ({error})"
    elif max(util) >= below:
        why = f"a GPU reads {max(util)}% (not below {below}%)"
    elif guard.get("respect_ssh_sessions", True) and sessions != 0:
        why = "an interactive SSH session is open" if sessions else "SSH sessions could not be counted"
    if why is not None:
        raise JobFailed(
            f"{why} right before the destroy: the machine is no longer idle; snapshot {snapshot_id} "
            "is kept and nothing was destroyed",
            code="no_longer_idle",
        )


def hollow_reason(*, files: int | None, raw_bytes: int | None, scan: dict[str, Any] | None) -> str | None:
    """Why a snapshot is too empty to destroy its source for, or None. `scan` is the host's pre-scan
    ({"entries", "bytes"}, same excludes), absent for snapshots taken before it was reported."""
    if not files:
        return "the snapshot holds no files (an empty or unmounted workspace, or excludes that match everything)"
    entries, scanned = (scan or {}).get("entries") or 0, (scan or {}).get("bytes") or 0
    if files < entries * HOLLOW_RATIO:
        return f"the snapshot holds {files} entries, the workspace scan found {entries}"
    if (raw_bytes or 0) < scanned * HOLLOW_RATIO:
        return f"the snapshot holds {raw_bytes} bytes, the workspace scan found {scanned}"
    return None


def _refuse_hollow(ctx: JobContext, snap: dict[str, Any]) -> None:
    reason = hollow_reason(files=snap["files"], raw_bytes=snap["raw_bytes"], scan=ctx.state.get("scan"))
    if reason is not None:
        raise JobFailed(
            f"{reason}; snapshot {snap['id']} is kept and nothing was destroyed (destroy_after: "
            "false takes such a snapshot without destroying)",
            code="hollow_snapshot",
        )


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
        add_event(
            s,
            machine.id,
            "hibernate_failed",
            f"destroy of instance {state['destroying']} not confirmed: {job.error_code}: {job.error_message}",
            job_id=job.id,
        )
    else:
        machine.status = "running"
        add_event(
            s,
            machine.id,
            "hibernate_failed",
            f"{job.error_code}: {job.error_message}; instance left running",
            job_id=job.id,
        )


KIND = JobKind("hibernate", hibernate, rerunnable=True, on_end=_hibernate_ended)
