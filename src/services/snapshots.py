"""Snapshots: create, restore, verify and delete them (each starts a job), and read them."""

from __future__ import annotations

from collections.abc import Collection
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from src.db import transaction
from src.errors import Conflict, NotFound
from src.models import Job, Machine, Snapshot, new_id
from src.services import jobs as job_service
from src.services.jobs import Idempotency
from src.services.machines import add_event, ensure_machine, machine_id_for, resolve_alias
from src.services.pagination import Page, fetch_page
from src.services.path_policy import check_excludes, check_restore_path
from src.services.views import job_view, snapshot_view

if TYPE_CHECKING:
    from src.container import Container

RESTORABLE = "complete"
# Machines in these states have no instance of their own to fall back on (or may not: `error` is a
# destroy that was never confirmed), so the snapshot they would wake from is their workspace.
NEEDS_SNAPSHOT = ("hibernated", "waking", "error")


@job_service.settle_idempotency_race(lambda s, job: (snapshot_view(_snapshot(s, job.snapshot_id)), job_view(job)))
def create_snapshot(
    c: Container,
    *,
    instance_id: str,
    ssh_host: str,
    ssh_port: int,
    workspace_path: str,
    ssh_user: str | None = None,
    name: str | None = None,
    codec: str = "auto",
    excludes: list[str] | None = None,
    idem: Idempotency | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start a `create_snapshot` job for the workspace at `ssh_host`. Returns (snapshot, job).
    Raises Unprocessable when the host is outside SSH_ALLOWED_NETWORKS, Conflict when another operation
    holds the machine or it is hibernated (or waking, or `error`), Unprocessable(`exclude_matches_root`)
    for an exclude that would empty the snapshot, NotConfigured (no bucket). With the same Idempotency-Key
    and body, returns the first request's pair."""
    excludes = check_excludes(excludes)
    c.object_store()  # NotConfigured (503) now, not a job that fails later
    c.ssh_policy().check(ssh_host)
    with transaction(c.session_factory) as s:
        replay = job_service.find_replay(s, idem)
        if replay is not None:
            return snapshot_view(_snapshot(s, replay.snapshot_id)), job_view(replay)
        instance_id = resolve_alias(s, instance_id)
        existing = s.get(Machine, instance_id)
        if existing is not None and existing.status in NEEDS_SNAPSHOT:
            # Its newest complete snapshot is what it wakes from: a snapshot of some other endpoint
            # under its id would take that place (and leave the real one unprotected from deletion).
            raise Conflict(
                f"machine {instance_id} is {existing.status}: its workspace is in its snapshot, not "
                "on a host; wake it first",
                code=f"machine_{existing.status}",
            )
        machine = ensure_machine(
            s, machine_id=instance_id, host=ssh_host, port=ssh_port, user=ssh_user, workspace_path=workspace_path
        )
        snap, job = start_snapshot_job(
            s,
            c,
            machine_id=machine.id,
            workspace_path=workspace_path,
            name=name,
            codec=codec,
            excludes=excludes or [],
            idem=idem,
        )
        result = snapshot_view(snap), job_view(job)
    c.queue.enqueue(job.id)
    return result


def start_snapshot_job(
    s: Session,
    c: Container,
    *,
    machine_id: str,
    workspace_path: str,
    name: str | None,
    codec: str,
    excludes: list[str],
    idem: Idempotency | None = None,
    kind: str = "create_snapshot",
    params: dict[str, Any] | None = None,
) -> tuple[Snapshot, Job]:
    """Insert a pending snapshot and the job that fills it (also used by hibernate)."""
    snap_id = new_id("snap")
    snap = Snapshot(
        id=snap_id,
        name=name,
        machine_id=machine_id,
        status="pending",
        workspace_path=workspace_path,
        storage_prefix=f"{c.settings.snapshot_prefix}{machine_id}/{snap_id}/",
        requested_codec=codec,
        excludes=excludes,
        format=c.settings.snapshot_format,
    )
    s.add(snap)
    job = job_service.add_job(
        s,
        kind=kind,
        params={"snapshot_id": snap_id, **(params or {})},
        lock_key=f"machine:{machine_id}",
        machine_id=machine_id,
        snapshot_id=snap_id,
        idem=idem,
    )
    add_event(s, machine_id, f"{kind}_requested", f"snapshot {snap_id} of {workspace_path}", job_id=job.id)
    return snap, job


@job_service.settle_idempotency_race(lambda _s, job: job_view(job))
def restore_snapshot(
    c: Container,
    snapshot_id: str,
    *,
    ssh_host: str,
    ssh_port: int,
    workspace_path: str,
    ssh_user: str | None = None,
    instance_id: str | None = None,
    overwrite: bool = False,
    keep_setuid: bool = False,
    idem: Idempotency | None = None,
) -> dict[str, Any]:
    """Start a `restore_snapshot` job onto `ssh_host` (`keep_setuid`: restore setuid/setgid bits,
    cleared by default). Raises NotFound, Conflict (snapshot not complete, or the target machine busy),
    Unprocessable (host not allowed; `system_path`), NotConfigured (no bucket). Without `overwrite` the
    job fails with `workspace_exists` when the destination is not empty (only the host can tell)."""
    check_restore_path(workspace_path)
    c.object_store()
    c.ssh_policy().check(ssh_host)
    with transaction(c.session_factory) as s:
        replay = job_service.find_replay(s, idem)
        if replay is not None:
            return job_view(replay)
        snap = _snapshot(s, snapshot_id, lock=True)
        _require_restorable(snap)
        _require_no_delete(s, snap.id)
        target = resolve_alias(s, machine_id_for(instance_id=instance_id, host=ssh_host, port=ssh_port))
        ensure_machine(s, machine_id=target, host=ssh_host, port=ssh_port, user=ssh_user)
        job = job_service.add_job(
            s,
            kind="restore_snapshot",
            params={
                "snapshot_id": snap.id,
                "workspace_path": workspace_path,
                "overwrite": overwrite,
                "keep_setuid": keep_setuid,
            },
            lock_key=f"machine:{target}",
            machine_id=target,
            snapshot_id=snap.id,
            idem=idem,
        )
        add_event(s, target, "restore_requested", f"restore {snap.id} into {workspace_path}", job_id=job.id)
        view = job_view(job)
    c.queue.enqueue(view["id"])
    return view


@job_service.settle_idempotency_race(lambda _s, job: job_view(job))
def verify_snapshot(
    c: Container, snapshot_id: str, *, deep: bool = False, idem: Idempotency | None = None
) -> dict[str, Any]:
    """Start a `verify_snapshot` job. Raises NotFound; Conflict when the snapshot is not complete or
    is being verified or deleted; NotConfigured (no bucket)."""
    c.object_store()
    with transaction(c.session_factory) as s:
        replay = job_service.find_replay(s, idem)
        if replay is not None:
            return job_view(replay)
        snap = _snapshot(s, snapshot_id)
        _require_restorable(snap)
        job = job_service.add_job(
            s,
            kind="verify_snapshot",
            params={"snapshot_id": snap.id, "deep": deep},
            lock_key=f"snapshot:{snap.id}",
            snapshot_id=snap.id,
            machine_id=None,
            idem=idem,
        )
        view = job_view(job)
    c.queue.enqueue(view["id"])
    return view


@job_service.settle_idempotency_race(lambda _s, job: job_view(job))
def delete_snapshot(
    c: Container, snapshot_id: str, *, force: bool = False, idem: Idempotency | None = None
) -> dict[str, Any]:
    """Start a `delete_snapshot` job (objects first, then the record). Raises NotFound; Conflict
    (`snapshot_busy`) while a job creates, restores, wakes from or verifies this snapshot, and
    (`snapshot_needed`) when it is the snapshot a hibernated machine would wake from, unless `force`;
    NotConfigured (no bucket to delete its objects from)."""
    c.object_store()
    with transaction(c.session_factory) as s:
        replay = job_service.find_replay(s, idem)
        if replay is not None:
            return job_view(replay)
        snap = _snapshot(s, snapshot_id, lock=True)
        check_deletable(s, snap.id, force=force, was_restorable=snap.status == RESTORABLE)
        job = job_service.add_job(
            s,
            kind="delete_snapshot",
            params={"snapshot_id": snap.id, "previous_status": snap.status, "force": force},
            lock_key=f"snapshot:{snap.id}",
            snapshot_id=snap.id,
            idem=idem,
        )
        snap.status = "deleting"
        view = job_view(job)
    c.queue.enqueue(view["id"])
    return view


def get_snapshot(c: Container, snapshot_id: str) -> dict[str, Any]:
    with transaction(c.session_factory) as s:
        return snapshot_view(_snapshot(s, snapshot_id))


def list_snapshots(
    c: Container,
    *,
    instance_id: str | None = None,
    status: str | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> Page:
    """Newest first; `cursor` is the previous page's `next_cursor`."""
    query = select(Snapshot)
    if instance_id:
        query = query.where(Snapshot.machine_id == instance_id)
    if status:
        query = query.where(Snapshot.status == status)
    return fetch_page(
        c.session_factory,
        query,
        id_column=Snapshot.id,
        limit=limit,
        cursor=cursor,
        view=lambda _s, snap: snapshot_view(snap),
    )


def latest_complete(s: Session, machine_id: str) -> Snapshot | None:
    return s.scalar(
        select(Snapshot)
        .where(Snapshot.machine_id == machine_id, Snapshot.status == RESTORABLE)
        .order_by(Snapshot.id.desc())
        .limit(1)
    )


def snapshots_needed_by_machines(s: Session, *, assume_restorable: Collection[str] = ()) -> dict[str, list[str]]:
    """{snapshot id: [machine ids]} for every snapshot that a machine without a live instance of its own
    (status in NEEDS_SNAPSHOT) would wake from: its newest snapshot that ever completed, which is what
    `wake` picks by default. Deleting one loses that workspace for good, so DELETE (unless forced), the delete
    job and any retention or garbage collection must leave these alone. `assume_restorable`: ids to
    count as complete whatever their status (a delete in progress asks "was this the one?")."""
    # Once complete counts: a verify that failed once (a part briefly missing, a flaky store) marks the
    # snapshot `failed`, and it may still be the only copy of the workspace, so it stays protected.
    restorable = or_(Snapshot.status == RESTORABLE, Snapshot.completed_at.is_not(None))
    if assume_restorable:
        restorable = or_(restorable, Snapshot.id.in_(list(assume_restorable)))
    newest = (
        select(Snapshot.machine_id.label("machine_id"), func.max(Snapshot.id).label("snapshot_id"))
        .where(restorable)
        .group_by(Snapshot.machine_id)
        .subquery()
    )
    rows = s.execute(
        select(newest.c.snapshot_id, Machine.id)
        .join(Machine, Machine.id == newest.c.machine_id)
        .where(Machine.status.in_(NEEDS_SNAPSHOT))
    )
    needed: dict[str, list[str]] = {}
    for snapshot_id, machine_id in rows:
        needed.setdefault(snapshot_id, []).append(machine_id)
    return needed


def check_deletable(
    s: Session, snapshot_id: str, *, force: bool, was_restorable: bool, job_id: str | None = None
) -> None:
    """Raise Conflict unless the snapshot may be deleted now: `snapshot_busy` while another job (not
    `job_id`) uses it, whatever `force` says; `snapshot_needed` (unless `force`) when a machine would
    wake from it. Called by the request and again by the delete job right before it removes objects."""
    query = select(Job.id).where(Job.snapshot_id == snapshot_id, Job.status.in_(job_service.ACTIVE))
    if job_id is not None:
        query = query.where(Job.id != job_id)
    busy = s.scalar(query.limit(1))
    if busy is not None:
        raise Conflict(f"job {busy} is using snapshot {snapshot_id}; cancel it or wait", code="snapshot_busy")
    if force:
        return
    machines = snapshots_needed_by_machines(s, assume_restorable=[snapshot_id] if was_restorable else ()).get(
        snapshot_id
    )
    if machines:
        raise Conflict(
            f"snapshot {snapshot_id} is what machine {', '.join(sorted(machines))} would wake from "
            "(its only copy of the workspace); wake it first, or delete with force=true",
            code="snapshot_needed",
        )


def _snapshot(s: Session, snapshot_id: str | None, *, lock: bool = False) -> Snapshot:
    # lock: a row lock (PostgreSQL) so a restore and a delete of one snapshot cannot both pass their checks
    snap = s.get(Snapshot, snapshot_id, with_for_update=lock) if snapshot_id else None
    if snap is None:
        raise NotFound(f"snapshot {snapshot_id} not found")
    return snap


def _require_restorable(snap: Snapshot) -> None:
    if snap.status != RESTORABLE:
        raise Conflict(f"snapshot {snap.id} is {snap.status}, not complete", code="snapshot_not_complete")


def _require_no_delete(s: Session, snapshot_id: str) -> None:
    holder = s.scalar(select(Job.id).where(Job.lock_key == f"snapshot:{snapshot_id}"))
    if holder is not None:
        raise Conflict(f"job {holder} holds snapshot {snapshot_id}", code="snapshot_busy")
