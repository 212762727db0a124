"""gc's repack: a pack whose chunks are mostly unreferenced (live bytes under REPACK_BELOW of the chunk
bytes it holds, after snapshots that used it were deleted) is replaced by a new pack holding only its live chunks.
A run (a pack of 16 MiB blocks, two per ~32 MiB object) is repacked as soon as one of its blocks is dead:
a dead block is as much garbage as a whole dead block object of the older layout, which gc deleted.

Kill-safe order (a re-run of gc finishes or undoes each step; failpoints `gc.repack_*` prove it):
1. write the new pack N (an unreferenced object until step 2: a crash leaves an orphan for gc);
2. one transaction: index N, reference it from every snapshot that uses the old pack P, and record each
   snapshot's rewritten manifest digest as `manifest_sha256_next`;
3. write the rewritten manifests, then record each switch (`manifest_sha256` = next). Until then either
   manifest is the snapshot's (restore and verify accept both: P and N both exist);
4. drop the references that no current manifest makes (`reconcile`), after which P is unreferenced and
   the caller's sweep deletes it like any other garbage.
A pack is repacked only while no other job uses a snapshot that uses it (a restore or wake was given the
recorded manifest digest: its host would refuse a rewritten manifest), and a snapshot's references are
replaced only while no other job uses it; the machine has no snapshot in progress throughout. A restore
that starts after step 2 is told the digest the bucket holds when it starts (transfer_jobs.manifest_digest)."""

from __future__ import annotations

import copy
import hashlib
import logging
from typing import Any

from sqlalchemy import delete, func, select

from src.errors import GpusnapError
from src.jobs.chunk_index import lock_machine
from src.jobs.context import JobContext
from src.jobs.failpoints import failpoint
from src.manifest import MANIFEST_NAME, MAX_MANIFEST_BYTES, Manifest, dump_manifest, parse_manifest
from src.models import Job, Snapshot, SnapshotObject, StoreChunk, StoreObject
from src.pack import PackEntry, build_pack
from src.services.jobs import ACTIVE

logger = logging.getLogger(__name__)
REPACK_BELOW = 0.5
IN_PROGRESS = ("pending", "running")


def load_manifests(ctx: JobContext, machine_id: str) -> dict[str, Manifest] | None:
    """The current manifest of every format-2 snapshot of the machine that has references, settling any
    switch a killed gc left half done. None (repack nothing) when one cannot be read or is not the one
    recorded: gc only ever acts on what it is sure of."""
    store = ctx.container.object_store()
    with ctx.owned() as s:
        rows = [
            (r.id, r.storage_prefix, r.manifest_sha256, r.manifest_sha256_next)
            for r in s.scalars(
                select(Snapshot).where(
                    Snapshot.machine_id == machine_id, Snapshot.format == 2, Snapshot.manifest_sha256.is_not(None)
                )
            )
        ]
    manifests: dict[str, Manifest] = {}
    settled: dict[str, str] = {}
    for snap_id, prefix, sha, sha_next in rows:
        try:
            raw = store.get_bytes(prefix + MANIFEST_NAME, max_bytes=MAX_MANIFEST_BYTES)
            manifest = parse_manifest(raw) if raw is not None else None
        except GpusnapError as e:
            logger.warning("gc: not repacking %s: manifest of %s unreadable: %s", machine_id, snap_id, e.message)
            return None
        if manifest is None or manifest.version != 2 or manifest.sha256 not in (sha, sha_next):
            logger.warning("gc: not repacking %s: manifest of %s is not the recorded one", machine_id, snap_id)
            return None
        manifests[snap_id] = manifest
        if sha_next is not None:
            settled[snap_id] = manifest.sha256
    if settled:
        with ctx.owned() as s:
            for snap_id, digest in settled.items():
                row = s.get(Snapshot, snap_id)
                if row is not None:
                    row.manifest_sha256, row.manifest_sha256_next = digest, None
    return manifests


def _in_use(s: Any, ctx: JobContext, snapshot_ids: list[str]) -> set[str]:
    """Snapshots another job (a restore, wake, verify, delete) is using now: their manifest is not
    rewritten under them (a host that was given the recorded digest would refuse the new one as
    `manifest_changed`) and their references are not dropped."""
    return set(
        s.scalars(
            select(Job.snapshot_id).where(
                Job.status.in_(ACTIVE), Job.id != ctx.job_id, Job.snapshot_id.in_(snapshot_ids)
            )
        )
    )


def reconcile(ctx: JobContext, machine_id: str, manifests: dict[str, Manifest]) -> None:
    """Make each snapshot's references exactly the objects of its current manifest, for snapshots no other
    job is using (one still reading an older manifest keeps what that manifest needed)."""
    with ctx.owned() as s:
        lock_machine(s, machine_id)
        busy = _in_use(s, ctx, list(manifests))
        for snap_id, manifest in manifests.items():
            if snap_id in busy or s.get(Snapshot, snap_id) is None:
                continue
            wanted = {o.key for o in manifest.objects}
            have = set(s.scalars(select(SnapshotObject.object_key).where(SnapshotObject.snapshot_id == snap_id)))
            if have - wanted:
                s.execute(
                    delete(SnapshotObject).where(
                        SnapshotObject.snapshot_id == snap_id, SnapshotObject.object_key.in_(list(have - wanted))
                    )
                )
            for key in wanted - have:
                s.add(SnapshotObject(snapshot_id=snap_id, machine_id=machine_id, object_key=key))


def repack_machine(ctx: JobContext, machine_id: str, prefix: str, manifests: dict[str, Manifest]) -> tuple[int, int]:
    """Repack the machine's mostly-garbage packs (`manifests`: from `load_manifests`, references already
    reconciled). Returns (packs repacked, bytes the old packs held); their references are dropped."""
    users: dict[str, list[str]] = {}
    live: dict[str, dict[int, Any]] = {}  # pack key -> {old offset: chunk}
    sizes: dict[str, int] = {}
    runs: set[str] = set()  # packs of blocks
    for snap_id, manifest in manifests.items():
        for obj in manifest.objects:
            if obj.kind == "pack":
                users.setdefault(obj.key, []).append(snap_id)
                sizes[obj.key] = obj.size
        for c in manifest.chunks:
            obj = manifest.objects[c.object]
            if obj.kind == "pack":
                live.setdefault(obj.key, {})[c.offset] = c
                if c.kind == "block":
                    runs.add(obj.key)
    # A pack's chunk bytes as indexed (every chunk any snapshot ever used from it), not its size: the
    # TOC of a small pack must not make it look mostly garbage (it would be repacked again every time).
    with ctx.owned() as s:
        held = dict(
            s.execute(
                select(StoreChunk.object_key, func.sum(StoreChunk.stored_size))
                .where(StoreChunk.machine_id == machine_id, StoreChunk.object_key.in_(list(users)))
                .group_by(StoreChunk.object_key)
            ).all()
        )
    repacked = freed = 0
    for key in sorted(users):
        live_bytes = sum(c.stored_size for c in live[key].values())
        if live_bytes >= int(held.get(key) or 0) * (1 if key in runs else REPACK_BELOW):
            continue
        ctx.check_cancelled()
        if _repack_one(
            ctx,
            machine_id,
            prefix,
            key,
            sorted(live[key].values(), key=lambda c: c.offset),
            {sid: manifests[sid] for sid in users[key]},
        ):
            repacked += 1
            freed += sizes[key]
    if repacked:
        reconcile(ctx, machine_id, load_manifests(ctx, machine_id) or {})
    return repacked, freed


def _repack_one(
    ctx: JobContext, machine_id: str, prefix: str, old_key: str, chunks: list[Any], affected: dict[str, Manifest]
) -> bool:
    with ctx.owned() as s:
        if _in_use(s, ctx, list(affected)):
            return False  # a later gc repacks it (checked again below, where it counts)
    store = ctx.container.object_store()
    old = store.get_bytes(prefix + old_key)
    if old is None or hashlib.sha256(old).hexdigest() != old_key.split("/")[1]:
        logger.warning("gc: %s%s is missing or damaged; not repacking it (verify reports it)", prefix, old_key)
        return False
    parts = []
    for c in chunks:
        data = old[c.offset : c.offset + c.stored_size]
        if hashlib.sha256(data).hexdigest() != c.sha256:
            logger.warning("gc: a chunk of %s%s is damaged; not repacking it", prefix, old_key)
            return False
        parts.append((PackEntry(c.raw_sha256, c.offset, c.stored_size, c.raw_size, c.codec, c.sha256), data))
    pack, entries = build_pack(parts)
    new_key = f"packs/{hashlib.sha256(pack).hexdigest()}"
    moved = {c.offset: e for c, e in zip(chunks, entries)}
    new_obj = {"key": new_key, "size": len(pack), "sha256": hashlib.sha256(pack).hexdigest()}
    rewritten = {sid: _rewrite(m, old_key, new_obj, moved) for sid, m in affected.items()}
    store.put_bytes(prefix + new_key, pack)
    failpoint("gc.repack_after_upload")
    with ctx.owned() as s:
        lock_machine(s, machine_id)
        if (
            s.scalar(
                select(Snapshot.id).where(Snapshot.machine_id == machine_id, Snapshot.status.in_(IN_PROGRESS)).limit(1)
            )
            is not None
        ):
            return False  # a snapshot started: the new pack stays an orphan for a later gc
        if _in_use(s, ctx, list(affected)):
            return False  # a restore of one started: likewise
        if s.get(StoreObject, (machine_id, new_key)) is None:
            s.add(
                StoreObject(
                    machine_id=machine_id,
                    key=new_key,
                    kind="pack",
                    size=len(pack),
                    sha256=new_obj["sha256"],
                    state="live",
                )
            )
            for e in entries:
                s.add(
                    StoreChunk(
                        machine_id=machine_id,
                        raw_sha256=e.raw_sha256,
                        object_key=new_key,
                        offset=e.offset,
                        stored_size=e.stored_size,
                        raw_size=e.raw_size,
                        codec=e.codec,
                        sha256=e.sha256,
                    )
                )
        for sid, raw in rewritten.items():
            row = s.get(Snapshot, sid)
            if row is None:
                continue
            row.manifest_sha256_next = hashlib.sha256(raw).hexdigest()
            if s.get(SnapshotObject, (sid, new_key)) is None:
                s.add(SnapshotObject(snapshot_id=sid, machine_id=machine_id, object_key=new_key))
    failpoint("gc.repack_after_plan")
    for sid, raw in rewritten.items():
        store.put_bytes(f"{prefix}{sid}/{MANIFEST_NAME}", raw)
        failpoint("gc.repack_after_manifest")
    with ctx.owned() as s:
        for sid in rewritten:
            row = s.get(Snapshot, sid)
            if row is not None and row.manifest_sha256_next:
                row.manifest_sha256, row.manifest_sha256_next = row.manifest_sha256_next, None
    failpoint("gc.repack_after_switch")
    logger.info(
        "gc %s: repacked %s (%d bytes) into %s (%d bytes)",
        machine_id,
        old_key,
        sum(1 for _ in chunks),
        new_key,
        len(pack),
        extra={"job_id": ctx.job_id},
    )
    return True


def _rewrite(manifest: Manifest, old_key: str, new_obj: dict[str, Any], moved: dict[int, PackEntry]) -> bytes:
    """The manifest with the old pack replaced by the new one (chunk offsets moved), totals updated."""
    doc = copy.deepcopy(manifest.doc)
    index = next(i for i, o in enumerate(doc["objects"]) if o["key"] == old_key)
    doc["objects"][index] = dict(new_obj)
    for c in doc["chunks"]:
        if c["object"] == index:
            c["offset"] = moved[c["offset"]].offset
    doc["totals"]["stored_bytes"] = sum(o["size"] for o in doc["objects"])
    raw = dump_manifest(doc)
    parse_manifest(raw)  # never write a manifest the readers would refuse
    return raw
