"""Machine policies: what the worker's scheduler does to a machine by itself (scheduled snapshots,
retention, idle auto-hibernate). This module stores and reads them; `src/jobs/scheduler.py` carries
them out."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from src.db import transaction
from src.errors import Unprocessable
from src.models import IdleSample, MachinePolicy, ScheduleSlot, utcnow
from src.services import cron
from src.services.machines import add_event, find_machine, vast_instance_id_of
from src.services.path_policy import check_excludes, check_restore_path
from src.services.views import iso

if TYPE_CHECKING:
    from src.container import Container


def put_policy(c: Container, machine_id: str, spec: dict[str, Any]) -> dict[str, Any]:
    """Set (replace) the machine's policy; `spec` is a validated `PolicyRequest` as plain data. A new or
    changed schedule counts its slots from now (none in the past runs); new or changed idle rules start
    a new sampling window. Raises NotFound; Unprocessable when a part cannot be carried out
    (`no_workspace_path`, `exclude_matches_root`, `system_path`, `no_vast_instance`); NotConfigured
    when an action needs vast.ai or the bucket and they are not configured - now, not at 3 a.m."""
    spec = {**spec, "excludes": check_excludes(spec.get("excludes")) or []}
    idle: dict[str, Any] | None = spec.get("idle")
    action = idle.get("action") if idle is not None else None
    acts = idle is not None and not idle.get("dry_run") and action in ("hibernate", "pause")
    if spec.get("schedule") or (acts and action == "hibernate"):
        c.object_store()
    if acts:
        c.vast()
    now = utcnow()
    with transaction(c.session_factory) as s:
        machine = find_machine(s, machine_id)
        workspace: str | None = spec.get("workspace_path") or machine.workspace_path
        if (spec.get("schedule") or action == "hibernate") and not workspace:
            raise Unprocessable(
                f"machine {machine.id} has no known workspace_path; give one in the policy", code="no_workspace_path"
            )
        if acts and action == "hibernate" and workspace:
            check_restore_path(workspace, what="workspace_path (where wake will restore it)")
        if acts and machine.vast_instance_id is None:
            # A numeric machine id is taken as its vast.ai instance id, as hibernate does for a new machine.
            vast_id = vast_instance_id_of(machine.id)
            if vast_id is None:
                raise Unprocessable(
                    f"machine {machine.id} has no vast.ai instance to {action}; use action notify or dry_run",
                    code="no_vast_instance",
                )
            machine.vast_instance_id = vast_id
            add_event(s, machine.id, "vast_instance_assumed", f"taken to be vast.ai instance {vast_id} (its id)")
        row = s.get(MachinePolicy, machine.id, with_for_update=True)
        old = row.spec if row is not None else {}
        if row is None:
            row = MachinePolicy(machine_id=machine.id, spec=spec, schedule_from=now, next_sample_at=now)
            s.add(row)
        else:
            if old.get("schedule") != spec.get("schedule"):
                row.schedule_from = now
            if old.get("idle") != spec.get("idle"):
                row.next_sample_at = now
            row.spec = spec
        if old.get("idle") != spec.get("idle"):
            s.execute(delete(IdleSample).where(IdleSample.machine_id == machine.id))  # a new window
        add_event(s, machine.id, "policy_set", _summary(spec), data=spec)
        s.flush()
        return policy_view(s, row)


def get_policy(c: Container, machine_id: str) -> dict[str, Any] | None:
    """The machine's policy, or None when it has none. Raises NotFound for an unknown machine."""
    with transaction(c.session_factory) as s:
        machine = find_machine(s, machine_id)
        row = s.get(MachinePolicy, machine.id)
        return None if row is None else policy_view(s, row)


def delete_policy(c: Container, machine_id: str) -> bool:
    """Remove the machine's policy (idempotent: False when it had none). Jobs the policy started go on."""
    with transaction(c.session_factory) as s:
        machine = find_machine(s, machine_id)
        row = s.get(MachinePolicy, machine.id)
        if row is None:
            return False
        s.delete(row)
        s.execute(delete(IdleSample).where(IdleSample.machine_id == machine.id))
        add_event(s, machine.id, "policy_removed", "policy removed")
        return True


def policy_view(s: Session, row: MachinePolicy) -> dict[str, Any]:
    spec = row.spec or {}
    schedule = spec.get("schedule")
    last_slot = s.scalar(
        select(ScheduleSlot.slot_at)
        .where(ScheduleSlot.machine_id == row.machine_id)
        .order_by(ScheduleSlot.slot_at.desc())
        .limit(1)
    )
    next_run = cron.parse(schedule).next_after(utcnow()) if schedule else None
    return {
        "machine_id": row.machine_id,
        "workspace_path": spec.get("workspace_path"),
        "excludes": list(spec.get("excludes") or []),
        "codec": spec.get("codec") or "auto",
        "schedule": schedule,
        "retention": spec.get("retention"),
        "idle": spec.get("idle"),
        "next_run_at": iso(next_run),
        "last_slot_at": iso(last_slot),
        "created_at": iso(row.created_at),
        "updated_at": iso(row.updated_at),
    }


def _summary(spec: dict[str, Any]) -> str:
    parts = []
    if spec.get("schedule"):
        parts.append(f"snapshots at '{spec['schedule']}' UTC")
    if spec.get("retention"):
        parts.append("retention " + ", ".join(f"{k}={v}" for k, v in spec["retention"].items() if v))
    if spec.get("idle"):
        i = spec["idle"]
        parts.append(
            f"{'dry-run ' if i.get('dry_run') else ''}{i.get('action')} after {i.get('for_s')}s below "
            f"{i.get('gpu_util_below')}% GPU"
        )
    return "policy set: " + ("; ".join(parts) or "nothing scheduled")
