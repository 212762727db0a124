"""The chunk index of format-2 snapshots, in the database: which objects each machine's chunk store
holds (`store_objects`), where each chunk lives (`store_chunks`) and which objects each snapshot
references (`snapshot_objects`). Filled from a manifest the control plane read and checked itself, never
from what a host says, and never from a bucket listing.

The one rule that keeps gc from losing a chunk a snapshot reuses: both sides start their transaction
by writing the machine row. gc marks objects `deleting` only while no snapshot of the machine is
pending or running; a snapshot computes `known_chunks` (live objects only) and, while objects are
still `deleting`, waits for gc to have removed them before its host lists or uploads anything, so a
key it writes (a block's key is its digest) can never be deleted under it afterwards."""

from __future__ import annotations

import logging
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from src.db import transaction
from src.errors import JobFailed
from src.jobs.context import JobContext
from src.manifest import Manifest
from src.models import Job, Machine, Snapshot, SnapshotObject, StoreChunk, StoreObject, utcnow
from src.services.jobs import ACTIVE

logger = logging.getLogger(__name__)
GC_WAIT_POLL_S = 1.0


def machine_prefix(storage_prefix: str, snapshot_id: str) -> str:
    """The machine's chunk-store prefix M from a snapshot's prefix `M<snapshot id>/`."""
    tail = f"{snapshot_id}/"
    if not storage_prefix.endswith("/" + tail):
        raise JobFailed(f"snapshot prefix {storage_prefix!r} is not <machine prefix>{tail}", code="manifest_invalid")
    return storage_prefix[: -len(tail)]


def lock_machine(s: Session, machine_id: str) -> None:
    """The first write of a transaction that must serialise with gc (and gc's with it): a row lock on
    PostgreSQL until commit, the database's write lock on SQLite."""
    s.execute(update(Machine).where(Machine.id == machine_id).values(updated_at=utcnow()))


def known_chunks(ctx: JobContext, machine_id: str, store_prefix: str) -> list[list[Any]]:
    """What the host need not upload again: every chunk whose object is live and referenced by a
    complete snapshot of the machine, as the host's `known_chunks` rows. Waits while gc is removing
    objects of this machine (see the module doc); objects a dead gc left `deleting` are removed here."""
    told = False
    while True:
        with transaction(ctx.container.session_factory) as s:
            lock_machine(s, machine_id)
            doomed = s.execute(
                select(StoreObject.key, StoreObject.gc_job_id).where(
                    StoreObject.machine_id == machine_id, StoreObject.state == "deleting"
                )
            ).all()
            if not doomed:
                return _known(s, machine_id)
            gc_jobs = {job_id for _, job_id in doomed if job_id}
            gc_running = gc_jobs and s.scalar(
                select(func.count()).select_from(Job).where(Job.id.in_(gc_jobs), Job.status.in_(ACTIVE))
            )
        if gc_running:
            if not told:
                logger.info(
                    "job %s: waiting for gc job %s to remove %d objects of machine %s before the host "
                    "lists its chunk store",
                    ctx.job_id,
                    ", ".join(sorted(gc_jobs)),
                    len(doomed),
                    machine_id,
                    extra={"job_id": ctx.job_id},
                )
                told = True
            ctx.progress(phase="wait_gc")
            ctx.sleep(GC_WAIT_POLL_S)
            continue
        # Their gc ended without removing them: nothing references them (they were marked so, and
        # nothing reuses a `deleting` object), so finishing the removal here is what gc would have done.
        keys = [key for key, _ in doomed]
        ctx.container.object_store().delete_keys([store_prefix + k for k in keys])
        with transaction(ctx.container.session_factory) as s:
            drop_objects(s, machine_id, keys)


def _known(s: Session, machine_id: str) -> list[list[Any]]:
    referenced = (
        select(SnapshotObject.object_key)
        .join(Snapshot, Snapshot.id == SnapshotObject.snapshot_id)
        .where(SnapshotObject.machine_id == machine_id, Snapshot.status == "complete")
    )
    rows = s.execute(
        select(StoreChunk, StoreObject.size, StoreObject.sha256)
        .join(
            StoreObject, (StoreObject.machine_id == StoreChunk.machine_id) & (StoreObject.key == StoreChunk.object_key)
        )
        .where(StoreChunk.machine_id == machine_id, StoreObject.state == "live", StoreChunk.object_key.in_(referenced))
        .order_by(StoreChunk.raw_sha256, StoreChunk.object_key)
    )
    known: dict[str, list[Any]] = {}
    for chunk, size, sha in rows:
        known.setdefault(
            chunk.raw_sha256,
            [
                chunk.raw_sha256,
                chunk.object_key,
                chunk.offset,
                chunk.stored_size,
                chunk.raw_size,
                chunk.codec,
                chunk.sha256,
                size,
                sha,
            ],
        )
    return list(known.values())


def record_manifest(s: Session, snapshot_id: str, machine_id: str, manifest: Manifest) -> None:
    """Index a checked v2 manifest in the caller's (fenced) transaction: its objects (live), where its
    chunks are, and that this snapshot references those objects."""
    lock_machine(s, machine_id)
    existing = {
        o.key: o
        for o in s.scalars(
            select(StoreObject).where(
                StoreObject.machine_id == machine_id, StoreObject.key.in_([o.key for o in manifest.objects])
            )
        )
    }
    for obj in manifest.objects:
        row = existing.get(obj.key)
        if row is None:
            s.add(
                StoreObject(
                    machine_id=machine_id, key=obj.key, kind=obj.kind, size=obj.size, sha256=obj.sha256, state="live"
                )
            )
        elif row.state != "live":
            # Cannot happen while the wait in known_chunks holds; never index onto an object being deleted.
            raise JobFailed(f"{obj.key} is being removed by gc; take the snapshot again", code="gc_conflict")
        else:
            row.size, row.sha256 = obj.size, obj.sha256
    seen: set[tuple[str, str]] = {
        (r, k)
        for r, k in s.execute(
            select(StoreChunk.raw_sha256, StoreChunk.object_key).where(
                StoreChunk.machine_id == machine_id, StoreChunk.object_key.in_([o.key for o in manifest.objects])
            )
        )
    }
    for c in manifest.chunks:
        key = manifest.objects[c.object].key
        if (c.raw_sha256, key) in seen:
            continue
        seen.add((c.raw_sha256, key))
        s.add(
            StoreChunk(
                machine_id=machine_id,
                raw_sha256=c.raw_sha256,
                object_key=key,
                offset=c.offset,
                stored_size=c.stored_size,
                raw_size=c.raw_size,
                codec=c.codec,
                sha256=c.sha256,
            )
        )
    s.execute(delete(SnapshotObject).where(SnapshotObject.snapshot_id == snapshot_id))
    for obj in manifest.objects:
        s.add(SnapshotObject(snapshot_id=snapshot_id, machine_id=machine_id, object_key=obj.key))


def drop_objects(s: Session, machine_id: str, keys: list[str]) -> None:
    """Forget objects that are gone from the bucket, with the chunks they held."""
    for start in range(0, len(keys), 500):
        batch = keys[start : start + 500]
        s.execute(delete(StoreChunk).where(StoreChunk.machine_id == machine_id, StoreChunk.object_key.in_(batch)))
        s.execute(delete(StoreObject).where(StoreObject.machine_id == machine_id, StoreObject.key.in_(batch)))
