"""Hibernate, wake, pause and resume a machine: each checks the machine can do it now and starts a job."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session

from src.db import transaction
from src.errors import Conflict, ExternalError, NotFound, Unprocessable
from src.jobs.hibernate import endpoint_text, own_endpoints
from src.jobs.wake import required_disk_gb
from src.manifest import decode_needs
from src.models import Machine, Snapshot
from src.services import jobs as job_service
from src.services.jobs import Idempotency
from src.services.machines import add_event, ensure_machine, find_machine, vast_instance_id_of
from src.services.path_policy import check_excludes, check_restore_path
from src.services.snapshots import latest_complete, start_snapshot_job
from src.services.views import job_view
from src.services.wake_queue import admit_wakes, mark_waiting

if TYPE_CHECKING:
    from src.container import Container

_BUSY_STATES = {
    "hibernated": "is hibernated: wake it first",
    "paused": "is paused: resume it first",
    "waking": "is waking",
    "hibernating": "is hibernating",
}


@job_service.settle_idempotency_race(lambda _s, job: job_view(job))
def hibernate(
    c: Container,
    machine_id: str,
    *,
    workspace_path: str,
    ssh_host: str | None = None,
    ssh_port: int | None = None,
    ssh_user: str | None = None,
    destroy_after: bool = True,
    codec: str = "auto",
    excludes: list[str] | None = None,
    deep_verify: bool = False,
    idle_guard: dict[str, Any] | None = None,
    idem: Idempotency | None = None,
) -> dict[str, Any]:
    """Start a `hibernate` job: snapshot, verify, then (destroy_after) destroy the vast.ai instance.
    A machine not seen before is registered; its id is taken as its vast.ai instance id when numeric.
    Raises Conflict (busy, hibernated, paused), Unprocessable (nothing to destroy, host not allowed,
    `exclude_matches_root`, `system_path` for a workspace wake could not restore into, and
    `endpoint_mismatch` when the instance to destroy is not the one at ssh_host:ssh_port), NotFound
    (unknown machine and no SSH endpoint given), NotConfigured (no bucket; no vast.ai key when the
    instance is to be destroyed or its endpoint asked of vast.ai) - at request time, not in the job.
    `idle_guard` ({"gpu_util_below", "respect_ssh_sessions"}, from an idle policy): the job probes the
    host again right before the destroy and fails `no_longer_idle` when it is not idle any more."""
    excludes = check_excludes(excludes)
    if destroy_after:
        check_restore_path(workspace_path, what="workspace_path (where wake will restore it)")
    c.object_store()
    if destroy_after or ssh_host is None:
        c.vast()
    if ssh_host is not None:
        c.ssh_policy().check(ssh_host)
        if ssh_port is None:
            ssh_port = 22
        if destroy_after:
            _check_endpoint_is_the_instance(c, machine_id, ssh_host, ssh_port)
    with transaction(c.session_factory) as s:
        replay = job_service.find_replay(s, idem)
        if replay is not None:
            return job_view(replay)
        machine = _machine_for_hibernate(s, c, machine_id, host=ssh_host, port=ssh_port, user=ssh_user)
        _require_not(machine, _BUSY_STATES)
        if destroy_after and machine.vast_instance_id is None:
            raise Unprocessable(
                f"machine {machine.id} has no vast.ai instance to destroy; use destroy_after: false to snapshot only",
                code="no_vast_instance",
            )
        if machine.ssh_host is None and machine.vast_instance_id is None:
            raise Unprocessable(
                "give ssh_host and ssh_port: the machine's SSH endpoint is unknown", code="no_ssh_endpoint"
            )
        _, job = start_snapshot_job(
            s,
            c,
            machine_id=machine.id,
            workspace_path=workspace_path,
            name="hibernate",
            codec=codec,
            excludes=excludes or [],
            idem=idem,
            kind="hibernate",
            params={
                "destroy_after": destroy_after,
                "deep_verify": deep_verify,
                "idle_guard": idle_guard,
                "requested_endpoint": [ssh_host, ssh_port] if ssh_host else None,
            },
        )
        machine.status = "hibernating"
        machine.workspace_path = workspace_path
        view = job_view(job)
    c.queue.enqueue(view["id"])
    return view


@job_service.settle_idempotency_race(lambda _s, job: job_view(job))
def wake(
    c: Container,
    machine_id: str,
    *,
    snapshot_id: str | None = None,
    gpu_type: str | None = None,
    num_gpus: int | None = None,
    region: str | None = None,
    max_price: float | None = None,
    disk_gb: int | None = None,
    image: str | None = None,
    workspace_path: str | None = None,
    priority: int = 5,
    idem: Idempotency | None = None,
) -> dict[str, Any]:
    """Start a `wake` job: rent an instance that fits and restore `snapshot_id` (default: the machine's
    latest complete snapshot) onto it. The job waits in the wake queue (phase `wake_queued`) while
    WAKE_CONCURRENCY wakes run, `priority` (0-9) highest first. GPU type, GPU count and image default to the
    machine's own, as recorded when it was rented or hibernated. A snapshot with GPU-only parts (nvcomp-ans)
    rents only hosts whose driver runs CUDA >= its `min_cuda` (offer filter `cuda_max_good`): nothing that
    cannot decode it is rented. Raises NotFound, Conflict (not hibernated, no snapshot), Unprocessable
    (disk_gb too small for the snapshot), NotConfigured (no vast.ai key)."""
    c.vast()  # NotConfigured now, not in a job later
    with transaction(c.session_factory) as s:
        replay = job_service.find_replay(s, idem)
        if replay is not None:
            return job_view(replay)
        machine = find_machine(s, machine_id)
        if machine.status != "hibernated":
            raise Conflict(
                f"machine {machine.id} is {machine.status}; only a hibernated machine can be woken",
                code="machine_not_hibernated",
            )
        snap = s.get(Snapshot, snapshot_id) if snapshot_id else latest_complete(s, machine.id)
        if snap is None:
            raise (
                NotFound(f"snapshot {snapshot_id} not found")
                if snapshot_id
                else Conflict(f"machine {machine.id} has no complete snapshot to wake from", code="no_snapshot")
            )
        if snap.status != "complete":
            raise Conflict(f"snapshot {snap.id} is {snap.status}, not complete", code="snapshot_not_complete")
        check_restore_path(
            workspace_path or snap.workspace_path,
            what="workspace_path"
            if workspace_path
            else f"snapshot {snap.id}'s workspace_path (give another workspace_path)",
        )
        needed = required_disk_gb(
            snap.raw_bytes or 0, headroom=c.settings.wake_disk_headroom, image_gb=c.settings.vast_image_disk_gb
        )
        if disk_gb is not None and disk_gb < needed:
            raise Unprocessable(
                f"disk_gb {disk_gb} is too small: snapshot {snap.id} needs at least {needed} GB", code="disk_too_small"
            )
        shape = machine.offer or {}
        params = {
            "snapshot_id": snap.id,
            "gpu_type": gpu_type or machine.gpu_name,
            "num_gpus": num_gpus or shape.get("num_gpus") or 1,
            "region": region,
            "max_price": max_price,
            "disk_gb": disk_gb or needed,
            "image": image or shape.get("image") or c.settings.vast_default_image,
            "workspace_path": workspace_path or snap.workspace_path,
            "ssh_user": machine.ssh_user,
            "min_cuda": decode_needs(snap.codec or snap.requested_codec)["min_cuda"],
        }
        job = job_service.add_job(
            s,
            kind="wake",
            params=params,
            lock_key=f"machine:{machine.id}",
            machine_id=machine.id,
            snapshot_id=snap.id,
            idem=idem,
        )
        mark_waiting(job, priority=priority)
        machine.status = "waking"
        add_event(s, machine.id, "wake_requested", f"wake from {snap.id} (priority {priority})", job_id=job.id)
        view = job_view(job)
    admit_wakes(c)  # enqueues it now when a place is free; else when a running wake ends
    return view


@job_service.settle_idempotency_race(lambda _s, job: job_view(job))
def pause(c: Container, machine_id: str, *, idem: Idempotency | None = None) -> dict[str, Any]:
    """Start a `pause` job (vast.ai stop). Raises NotFound, Conflict unless the machine is running."""
    return _vast_state_job(c, machine_id, kind="pause", required="running", during="pausing", idem=idem)


@job_service.settle_idempotency_race(lambda _s, job: job_view(job))
def resume(c: Container, machine_id: str, *, idem: Idempotency | None = None) -> dict[str, Any]:
    """Start a `resume` job (vast.ai start). Raises NotFound, Conflict unless the machine is paused."""
    return _vast_state_job(c, machine_id, kind="resume", required="paused", during="resuming", idem=idem)


def _vast_state_job(
    c: Container, machine_id: str, *, kind: str, required: str, during: str, idem: Idempotency | None
) -> dict[str, Any]:
    c.vast()
    with transaction(c.session_factory) as s:
        replay = job_service.find_replay(s, idem)
        if replay is not None:
            return job_view(replay)
        machine = find_machine(s, machine_id)
        if machine.vast_instance_id is None:
            raise Conflict(f"machine {machine.id} has no vast.ai instance", code="no_vast_instance")
        if machine.status != required:
            raise Conflict(f"machine {machine.id} is {machine.status}, not {required}", code=f"machine_not_{required}")
        job = job_service.add_job(
            s, kind=kind, params={}, lock_key=f"machine:{machine.id}", machine_id=machine.id, idem=idem
        )
        machine.status = during
        add_event(s, machine.id, f"{kind}_requested", kind, job_id=job.id)
        view = job_view(job)
    c.queue.enqueue(view["id"])
    return view


def _check_endpoint_is_the_instance(c: Container, machine_id: str, host: str, port: int) -> None:
    """Refuse a hibernate whose snapshot would come from one host while another instance is destroyed:
    the endpoint given must be one vast.ai reports for the instance (its proxy or its direct mapping).
    When vast.ai cannot say now (unreachable, instance not running) the job checks before it acts."""
    vast = c.vast()  # NotConfigured now: destroy_after needs vast.ai anyway
    with transaction(c.session_factory) as s:
        try:
            vast_id = find_machine(s, machine_id).vast_instance_id
        except NotFound:
            vast_id = vast_instance_id_of(machine_id)
    if vast_id is None:
        return  # refused below with no_vast_instance
    try:
        instance = vast.show_instance(vast_id)
    except ExternalError:
        return
    own = own_endpoints(instance) if instance is not None else set()
    if own and endpoint_text(host, port) not in own:
        raise Unprocessable(
            f"{host}:{port} is not vast.ai instance {vast_id} (it answers at "
            f"{', '.join(sorted(own))}); hibernate would snapshot one machine and destroy another",
            code="endpoint_mismatch",
        )


def _machine_for_hibernate(
    s: Session, c: Container, machine_id: str, *, host: str | None, port: int | None, user: str | None
) -> Machine:
    try:
        machine = find_machine(s, machine_id)
    except NotFound:
        vast_id = vast_instance_id_of(machine_id)
        if host is None and vast_id is None:
            raise
        machine = ensure_machine(s, machine_id=machine_id, host=host, port=port, user=user)
        if vast_id is not None:
            machine.vast_instance_id = vast_id
        return machine
    return ensure_machine(s, machine_id=machine.id, host=host, port=port, user=user)


def _require_not(machine: Machine, states: dict[str, str]) -> None:
    if machine.status in states:
        raise Conflict(f"machine {machine.id} {states[machine.status]}", code=f"machine_{machine.status}")
