"""Job kinds that move a workspace over SSH: create a snapshot from a host, restore one onto a host."""
from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from src.db import transaction
from src.errors import JobFailed
from src.jobs.context import JobContext
from src.jobs.host_tools import host_s5cmd
from src.jobs.kinds import JobKind
from src.jobs.remote import Endpoint, machine_endpoint, run_script, ssh_session, storage_params
from src.jobs.rows import set_snapshot, snapshot_fields, snapshot_row
from src.jobs.storage_jobs import check_objects
from src.models import Job, Machine, Snapshot, utcnow
from src.services.machines import add_event


def create_snapshot(ctx: JobContext) -> dict[str, Any]:
    """The `create_snapshot` job: snapshot the machine's workspace over SSH."""
    snap = snapshot_fields(ctx, ctx.params["snapshot_id"])
    if snap["status"] == "complete":
        return _summary(snap)
    return take_snapshot(ctx, snap["id"], machine_endpoint(ctx, snap["machine_id"]))


def take_snapshot(ctx: JobContext, snapshot_id: str, endpoint: Endpoint) -> dict[str, Any]:
    """Snapshot the workspace at `endpoint` into the snapshot's prefix, then check the bucket holds what
    the manifest lists before calling the snapshot `complete`. Re-runnable: a complete snapshot is
    reported as is, and a re-run of the remote script uploads only the parts that are missing."""
    snap = snapshot_fields(ctx, snapshot_id)
    if snap["status"] == "complete":
        return _summary(snap)
    set_snapshot(ctx, snap["id"], status="running", error_code=None, error_message=None)
    params = {
        "workspace_path": snap["workspace_path"], "s3": storage_params(ctx), "prefix": snap["storage_prefix"],
        "snapshot_id": snap["id"], "instance_id": snap["machine_id"], "codec": snap["requested_codec"],
        "part_size": ctx.settings.snapshot_part_size_mb << 20, "parallelism": ctx.settings.snapshot_parallelism,
        "excludes": snap["excludes"],
    }
    with ssh_session(ctx, endpoint) as session:
        params["s5cmd"], s5cmd_used = host_s5cmd(ctx, session)
        result = run_script(ctx, session, "snapshot", params)
    ctx.progress(phase="verify")
    check_objects(ctx, prefix=snap["storage_prefix"], manifest_sha256=result.get("manifest_sha256"), deep=False)
    timings = dict(result.get("timings") or {})
    with transaction(ctx.container.session_factory) as s:
        row = s.get(Snapshot, snap["id"])
        assert row is not None
        row.status, row.completed_at, row.verified_at = "complete", utcnow(), utcnow()
        row.source_host = f"{endpoint.host}:{endpoint.port}"
        row.codec = result.get("codec")
        row.part_count, row.part_size = result.get("parts"), result.get("part_size")
        row.raw_bytes, row.stored_bytes = result.get("raw_bytes"), result.get("stored_bytes")
        row.file_count, row.manifest_sha256 = result.get("files"), result.get("manifest_sha256")
        row.timings, row.duration_s = timings, result.get("duration_s")
        machine = s.get(Machine, snap["machine_id"])
        if machine is not None:
            machine.last_snapshot_id = snap["id"]
        add_event(s, snap["machine_id"], "snapshot_complete",
                  f"snapshot {snap['id']}: {result.get('raw_bytes')} bytes in {result.get('parts')} parts",
                  job_id=ctx.job_id)
        warnings = [str(w) for w in result.get("warnings") or []]
        for warning in warnings:  # e.g. no compressor on the host: parts stored uncompressed
            add_event(s, snap["machine_id"], "snapshot_warning", warning, job_id=ctx.job_id)
        summary = _summary(snapshot_row(row))
    summary.update(uploaded_parts=result.get("uploaded_parts"), skipped_parts=result.get("skipped_parts"),
                   warnings=warnings, codec_fallback=result.get("codec_fallback"), s5cmd=s5cmd_used)
    return summary


def _create_ended(s: Session, job: Job) -> None:
    mark_snapshot_failed_unless_complete(s, job)


def mark_snapshot_failed_unless_complete(s: Session, job: Job) -> None:
    """A snapshot whose job did not succeed is `failed` and never listed as restorable."""
    if job.status == "succeeded" or not job.snapshot_id:
        return
    snap = s.get(Snapshot, job.snapshot_id)
    if snap is not None and snap.status != "complete":
        snap.status = "failed"
        snap.error_code, snap.error_message = job.error_code, job.error_message
        add_event(s, snap.machine_id, "snapshot_failed", f"snapshot {snap.id}: {job.error_code}", job_id=job.id)


def restore_snapshot(ctx: JobContext) -> dict[str, Any]:
    """The `restore_snapshot` job: restore onto the job's machine over SSH."""
    snap = snapshot_fields(ctx, ctx.params["snapshot_id"])
    assert ctx.machine_id is not None
    return restore_onto(ctx, snap, machine_endpoint(ctx, ctx.machine_id), ctx.params["workspace_path"])


def restore_onto(ctx: JobContext, snap: dict[str, Any], endpoint: Endpoint, workspace: str) -> dict[str, Any]:
    """Restore `snap` into `workspace` at `endpoint`. The remote script verifies every part before it
    decompresses it and swaps the workspace in only when all of it is extracted, so a failed or re-run
    restore never leaves a half-written workspace."""
    if snap["status"] != "complete":
        raise JobFailed(f"snapshot {snap['id']} is {snap['status']}, not complete", code="snapshot_not_complete")
    params = {"workspace_path": workspace, "s3": storage_params(ctx), "prefix": snap["storage_prefix"],
              "parallelism": ctx.settings.snapshot_parallelism,
              # The script refuses a manifest other than the one recorded at completion; with that chain
              # (manifest digest -> part digests) the archive is exactly what our snapshot read, so
              # the workspace's own symlinks to outside it (a venv's bin/python -> /usr/bin/python3)
              # are restored as they were. Nothing is ever extracted through such a link.
              "manifest_sha256": snap["manifest_sha256"], "allow_external_symlinks": bool(snap["manifest_sha256"])}
    with ssh_session(ctx, endpoint) as session:
        params["s5cmd"], s5cmd_used = host_s5cmd(ctx, session)
        result = run_script(ctx, session, "restore", params)
    with transaction(ctx.container.session_factory) as s:
        machine = s.get(Machine, endpoint.machine_id)
        if machine is not None:
            machine.workspace_path = workspace
        add_event(s, endpoint.machine_id, "restored", f"snapshot {snap['id']} restored into {workspace}",
                  job_id=ctx.job_id)
    return {"snapshot_id": snap["id"], "workspace_path": workspace, "raw_bytes": result.get("raw_bytes"),
            "files": result.get("files"), "parts": result.get("parts"), "duration_s": result.get("duration_s"),
            "s5cmd": s5cmd_used}


def _summary(snap: dict[str, Any]) -> dict[str, Any]:
    keys = ("codec", "parts", "part_size", "raw_bytes", "stored_bytes", "files", "manifest_sha256", "duration_s")
    return {"snapshot_id": snap["id"], **{k: snap[k] for k in keys}}


KINDS = [
    JobKind("create_snapshot", create_snapshot, rerunnable=True, on_end=_create_ended),
    # A restore extracts into a staging directory and swaps at the end: running it again is safe.
    JobKind("restore_snapshot", restore_snapshot, rerunnable=True),
]
