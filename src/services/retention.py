"""Retention: which complete snapshots of a machine its policy keeps, and deleting the rest through the
normal delete path (a `delete_snapshot` job each, which re-checks at the moment it acts).

The rules are restic's `forget` (restic.readthedocs.io, "Removing snapshots according to a policy"):
snapshots are walked newest first; `keep_last` keeps the first N; `keep_daily` keeps the newest
snapshot of each of the N most recent days (UTC) that have one, `keep_weekly` of ISO weeks,
`keep_monthly` of months. A snapshot is kept when any rule keeps it. On top of the rules, never
deleted: the snapshot a machine without a live instance would wake from, a snapshot a job is using,
and the machine's only complete snapshot.

As restic's `forget` does by default (`--group-by host,paths`), the rules apply to each workspace path
apart: a manual snapshot of another directory is not the "last" snapshot of the workspace, and each
path keeps at least its newest snapshot."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from src.db import transaction
from src.errors import GpusnapError
from src.models import Job, MachinePolicy, Snapshot
from src.services import jobs as job_service
from src.services.machines import add_event
from src.services.snapshots import RESTORABLE, delete_snapshot, snapshots_needed_by_machines

if TYPE_CHECKING:
    from src.container import Container

logger = logging.getLogger(__name__)

_BUCKETS: dict[str, Callable[[dt.datetime], Any]] = {
    "keep_daily": lambda t: t.date(),
    "keep_weekly": lambda t: t.isocalendar()[:2],
    "keep_monthly": lambda t: (t.year, t.month),
}


@dataclass(frozen=True)
class Plan:
    keep: dict[str, list[str]]  # snapshot id -> the rules (or protections) that keep it
    forget: list[str]  # newest first


def plan(
    snapshots: Sequence[tuple[str, dt.datetime]], rules: dict[str, int], *, protected: dict[str, str] | None = None
) -> Plan:
    """Which of `snapshots` ((id, taken at), complete ones of one machine) the rules keep. `protected`
    (id -> why) are kept whatever the rules say. Pure: no database, no clock."""
    ordered = sorted(snapshots, key=lambda item: (_utc(item[1]), item[0]), reverse=True)
    keep: dict[str, list[str]] = {}
    left = {"keep_last": int(rules.get("keep_last") or 0), **{k: int(rules.get(k) or 0) for k in _BUCKETS}}
    last_bucket: dict[str, Any] = {}
    for snap_id, taken in ordered:
        reasons = []
        if left["keep_last"] > 0:
            left["keep_last"] -= 1
            reasons.append("keep_last")
        for rule, bucket_of in _BUCKETS.items():
            bucket = bucket_of(_utc(taken))
            if left[rule] > 0 and last_bucket.get(rule) != bucket:
                left[rule] -= 1
                last_bucket[rule] = bucket
                reasons.append(rule)
        if snap_id in (protected or {}):
            reasons.append((protected or {})[snap_id])
        if reasons:
            keep[snap_id] = reasons
    if ordered and not keep:  # no rule kept anything: the newest stays, the only copy is never lost
        keep[ordered[0][0]] = ["newest"]
    return Plan(keep=keep, forget=[snap_id for snap_id, _ in ordered if snap_id not in keep])


def apply_retention(c: Container, machine_id: str, *, job_id: str | None = None) -> list[str]:
    """Apply the machine's retention rules now: start a `delete_snapshot` job for each complete snapshot
    they do not keep. Returns the ids whose delete started. A machine without retention rules is left
    alone. A delete the normal path refuses (busy, needed) is skipped with a `retention_skipped` event."""
    with transaction(c.session_factory) as s:
        policy = s.get(MachinePolicy, machine_id)
        rules = (policy.spec or {}).get("retention") if policy is not None else None
        if not rules:
            return []
        rows = s.execute(
            select(Snapshot.id, Snapshot.created_at, Snapshot.workspace_path).where(
                Snapshot.machine_id == machine_id, Snapshot.status == RESTORABLE
            )
        ).all()
        protected = {sid: "needed to wake" for sid in snapshots_needed_by_machines(s)}
        in_use = s.scalars(
            select(Job.snapshot_id).where(Job.status.in_(job_service.ACTIVE), Job.snapshot_id.in_([r.id for r in rows]))
        )
        protected.update({sid: "in use by a job" for sid in in_use if sid and sid not in protected})
        groups: dict[str | None, list[tuple[str, dt.datetime]]] = {}
        for r in rows:  # one group per workspace path, as restic groups by paths
            groups.setdefault(r.workspace_path, []).append((r.id, r.created_at))
        plans = [plan(group, rules, protected=protected) for group in groups.values()]
        result = Plan(
            keep={k: v for p in plans for k, v in p.keep.items()},
            forget=sorted((i for p in plans for i in p.forget), reverse=True),
        )
    started: list[str] = []
    for snap_id in result.forget:
        try:
            delete_snapshot(c, snap_id)
            started.append(snap_id)
        except GpusnapError as e:
            logger.info("retention of %s: not deleting %s: %s", machine_id, snap_id, e.message)
            with transaction(c.session_factory) as s:
                add_event(s, machine_id, "retention_skipped", f"kept {snap_id}: {e.code}: {e.message}", job_id=job_id)
    with transaction(c.session_factory) as s:
        add_event(
            s,
            machine_id,
            "retention",
            f"kept {len(result.keep)} complete snapshot(s), deleting {len(started)}",
            job_id=job_id,
            data={"kept": result.keep, "deleting": started},
        )
    return started


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)
