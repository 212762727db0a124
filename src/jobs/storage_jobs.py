"""Job kinds that need only the object store: verify a snapshot, delete a snapshot."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import zstandard
from sqlalchemy import delete, update
from sqlalchemy.orm import Session

from src.adapters.object_store import ObjectTooLarge
from src.db import transaction
from src.errors import Conflict, JobFailed
from src.jobs.context import JobContext
from src.jobs.kinds import JobKind
from src.jobs.rows import find_snapshot
from src.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Chunk, Manifest, Part, StoredObject, parse_manifest
from src.models import Job, Machine, Snapshot, SnapshotObject, utcnow
from src.services.snapshots import check_deletable

# Verdicts that prove the snapshot cannot be restored (as opposed to the store being unreachable).
T = TypeVar("T")
INTEGRITY_CODES = (
    "manifest_missing",
    "manifest_invalid",
    "manifest_too_large",
    "manifest_changed",
    "part_missing",
    "part_truncated",
    "part_corrupt",
)


def verify_snapshot(ctx: JobContext) -> dict[str, Any]:
    """Check that the manifest is there and unchanged and that every part has the manifest's size
    (`deep`: also its SHA-256, by streaming it). Reports every bad part, not only the first."""
    snap = find_snapshot(ctx, ctx.params["snapshot_id"])
    if snap is None:
        raise JobFailed(f"snapshot {ctx.params['snapshot_id']} no longer exists", code="not_found")
    result = check_objects(
        ctx,
        prefix=snap["storage_prefix"],
        manifest_sha256=snap["manifest_sha256"],
        deep=bool(ctx.params.get("deep")),
        snapshot_id=snap["id"],
    )
    with ctx.owned() as s:  # fenced: only while this attempt owns the job
        s.execute(update(Snapshot).where(Snapshot.id == snap["id"]).values(verified_at=utcnow()))
    return result


def check_objects(
    ctx: JobContext, *, prefix: str, manifest_sha256: str | None, deep: bool, snapshot_id: str | None = None
) -> dict[str, Any]:
    """The verification itself (also a step of hibernate). Raises JobFailed with an integrity code."""
    return check_manifest(ctx, prefix=prefix, manifest_sha256=manifest_sha256, deep=deep, snapshot_id=snapshot_id)[0]


def check_manifest(
    ctx: JobContext, *, prefix: str, manifest_sha256: str | None, deep: bool, snapshot_id: str | None = None
) -> tuple[dict[str, Any], Manifest]:
    """`check_objects`, also returning the manifest it checked. A format-2 manifest's objects are in the
    machine's chunk store, the parent of `prefix`. `snapshot_id`: the row to ask again when the manifest
    differs from `manifest_sha256` (gc's repack may have just switched it to a rewritten one)."""
    store = ctx.container.object_store()
    ctx.progress(phase="manifest")
    try:
        raw = store.get_bytes(prefix + MANIFEST_NAME, max_bytes=MAX_MANIFEST_BYTES)
    except ObjectTooLarge as e:
        raise JobFailed(f"the manifest is too large to be ours: {e.message}", code="manifest_too_large") from e
    if raw is None:
        raise JobFailed(f"{prefix}{MANIFEST_NAME} is missing", code="manifest_missing")
    manifest = parse_manifest(raw)
    if manifest_sha256 and manifest.sha256 not in _accepted_digests(ctx, manifest_sha256, snapshot_id):
        raise JobFailed("the manifest in the bucket is not the one this snapshot recorded", code="manifest_changed")
    if manifest.version == 2:
        return _check_v2(ctx, store, prefix, manifest, deep), manifest
    ctx.progress(
        phase="deep_verify" if deep else "verify",
        parts_total=len(manifest.parts),
        parts_done=0,
        bytes_total=manifest.stored_bytes,
        bytes_done=0,
    )

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

    problems = _run_checks(ctx, check, manifest.parts, lambda p: p.stored_size, workers=8)
    if problems:
        listed = ", ".join(f"{p.key} ({code})" for p, code in problems[:10])
        raise JobFailed(f"{len(problems)} of {len(manifest.parts)} parts are bad: {listed}", code=problems[0][1])
    return {
        "parts": len(manifest.parts),
        "stored_bytes": manifest.stored_bytes,
        "deep": deep,
        "manifest_sha256": manifest.sha256,
        "format": 1,
    }, manifest


def _accepted_digests(ctx: JobContext, recorded: str, snapshot_id: str | None) -> set[str]:
    """The recorded digest, and while gc's repack switches the snapshot, the digest it switches to (both
    manifests restore: the old pack is removed only after the switch). Asked again of the database."""
    accepted = {recorded}
    if snapshot_id is not None:
        with transaction(ctx.container.session_factory) as s:
            row = s.get(Snapshot, snapshot_id)
            if row is not None:
                accepted |= {d for d in (row.manifest_sha256, row.manifest_sha256_next) if d}
    return accepted


def _check_v2(ctx: JobContext, store: Any, prefix: str, manifest: Manifest, deep: bool) -> dict[str, Any]:
    """Light: every object the manifest references is there with its size. Deep: also the SHA-256 of
    each whole object and of every chunk's stored bytes inside it (a pack holds many chunks)."""
    store_prefix = prefix.rstrip("/").rsplit("/", 1)[0] + "/"
    by_object: dict[int, list[Chunk]] = {}
    for c in manifest.chunks:
        by_object.setdefault(c.object, []).append(c)
    ctx.progress(
        phase="deep_verify" if deep else "verify",
        parts_total=len(manifest.objects),
        parts_done=0,
        bytes_total=manifest.stored_bytes,
        bytes_done=0,
    )

    def check(index_obj: tuple[int, StoredObject]) -> tuple[tuple[int, StoredObject], str | None]:
        ctx.check_cancelled()
        index, obj = index_obj
        key = store_prefix + obj.key
        if not deep:
            info = store.head(key)
            if info is None:
                return index_obj, "part_missing"
            return index_obj, None if info.size == obj.size else "part_truncated"
        data = store.get_bytes(key, max_bytes=obj.size)  # an object larger than listed is not read whole
        if data is None:
            return index_obj, "part_missing"
        if len(data) != obj.size:
            return index_obj, "part_truncated"
        if hashlib.sha256(data).hexdigest() != obj.sha256:
            return index_obj, "part_corrupt"
        for c in by_object.get(index, []):
            stored = data[c.offset : c.offset + c.stored_size]
            if hashlib.sha256(stored).hexdigest() != c.sha256 or not _decodes_to(c, stored):
                return index_obj, "part_corrupt"
        return index_obj, None

    def guarded(index_obj: tuple[int, StoredObject]) -> tuple[tuple[int, StoredObject], str | None]:
        try:
            return check(index_obj)
        except ObjectTooLarge:
            return index_obj, "part_truncated"

    # Deep reads hold whole objects (a pack is ~32 MiB): fewer at once than the HEADs of a light verify.
    problems = _run_checks(
        ctx, guarded, list(enumerate(manifest.objects)), lambda io: io[1].size, workers=4 if deep else 8
    )
    if problems:
        listed = ", ".join(f"{io[1].key} ({code})" for io, code in problems[:10])
        raise JobFailed(f"{len(problems)} of {len(manifest.objects)} objects are bad: {listed}", code=problems[0][1])
    return {
        "parts": len(manifest.chunks),
        "objects": len(manifest.objects),
        "stored_bytes": manifest.stored_bytes,
        "deep": deep,
        "manifest_sha256": manifest.sha256,
        "format": 2,
    }


def _decodes_to(chunk: Chunk, stored: bytes) -> bool:
    """Deep verify: a zstd chunk decodes to its raw_sha256 (the restore checks the same). Intact stored
    bytes can still be another chunk's (a lying pack or manifest of an earlier host, reused through
    known_chunks). `none` chunks are their raw bytes (the parser checks it); zstd-planes and nvCOMP
    chunks decode only on a host, where the restore checks them."""
    if chunk.codec != "zstd":
        return True
    try:
        raw = zstandard.ZstdDecompressor().decompress(stored, max_output_size=chunk.raw_size)
    except zstandard.ZstdError:
        return False
    return len(raw) == chunk.raw_size and hashlib.sha256(raw).hexdigest() == chunk.raw_sha256


def _run_checks(
    ctx: JobContext,
    check: Callable[[T], tuple[T, str | None]],
    items: list[T],
    size: Callable[[T], int],
    *,
    workers: int,
) -> list[tuple[T, str]]:
    problems: list[tuple[T, str]] = []
    done_parts = done_bytes = 0
    pool = ThreadPoolExecutor(max_workers=workers)
    try:
        futures = [pool.submit(check, item) for item in items]
        for future in futures:
            # A slow bucket (seconds per HEAD) must not delay a cancel: wait interruptibly.
            item, problem = ctx.result(future)
            done_parts += 1
            done_bytes += size(item)
            ctx.progress(parts_done=done_parts, bytes_done=done_bytes)
            if problem:
                problems.append((item, problem))
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # on a cancel, parts not started are never asked for
    return problems


def _verify_ended(s: Session, job: Job) -> None:
    if job.status == "failed" and job.error_code in INTEGRITY_CODES and job.snapshot_id:
        s.execute(
            update(Snapshot)
            .where(Snapshot.id == job.snapshot_id)
            .values(status="failed", error_code=job.error_code, error_message=job.error_message)
        )


def delete_snapshot(ctx: JobContext) -> dict[str, Any]:
    """Objects first (the manifest before the parts, so that a half-deleted snapshot is never mistaken
    for a complete one), then the record. Deleting what is already gone succeeds. A format-2 snapshot's
    prefix holds only its manifest: the chunks it references are shared with the machine's other
    snapshots, so its reference rows go with the record and gc removes what nothing references."""
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
        s.execute(delete(SnapshotObject).where(SnapshotObject.snapshot_id == snapshot_id))
        s.execute(update(Machine).where(Machine.last_snapshot_id == snapshot_id).values(last_snapshot_id=None))
    return {"snapshot_id": snapshot_id, "deleted_objects": deleted, "already_gone": False}


def _recheck_deletable(ctx: JobContext, snapshot_id: str) -> None:
    """The same rule as the request, at the moment objects are about to go: a machine may have been
    hibernated onto this snapshot, or a restore may have started, since the DELETE was accepted."""
    with transaction(ctx.container.session_factory) as s:
        try:
            check_deletable(
                s,
                snapshot_id,
                force=bool(ctx.params.get("force")),
                job_id=ctx.job_id,
                was_restorable=ctx.params.get("previous_status") == "complete",
            )
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
