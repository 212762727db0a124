"""The `gc` job: remove objects of the machines' chunk stores (format 2) that no snapshot references.

Per machine, in a transaction that first writes the machine row (so it serialises with a snapshot's
`known_chunks`, src/jobs/chunk_index.py), and only while no snapshot of the machine is pending or
running: every listed object that no snapshot row references (whatever its status: a snapshot's
references go only with its record) and that is older than the grace period is marked `deleting`.
Then they are deleted from the bucket, then forgotten. Each step is safe to stop at (kill -9) and
to run again: a re-run marks again what is still listed, deletes again what it marked (deleting what is
gone succeeds) and forgets it. A snapshot that starts meanwhile waits until the marked objects are gone,
so its host can never reuse, or upload again under the same key, an object about to be deleted."""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from sqlalchemy import select

from src.jobs.chunk_index import drop_objects, lock_machine
from src.jobs.context import JobContext
from src.jobs.failpoints import failpoint
from src.jobs.kinds import JobKind
from src.jobs.repack import load_manifests, reconcile, repack_machine
from src.manifest import OBJECT_KEY
from src.models import Machine, Snapshot, SnapshotObject, StoreObject, utcnow

logger = logging.getLogger(__name__)
IN_PROGRESS = ("pending", "running")


def gc(ctx: JobContext) -> dict[str, Any]:
    grace_s = float(ctx.params["grace_s"] if ctx.params.get("grace_s") is not None else ctx.settings.gc_grace_s)
    with ctx.owned() as s:
        machines = sorted(set(s.scalars(select(Machine.id))) | set(s.scalars(select(StoreObject.machine_id))))
    report: dict[str, Any] = {
        "grace_s": grace_s,
        "machines": len(machines),
        "deleted_objects": 0,
        "deleted_bytes": 0,
        "skipped_busy": [],
        "repacked_packs": 0,
        "repack_freed_bytes": 0,
    }
    for machine_id in machines:
        ctx.check_cancelled()
        ctx.progress(phase=f"gc:{machine_id}"[:64])
        gc_machine(ctx, machine_id, grace_s, report)
    return report


def gc_machine(ctx: JobContext, machine_id: str, grace_s: float, report: dict[str, Any]) -> None:
    prefix = f"{ctx.settings.snapshot_prefix}{machine_id}/"
    # First settle what a killed repack left (a manifest switch half recorded, references the current
    # manifests no longer make), so that this sweep already sees the old pack as garbage.
    manifests = load_manifests(ctx, machine_id)
    if manifests is not None:
        reconcile(ctx, machine_id, manifests)
    if not sweep(ctx, machine_id, prefix, grace_s, report):
        report["skipped_busy"].append(machine_id)
        return
    repacked, freed = repack_machine(ctx, machine_id, prefix, manifests) if manifests else (0, 0)
    if repacked:
        report["repacked_packs"] += repacked
        report["repack_freed_bytes"] += freed
        sweep(ctx, machine_id, prefix, grace_s, report)  # the old packs, unreferenced now


def sweep(ctx: JobContext, machine_id: str, prefix: str, grace_s: float, report: dict[str, Any]) -> bool:
    """Mark, delete and forget the machine's unreferenced objects older than `grace_s`. Returns False
    when a snapshot of the machine is in progress (nothing new is marked then)."""
    store = ctx.container.object_store()
    listed = {}
    for sub in ("chunks/", "packs/"):
        for info in store.list(prefix + sub):
            rel = info.key[len(prefix) :]
            if OBJECT_KEY.match(rel):  # anything else there is not ours to judge
                listed[rel] = info
    now = utcnow()
    with ctx.owned() as s:  # fenced, and the machine row first: see the module doc
        lock_machine(s, machine_id)
        busy = s.scalar(
            select(Snapshot.id).where(Snapshot.machine_id == machine_id, Snapshot.status.in_(IN_PROGRESS)).limit(1)
        )
        rows = {r.key: r for r in s.scalars(select(StoreObject).where(StoreObject.machine_id == machine_id))}
        if busy is not None:
            # Finish only what this job marked before (the snapshot waits for it); mark nothing new.
            doomed = [k for k, r in rows.items() if r.state == "deleting" and r.gc_job_id == ctx.job_id]
        else:
            referenced = set(
                s.scalars(select(SnapshotObject.object_key).where(SnapshotObject.machine_id == machine_id))
            )
            doomed = []
            for rel, info in listed.items():
                if rel in referenced or not _old(info.last_modified, now, grace_s):
                    continue
                row = rows.get(rel)
                if row is None:  # an orphan: uploaded by a snapshot that never completed
                    row = StoreObject(
                        machine_id=machine_id,
                        key=rel,
                        size=info.size,
                        sha256=None,
                        kind="block" if rel.startswith("chunks/") else "pack",
                    )
                    s.add(row)
                row.state, row.gc_job_id = "deleting", ctx.job_id
                doomed.append(rel)
            for key, row in rows.items():
                if key in referenced or key in listed:
                    continue
                # Gone from the bucket and unreferenced: finish it (a dead gc's, or a stale index row).
                row.state, row.gc_job_id = "deleting", ctx.job_id
                doomed.append(key)
    failpoint("gc.after_mark")
    if doomed:
        store.delete_keys([prefix + k for k in doomed])
        failpoint("gc.after_delete")
        with ctx.owned() as s:
            drop_objects(s, machine_id, doomed)
        gone = [k for k in doomed if k in listed]
        report["deleted_objects"] += len(gone)
        report["deleted_bytes"] += sum(listed[k].size for k in gone)
        logger.info("gc %s: removed %d unreferenced objects", machine_id, len(gone), extra={"job_id": ctx.job_id})
    failpoint("gc.after_forget")
    return busy is None


def _old(modified: dt.datetime | None, now: dt.datetime, grace_s: float) -> bool:
    if grace_s <= 0:
        return True
    if modified is None:  # age unknown: only a gc told to ignore age may take it
        return False
    if modified.tzinfo is None:
        modified = modified.replace(tzinfo=dt.timezone.utc)
    return (now - modified).total_seconds() >= grace_s


KIND = JobKind("gc", gc, rerunnable=True)
