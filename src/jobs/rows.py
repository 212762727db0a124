"""The rows jobs work on, read as plain dicts and updated in short transactions: machines (with their
event history) and snapshots. Every write is fenced (`ctx.owned()`): it happens only while this attempt
owns the job, in the same transaction as that check, else JobLost."""

from __future__ import annotations

from typing import Any

from src.db import transaction
from src.errors import JobFailed
from src.jobs.context import JobContext
from src.models import Machine, Snapshot
from src.services.machines import add_event


def set_machine(
    ctx: JobContext,
    machine_id: str,
    *,
    event: tuple[str, str] | None = None,
    data: dict[str, Any] | None = None,
    no_return: str | None = None,
    save: dict[str, Any] | None = None,
    **values: Any,
) -> None:
    """Update the machine's columns (`values`) and append `event` (kind, message). Raises JobLost when
    this attempt no longer owns the job (nothing is written). `no_return` and `save` go to `ctx.owned`:
    the job's point of no return and steps recorded in the same transaction as the machine's change."""
    with ctx.owned(no_return=no_return, **(save or {})) as s:
        machine = s.get(Machine, machine_id)
        if machine is None:
            return
        for key, value in values.items():
            setattr(machine, key, value)
        if event is not None:
            add_event(s, machine_id, event[0], event[1], job_id=ctx.job_id, data=data)


def machine_fields(ctx: JobContext, machine_id: str) -> dict[str, Any]:
    with transaction(ctx.container.session_factory) as s:
        m = s.get(Machine, machine_id)
        if m is None:
            return {}
        return {
            "id": m.id,
            "status": m.status,
            "vast_instance_id": m.vast_instance_id,
            "ssh_host": m.ssh_host,
            "ssh_port": m.ssh_port,
            "ssh_user": m.ssh_user,
            "host_key": m.host_key,
            "gpu_name": m.gpu_name,
            "workspace_path": m.workspace_path,
        }


def find_snapshot(ctx: JobContext, snapshot_id: str) -> dict[str, Any] | None:
    """The snapshot's fields, or None when the row is gone."""
    with transaction(ctx.container.session_factory) as s:
        row = s.get(Snapshot, snapshot_id)
        return None if row is None else snapshot_row(row)


def snapshot_fields(ctx: JobContext, snapshot_id: str) -> dict[str, Any]:
    """The snapshot's fields. Raises JobFailed(`not_found`) when the row is gone."""
    snap = find_snapshot(ctx, snapshot_id)
    if snap is None:
        raise JobFailed(f"snapshot {snapshot_id} no longer exists", code="not_found")
    return snap


def snapshot_row(row: Snapshot) -> dict[str, Any]:
    return {
        "id": row.id,
        "status": row.status,
        "machine_id": row.machine_id,
        "workspace_path": row.workspace_path,
        "storage_prefix": row.storage_prefix,
        "requested_codec": row.requested_codec,
        "excludes": list(row.excludes or []),
        "codec": row.codec,
        "parts": row.part_count,
        "part_size": row.part_size,
        "raw_bytes": row.raw_bytes,
        "stored_bytes": row.stored_bytes,
        "files": row.file_count,
        "manifest_sha256": row.manifest_sha256,
        "duration_s": row.duration_s,
        "format": row.format or 1,
        "chunks_new": row.chunks_new,
        "chunks_reused": row.chunks_reused,
        "bytes_uploaded": row.bytes_uploaded,
    }


def set_snapshot(ctx: JobContext, snapshot_id: str, **values: Any) -> None:
    """Update the snapshot's columns, fenced like `set_machine`."""
    with ctx.owned() as s:
        row = s.get(Snapshot, snapshot_id)
        if row is not None:
            for key, value in values.items():
                setattr(row, key, value)
