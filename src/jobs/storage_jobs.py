"""Job kinds that need only the object store: verify a snapshot, delete a snapshot."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any

from sqlalchemy import update
from sqlalchemy.orm import Session

from src.adapters.object_store import ObjectTooLarge
from src.db import transaction
from src.errors import Conflict, JobFailed
from src.jobs.context import JobContext
from src.jobs.kinds import JobKind
from src.jobs.rows import find_snapshot
from src.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Part, parse_manifest
from src.models import Job, Machine, Snapshot, utcnow
from src.services.snapshots import check_deletable

# Verdicts that prove the snapshot cannot be restored (as opposed to the store being unreachable).
INTEGRITY_CODES = ("manifest_missing", "manifest_invalid", "manifest_too_large", "manifest_changed", "part_missing",
                   "part_truncated", "part_corrupt")


def verify_snapshot(ctx: JobContext) -> dict[str, Any]:
    """Check that the manifest is there and unchanged and that every part has the manifest's size
    (`deep`: also its SHA-256, by streaming it). Reports every bad part, not only the first."""
    snap = find_snapshot(ctx, ctx.params["snapshot_id"])
    if snap is None:
        raise JobFailed(f"snapshot {ctx.params['snapshot_id']} no longer exists", code="not_found")
    result = check_objects(ctx, prefix=snap["storage_prefix"], manifest_sha256=snap["manifest_sha256"],
                           deep=bool(ctx.params.get("deep")))
    with ctx.owned() as s:  # fenced: only while this attempt owns the job
        s.execute(update(Snapshot).where(Snapshot.id == snap["id"]).values(verified_at=utcnow()))
    return result


def check_objects(ctx: JobContext, *, prefix: str, manifest_sha256: str | None, deep: bool) -> dict[str, Any]:
    """The verification itself (also a step of hibernate). Raises JobFailed with an integrity code."""
    store = ctx.container.object_store()
    ctx.progress(phase="manifest")
    try:
        raw = store.get_bytes(prefix + MANIFEST_NAME, max_bytes=MAX_MANIFEST_BYTES)
    except ObjectTooLarge as e:
        raise JobFailed(f"the manifest is too large to be ours: {e.message}", code="manifest_too_large") from e
    if raw is None:
        raise JobFailed(f"{prefix}{MANIFEST_NAME} is missing", code="manifest_missing")
    manifest = parse_manifest(raw)
    if manifest_sha256 and manifest.sha256 != manifest_sha256:
        raise JobFailed("the manifest in the bucket is not the one this snapshot recorded", code="manifest_changed")
    ctx.progress(phase="deep_verify" if deep else "verify", parts_total=len(manifest.parts), parts_done=0,
                 bytes_total=manifest.stored_bytes, bytes_done=0)

    def check(part: Part) -> tuple[Part, str | None]:
        ctx.check_cancelled()
        key = prefix + part.key
        if deep:
            found = store.sha256(key)
            if found is None:
                return part, "part_missing"
            size, digest = found
        else:
            info = store.head(key)
            if info is None:
                return part, "part_missing"
            size, digest = info.size, None
        if size != part.stored_size:
            return part, "part_truncated"
        if digest is not None and digest != part.sha256:
            return part, "part_corrupt"
        return part, None

    problems: list[tuple[Part, str]] = []
    done_parts = done_bytes = 0
    pool = ThreadPoolExecutor(max_workers=8)
    try:
        futures = [pool.submit(check, part) for part in manifest.parts]
        for future in futures:
            # A slow bucket (seconds per HEAD) must not delay a cancel: wait interruptibly.
            part, problem = ctx.result(future)
            done_parts += 1
            done_bytes += part.stored_size
            ctx.progress(parts_done=done_parts, bytes_done=done_bytes)
            if problem:
                problems.append((part, problem))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # on a cancel, parts not started are never asked for
    if problems:
        first_part, first_code = problems[0]
        listed = ", ".join(f"{p.key} ({code})" for p, code in problems[:10])
        raise JobFailed(f"{len(problems)} of {len(manifest.parts)} parts are bad: {listed}", code=first_code)
    return {"parts": len(manifest.parts), "stored_bytes": manifest.stored_bytes, "deep": deep,
            "manifest_sha256": manifest.sha256}


def _verify_ended(s: Session, job: Job) -> None:
    if job.status == "failed" and job.error_code in INTEGRITY_CODES and job.snapshot_id:
        s.execute(update(Snapshot).where(Snapshot.id == job.snapshot_id)
                  .values(status="failed", error_code=job.error_code, error_message=job.error_message))


def delete_snapshot(ctx: JobContext) -> dict[str, Any]:
    """Objects first (the manifest before the parts, so that a half-deleted snapshot is never mistaken
    for a complete one), then the record. Deleting what is already gone succeeds."""
    snapshot_id = ctx.params["snapshot_id"]
    snap = find_snapshot(ctx, snapshot_id)
    if snap is None:
        return {"snapshot_id": snapshot_id, "deleted_objects": 0, "already_gone": True}
    store = ctx.container.object_store()
    prefix = snap["storage_prefix"]
    if not ctx.state.get("manifest_deleted"):
        _recheck_deletable(ctx, snapshot_id)
    ctx.progress(phase="delete_objects")
    had_manifest = store.head(prefix + MANIFEST_NAME) is not None
    store.delete_keys([prefix + MANIFEST_NAME])
    ctx.save_state(manifest_deleted=True)
    deleted = store.delete_prefix(prefix) + int(had_manifest)
    ctx.progress(phase="delete_record")
    with ctx.owned() as s:  # fenced: only while this attempt owns the job
        row = s.get(Snapshot, snapshot_id)
        if row is not None:
            s.delete(row)
        s.execute(update(Machine).where(Machine.last_snapshot_id == snapshot_id).values(last_snapshot_id=None))
    return {"snapshot_id": snapshot_id, "deleted_objects": deleted, "already_gone": False}


def _recheck_deletable(ctx: JobContext, snapshot_id: str) -> None:
    """The same rule as the request, at the moment objects are about to go: a machine may have been
    hibernated onto this snapshot, or a restore may have started, since the DELETE was accepted."""
    with transaction(ctx.container.session_factory) as s:
        try:
            check_deletable(s, snapshot_id, force=bool(ctx.params.get("force")), job_id=ctx.job_id,
                            was_restorable=ctx.params.get("previous_status") == "complete")
        except Conflict as e:
            raise JobFailed(e.message, code=e.code) from None


def _delete_ended(s: Session, job: Job) -> None:
    if job.status == "succeeded" or not job.snapshot_id:
        return
    snap = s.get(Snapshot, job.snapshot_id)
    if snap is None:
        return
    if (job.state or {}).get("manifest_deleted"):
        snap.status, snap.error_code = "failed", "delete_incomplete"
        snap.error_message = "deletion stopped after the manifest was removed; delete again to finish"
    else:  # nothing was removed: the snapshot is as it was
        snap.status = job.params.get("previous_status", "complete")


KINDS = [
    JobKind("verify_snapshot", verify_snapshot, rerunnable=True, on_end=_verify_ended),
    JobKind("delete_snapshot", delete_snapshot, rerunnable=True, on_end=_delete_ended),
]
