"""Job kinds that move a workspace over SSH: create a snapshot from a host, restore one onto a host."""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from sqlalchemy.orm import Session

from src.db import transaction
from src.errors import ExternalError, GpusnapError, JobFailed
from src.jobs.chunk_index import known_chunks, machine_prefix, record_manifest
from src.jobs.context import JobContext, JobLost
from src.jobs.host_tools import host_s5cmd
from src.jobs.kinds import JobKind
from src.jobs.remote import Endpoint, machine_endpoint, run_script, ssh_session, storage_params
from src.jobs.rows import set_snapshot, snapshot_fields, snapshot_row
from src.jobs.storage_jobs import check_manifest
from src.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest
from src.models import Job, Machine, Snapshot, utcnow
from src.services.machines import add_event

logger = logging.getLogger(__name__)

# Failures after which the same step, run again, may well succeed: the SSH link dropped (the remote script
# sees its stdout close and stops; parts it stored are skipped by the next try), or the bucket kept failing
# reads/writes past the script's own retries. Everything else (auth, integrity, disk full, a timeout whose
# remote process may still run, cancel) ends the job at once.
_RETRYABLE_REMOTE = ("ssh_connection_lost", "ssh_unreachable")
_RETRYABLE_SCRIPT = ("download_failed", "upload_failed")


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
    if snap["status"] == "deleting":  # an earlier attempt failed and is removing what it uploaded
        raise JobFailed(
            f"snapshot {snap['id']} failed and its parts are being removed; take a new snapshot",
            code="snapshot_discarded",
        )
    set_snapshot(ctx, snap["id"], status="running", error_code=None, error_message=None)
    params = {
        "workspace_path": snap["workspace_path"],
        "prefix": snap["storage_prefix"],
        "snapshot_id": snap["id"],
        "instance_id": snap["machine_id"],
        "codec": snap["requested_codec"],
        "part_size": ctx.settings.snapshot_part_size_mb << 20,
        "parallelism": ctx.settings.snapshot_parallelism,
        "excludes": snap["excludes"],
    }
    scope = snap["storage_prefix"]
    if snap["format"] == 2:
        # The host writes into the machine's chunk store (shared by its snapshots) and gets told what the
        # store holds already; credentials reach the machine prefix, not only this snapshot's.
        scope = machine_prefix(snap["storage_prefix"], snap["id"])
        params.update(format=2, store_prefix=scope, known_chunks=known_chunks(ctx, snap["machine_id"], scope))
    params["s3"] = storage_params(ctx, prefix=scope, write=True)
    try:
        result, s5cmd_used = run_remote(ctx, endpoint, "snapshot", params)
        manifest = _verify_uploaded(ctx, snap, result.get("manifest_sha256"))
    except JobLost:
        raise  # another worker owns the job now and resumes the upload: leave its parts alone
    except GpusnapError as e:
        discard_parts(ctx, snap, reason=e.code)
        raise
    timings = dict(result.get("timings") or {})
    with ctx.owned() as s:  # fenced: only while this attempt owns the job
        row = s.get(Snapshot, snap["id"])
        assert row is not None
        row.status, row.completed_at, row.verified_at = "complete", utcnow(), utcnow()
        row.source_host = f"{endpoint.host}:{endpoint.port}"
        row.codec = result.get("codec")
        row.part_count, row.part_size = result.get("parts"), result.get("part_size")
        row.raw_bytes, row.stored_bytes = result.get("raw_bytes"), result.get("stored_bytes")
        row.file_count, row.manifest_sha256 = result.get("files"), manifest.sha256
        row.timings, row.duration_s = timings, result.get("duration_s")
        if manifest.version == 2:
            # What the bucket holds, as checked above, is the record: not what the host said.
            row.part_count, row.part_size = len(manifest.chunks), result.get("part_size")
            row.raw_bytes, row.stored_bytes, row.file_count = manifest.raw_bytes, manifest.stored_bytes, manifest.files
            row.chunks_new, row.chunks_reused = manifest.totals["chunks_new"], manifest.totals["chunks_reused"]
            row.bytes_uploaded = manifest.totals["bytes_uploaded"]
            record_manifest(s, snap["id"], snap["machine_id"], manifest)
        machine = s.get(Machine, snap["machine_id"])
        if machine is not None:
            machine.last_snapshot_id = snap["id"]
        add_event(
            s,
            snap["machine_id"],
            "snapshot_complete",
            f"snapshot {snap['id']}: {row.raw_bytes} bytes in {row.part_count} "
            + (
                f"chunks ({row.chunks_new} new, {row.bytes_uploaded} bytes uploaded)"
                if manifest.version == 2
                else "parts"
            ),
            job_id=ctx.job_id,
        )
        warnings = [str(w) for w in result.get("warnings") or []]
        for warning in warnings:  # e.g. no compressor on the host: parts stored uncompressed
            add_event(s, snap["machine_id"], "snapshot_warning", warning, job_id=ctx.job_id)
        summary = _summary(snapshot_row(row))
    summary.update(
        uploaded_parts=result.get("uploaded_parts"),
        skipped_parts=result.get("skipped_parts"),
        scan=result.get("scan"),
        remote_tries=ctx.state.get("remote_tries", 1),
        warnings=warnings,
        codec_fallback=result.get("codec_fallback"),
        s5cmd=s5cmd_used,
        tuning=_tuning(result),
    )
    return summary


def run_remote(
    ctx: JobContext, endpoint: Endpoint, name: str, params: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run remote script `name` on a fresh SSH session with the host's s5cmd, or ours shipped to it
    (`host_tools.host_s5cmd`); returns (the script's result, which s5cmd it used). Up to `REMOTE_TRIES`
    times when the link drops or the bucket keeps failing (backoff `REMOTE_RETRY_BACKOFF_S`, doubled each
    time). Every try gets the same
    parameters (same snapshot id and prefix), so a snapshot resumes and skips the parts already stored, and
    a restore starts again in a fresh staging directory. The try in progress is saved in the job's state
    (`remote_tries`) and shown as phase `retry_wait` between tries; a cancel is honoured during the wait."""
    tries = max(1, int(ctx.settings.remote_tries))
    attempt = int(ctx.state.get("remote_tries") or 1)
    while True:
        ctx.check_cancelled()
        try:
            with ssh_session(ctx, endpoint) as session:
                s5cmd_path, s5cmd_used = host_s5cmd(ctx, session)
                # The newest (attempt, try) wins on the host: an older run of this step still going there
                # (a frozen worker's, a hung link's) is stopped before this one touches the prefix or the
                # workspace (gs_runlock).
                run_lock = {
                    "name": f"{name}-{params.get('snapshot_id') or params.get('restore_id')}",
                    "rank": [ctx.attempt, attempt],
                }
                return run_script(ctx, session, name, {**params, "s5cmd": s5cmd_path, "run_lock": run_lock}), s5cmd_used
        except (ExternalError, JobFailed) as e:
            transient = (e.code in _RETRYABLE_REMOTE and getattr(e, "retryable", False)) or (
                isinstance(e, JobFailed) and e.code in _RETRYABLE_SCRIPT
            )
            if not transient or attempt >= tries or ctx.cancel_event.is_set():
                if attempt > 1:
                    e.message = f"{e.message} (after {attempt} tries)"
                    e.args = (e.message,)
                raise
            delay = float(ctx.settings.remote_retry_backoff_s) * 2 ** (attempt - 1)
            logger.warning(
                "job %s: %s try %d of %d failed (%s: %s); trying again in %.0fs",
                ctx.job_id,
                name,
                attempt,
                tries,
                e.code,
                e.message,
                delay,
                extra={"job_id": ctx.job_id},
            )
            attempt += 1
            with transaction(ctx.container.session_factory) as s:
                add_event(
                    s,
                    endpoint.machine_id,
                    "remote_retry",
                    f"{name}: try {attempt} of {tries} in {delay:.0f}s after {e.code}: {e.message[:300]}",
                    job_id=ctx.job_id,
                )
            ctx.save_state(remote_tries=attempt)
            ctx.progress(phase="retry_wait")
            ctx.cancel_event.wait(delay)


def _verify_uploaded(ctx: JobContext, snap: dict[str, Any], manifest_sha256: str | None) -> Manifest:
    """check_manifest, tried again (REMOTE_TRIES, same backoff) while the store fails in a retryable way: a
    bucket that answers 503 for a while must not cost a snapshot that is all there. Returns the manifest,
    which must be this snapshot's and of the format it was taken in."""
    tries = max(1, int(ctx.settings.remote_tries))
    for attempt in range(1, tries + 1):
        ctx.progress(phase="verify")
        try:
            _, manifest = check_manifest(
                ctx, prefix=snap["storage_prefix"], manifest_sha256=manifest_sha256, deep=False
            )
            if manifest.snapshot_id != snap["id"] or manifest.version != snap["format"]:
                raise JobFailed(
                    f"the manifest is of snapshot {manifest.snapshot_id!r} format {manifest.version}, "
                    f"not {snap['id']} format {snap['format']}",
                    code="manifest_invalid",
                )
            return manifest
        except ExternalError as e:
            if not e.retryable or attempt == tries:
                raise
            logger.warning(
                "job %s: verify try %d of %d failed (%s); trying again",
                ctx.job_id,
                attempt,
                tries,
                e.message,
                extra={"job_id": ctx.job_id},
            )
            ctx.cancel_event.wait(float(ctx.settings.remote_retry_backoff_s) * 2 ** (attempt - 1))
            ctx.check_cancelled()
    raise AssertionError("unreachable")


def discard_parts(ctx: JobContext, snap: dict[str, Any], *, reason: str) -> None:
    """The failure path of a snapshot: remove what it stored under its own prefix, since a snapshot that is
    not complete is never restorable. For format 2 that is its manifest only: the chunks it uploaded are
    in the machine's shared store, where gc removes them once unreferenced and past GC_GRACE_S (a re-run
    would reuse them). Best effort and idempotent (nothing there is success); skipped when
    the row turned `complete` meanwhile. What cannot be removed now (store down, a worker killed for good)
    stays until the snapshot record is deleted (DELETE removes its prefix); see docs/data-plane.md."""
    prefix = snap["storage_prefix"]
    if not prefix.rstrip("/").endswith("/" + snap["id"]):  # only a per-snapshot prefix, never a shared one
        logger.warning("not removing %s: not a per-snapshot prefix of %s", prefix, snap["id"])
        return
    # Claim the prefix for removal in a fenced write: only while this attempt owns the job, and only when
    # the snapshot is not complete. `deleting` then stops any later attempt of the job from uploading into
    # it (take_snapshot refuses that state), so a frozen attempt that wakes up here can never remove the
    # parts of a snapshot its successor completed.
    try:
        with ctx.owned() as s:
            row = s.get(Snapshot, snap["id"])
            if row is None or row.status == "complete":
                return  # deleted meanwhile (its delete job owns the objects), or finished after all
            row.status = "deleting"
    except JobLost:
        return  # the job's new owner is uploading into this prefix right now
    try:
        removed = ctx.container.object_store().delete_prefix(prefix)
    except GpusnapError as e:  # store down or not configured: the job's own error is what gets reported
        logger.warning(
            "could not remove the parts of failed snapshot %s: %s", snap["id"], e.message, extra={"job_id": ctx.job_id}
        )
        return
    if removed:
        with transaction(ctx.container.session_factory) as s:
            add_event(
                s,
                snap["machine_id"],
                "snapshot_parts_removed",
                f"snapshot {snap['id']} ended with {reason}: removed its {removed} stored objects",
                job_id=ctx.job_id,
            )


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
    return restore_onto(
        ctx,
        snap,
        machine_endpoint(ctx, ctx.machine_id),
        ctx.params["workspace_path"],
        overwrite=bool(ctx.params.get("overwrite", False)),
        keep_setuid=bool(ctx.params.get("keep_setuid", False)),
    )


def restore_onto(
    ctx: JobContext,
    snap: dict[str, Any],
    endpoint: Endpoint,
    workspace: str,
    *,
    overwrite: bool = False,
    keep_setuid: bool = False,
) -> dict[str, Any]:
    """Restore `snap` into `workspace` at `endpoint`. The remote script verifies every part before it
    decompresses it and swaps the workspace in only when all of it is extracted, so a failed or re-run
    restore never leaves a half-written workspace. It refuses a system directory (`system_path`, after
    resolving symlinks on the host) and, unless `overwrite`, a non-empty one (`workspace_exists`); the
    tree it replaces is kept beside it (`previous_workspace` in the result)."""
    if snap["status"] != "complete":
        raise JobFailed(f"snapshot {snap['id']} is {snap['status']}, not complete", code="snapshot_not_complete")
    scope = snap["storage_prefix"]
    extra: dict[str, Any] = {}
    if snap["format"] == 2:  # its objects are in the machine's chunk store: read access there
        scope = machine_prefix(snap["storage_prefix"], snap["id"])
        extra["store_prefix"] = scope
    params = {
        "workspace_path": workspace,
        "prefix": snap["storage_prefix"],
        **extra,
        "s3": storage_params(ctx, prefix=scope, write=False),
        "parallelism": ctx.settings.snapshot_parallelism,
        # The script refuses a manifest other than the one recorded at completion; with that chain
        # (manifest digest -> part digests) the archive is exactly what our snapshot read, so
        # the workspace's own symlinks to outside it (a venv's bin/python -> /usr/bin/python3)
        # are restored as they were. Nothing is ever extracted through such a link.
        "manifest_sha256": snap["manifest_sha256"],
        "allow_external_symlinks": bool(snap["manifest_sha256"]),
        "overwrite": overwrite,
        # One id for every try and re-run of this job: a try that finds the restore committed already
        # (its result lost with a dropped link or a dead worker) reports it instead of swapping again.
        "restore_id": ctx.job_id,
        # setuid/setgid bits come back only when the restore asked for them
        "keep_setuid": keep_setuid,
    }
    for attempt in (1, 2):
        params["manifest_sha256"] = digest = manifest_digest(ctx, snap)
        try:
            result, s5cmd_used = run_remote(ctx, endpoint, "restore", params)
            break
        except JobFailed as e:
            # gc's repack switched the manifest between our read and the host's: both are this snapshot's.
            if e.code != "manifest_changed" or attempt == 2 or manifest_digest(ctx, snap) == digest:
                raise
    with ctx.owned() as s:  # fenced: only while this attempt owns the job
        machine = s.get(Machine, endpoint.machine_id)
        if machine is not None:
            machine.workspace_path = workspace
        add_event(
            s, endpoint.machine_id, "restored", f"snapshot {snap['id']} restored into {workspace}", job_id=ctx.job_id
        )
    return {
        "snapshot_id": snap["id"],
        "workspace_path": workspace,
        "raw_bytes": result.get("raw_bytes"),
        "files": result.get("files"),
        "parts": result.get("parts"),
        "duration_s": result.get("duration_s"),
        "previous_workspace": result.get("previous_workspace"),
        "remote_tries": ctx.state.get("remote_tries", 1),
        "skipped_members": result.get("skipped_members"),
        "setuid_cleared": result.get("setuid_cleared"),
        "s5cmd": s5cmd_used,
        "tuning": _tuning(result),
    }


def manifest_digest(ctx: JobContext, snap: dict[str, Any]) -> str | None:
    """The digest of the manifest the host must find. While gc's repack switches the snapshot to a
    rewritten manifest (`manifest_sha256_next` set), whichever of the two the bucket holds now."""
    with transaction(ctx.container.session_factory) as s:
        row = s.get(Snapshot, snap["id"])
        if row is None:
            raise JobFailed(f"snapshot {snap['id']} no longer exists", code="not_found")
        recorded, switching = row.manifest_sha256, row.manifest_sha256_next
    if not switching:
        return recorded
    raw = ctx.container.object_store().get_bytes(snap["storage_prefix"] + MANIFEST_NAME, max_bytes=MAX_MANIFEST_BYTES)
    found = hashlib.sha256(raw).hexdigest() if raw is not None else None
    return found if found in (recorded, switching) else recorded


def _tuning(result: dict[str, Any]) -> dict[str, int | None] | None:
    """What the host chose and adapted (gs_tuning), as numbers only: the host's answer is not trusted
    to put anything else into the job's result."""
    tuning = result.get("tuning")
    if not isinstance(tuning, dict):
        return None  # an older host script, or a restore that had committed already
    return {
        k: v if isinstance(v, int) and not isinstance(v, bool) else None for k, v in tuning.items() if k in _TUNING_KEYS
    }


_TUNING_KEYS = (
    "cpus",
    "mem_available",
    "part_size",
    "parallelism_cap",
    "parallelism_max",
    "parallelism_start",
    "parallelism_max_used",
    "parallelism_end",
    "compress_workers",
    "backoffs",
    "throttles",
)


def _summary(snap: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "codec",
        "parts",
        "part_size",
        "raw_bytes",
        "stored_bytes",
        "files",
        "manifest_sha256",
        "duration_s",
        "format",
        "chunks_new",
        "chunks_reused",
        "bytes_uploaded",
    )
    return {"snapshot_id": snap["id"], **{k: snap[k] for k in keys}}


KINDS = [
    JobKind("create_snapshot", create_snapshot, rerunnable=True, on_end=_create_ended),
    # A restore extracts into a staging directory and swaps at the end: running it again is safe.
    JobKind("restore_snapshot", restore_snapshot, rerunnable=True),
]
