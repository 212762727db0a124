"""Plain-data views of rows: what services return and the API serialises."""

from __future__ import annotations

import datetime as dt
from typing import Any

from src.manifest import decode_needs
from src.models import Job, Machine, MachineEvent, Snapshot


def iso(value: dt.datetime | None) -> str | None:
    """RFC 3339 in UTC. SQLite hands back naive datetimes; every datetime we store is UTC."""
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def job_view(job: Job) -> dict[str, Any]:
    error = {"code": job.error_code, "message": job.error_message or ""} if job.error_code else None
    return {
        "id": job.id,
        "kind": job.kind,
        "status": job.status,
        "phase": job.phase,
        "progress": {
            "bytes_done": job.bytes_done,
            "bytes_total": job.bytes_total,
            "parts_done": job.parts_done,
            "parts_total": job.parts_total,
        },
        "result": job.result,
        "error": error,
        "machine_id": job.machine_id,
        "snapshot_id": job.snapshot_id,
        "attempts": job.attempts,
        "cancel_requested": job.cancel_requested,
        "remote_tries": (job.state or {}).get("remote_tries"),
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "finished_at": iso(job.finished_at),
    }


def snapshot_view(snap: Snapshot) -> dict[str, Any]:
    ratio = None
    if snap.raw_bytes and snap.stored_bytes:
        ratio = round(snap.raw_bytes / snap.stored_bytes, 4)
    error = {"code": snap.error_code, "message": snap.error_message or ""} if snap.error_code else None
    return {
        "id": snap.id,
        "name": snap.name,
        "instance_id": snap.machine_id,
        "status": snap.status,
        "workspace_path": snap.workspace_path,
        "source_host": snap.source_host,
        "storage_prefix": snap.storage_prefix,
        "codec": snap.codec or snap.requested_codec,
        # nvcomp-ans parts decode on an NVIDIA GPU only (CUDA 12+): wake rents only such hosts
        "requires_gpu": decode_needs(snap.codec or snap.requested_codec)["requires_gpu"],
        "parts": snap.part_count,
        "part_size": snap.part_size,
        "raw_bytes": snap.raw_bytes,
        "stored_bytes": snap.stored_bytes,
        "ratio": ratio,
        "file_count": snap.file_count,
        "manifest_sha256": snap.manifest_sha256,
        "format": snap.format or 1,
        "chunks_new": snap.chunks_new,
        "chunks_reused": snap.chunks_reused,
        "bytes_uploaded": snap.bytes_uploaded,
        "parent_id": snap.parent_id,
        "excludes": snap.excludes or [],
        "durations": snap.timings or {},
        "duration_s": snap.duration_s,
        "error": error,
        "created_at": iso(snap.created_at),
        "completed_at": iso(snap.completed_at),
        "verified_at": iso(snap.verified_at),
    }


def machine_view(
    machine: Machine,
    *,
    events: list[MachineEvent] | None = None,
    active_job_id: str | None = None,
    store_bytes: int | None = None,
) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": machine.id,
        "status": machine.status,
        "vast_instance_id": machine.vast_instance_id,
        "ssh_host": machine.ssh_host,
        "ssh_port": machine.ssh_port,
        "ssh_user": machine.ssh_user,
        "host_key_pinned": machine.host_key is not None,
        "workspace_path": machine.workspace_path,
        "last_snapshot_id": machine.last_snapshot_id,
        "gpu_name": machine.gpu_name,
        "active_job_id": active_job_id,
        "store_bytes": store_bytes,
        "created_at": iso(machine.created_at),
        "updated_at": iso(machine.updated_at),
    }
    if events is not None:
        view["events"] = [
            {"kind": e.kind, "message": e.message, "job_id": e.job_id, "data": e.data, "at": iso(e.created_at)}
            for e in events
        ]
    return view
