"""The worker's own scheduler: a Huey periodic task (`gpusnap.policy_tick`, once a minute in every worker;
no separate service) that carries out machine policies. Each tick:

- starts the scheduled snapshot of every machine whose schedule has a slot due (the newest slot at or
  before now, so slots missed while no worker ran are run once, not once each), claiming the slot first
  with a row whose primary key is (machine, slot): of several workers, exactly one gets it;
- admits queued wakes up to WAKE_CONCURRENCY (`src.services.wake_queue`);
- then samples the machines that have idle rules (each sample claimed by a conditional UPDATE of the
  policy's `next_sample_at`), side by side, PROBE_THREADS at once: a host that never answers holds only
  its own probe, until its deadline; when one is idle by `src.services.idle.decide`, starts its action.

Everything it starts is an ordinary job through the same service functions the API calls, so the
one-operation-per-machine lock, progress, cancel and the job list apply. What it cannot start (the
machine is hibernated, busy: 409) is skipped with an event on the machine."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, or_, select, update
from sqlalchemy.exc import SQLAlchemyError

from src.db import rowcount, transaction
from src.errors import GpusnapError
from src.jobs.context import JobContext
from src.models import IdleSample, Machine, MachinePolicy, ScheduleSlot, utcnow
from src.services import cron, idle
from src.services.machines import active_job_id, add_event

if TYPE_CHECKING:
    from src.container import Container
    from src.jobs.kinds import JobKind

logger = logging.getLogger(__name__)
SLOT_HISTORY = dt.timedelta(days=31)
PROBE_THREADS = 8  # idle probes in flight at once within one tick


def tick(c: Container, *, now: dt.datetime | None = None) -> dict[str, Any]:
    """One pass of the scheduler (what the periodic task runs). `now` is for tests. Returns what it did:
    {"scheduled": [job ids], "skipped": [machine ids], "sampled": [machine ids], "actions": [...]}."""
    now = now or utcnow()
    report: dict[str, Any] = {"scheduled": [], "skipped": [], "sampled": [], "actions": [], "admitted": []}
    policies = _policies(c)
    # Schedules and wake admissions only touch the database: they go first, so no host can delay them.
    for machine_id, spec, schedule_from, _ in policies:
        if spec.get("schedule"):
            _guarded(machine_id, _run_schedule, c, machine_id, spec, schedule_from, now=now, report=report)
    from src.services.wake_queue import admit_wakes

    report["admitted"] = admit_wakes(c)
    # Idle probes reach hosts, and a hostile or wedged one answers nothing until PROBE_DEADLINE_S: they run
    # side by side, so one such host costs the tick one deadline, not one per machine behind it.
    idle_ones = [(machine_id, spec) for machine_id, spec, _, _ in policies if spec.get("idle")]
    if idle_ones:
        with ThreadPoolExecutor(
            max_workers=min(PROBE_THREADS, len(idle_ones)), thread_name_prefix="idle-probe"
        ) as pool:
            for future in [
                pool.submit(_guarded, machine_id, _run_idle, c, machine_id, spec, now=now, report=report)
                for machine_id, spec in idle_ones
            ]:
                future.result()
    return report


def _guarded(machine_id: str, step: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    try:
        step(*args, **kwargs)
    except (GpusnapError, SQLAlchemyError, ValueError):  # one machine's trouble must not stop the others'
        logger.exception("policy of machine %s failed this tick", machine_id)


def _policies(c: Container) -> list[tuple[str, dict[str, Any], dt.datetime | None, dt.datetime | None]]:
    with transaction(c.session_factory) as s:
        return [
            (p.machine_id, dict(p.spec or {}), p.schedule_from, p.next_sample_at)
            for p in s.scalars(select(MachinePolicy).order_by(MachinePolicy.machine_id))
        ]


# ---- schedules ------------------------------------------------------------------------------------


def _run_schedule(
    c: Container,
    machine_id: str,
    spec: dict[str, Any],
    schedule_from: dt.datetime | None,
    *,
    now: dt.datetime,
    report: dict[str, Any],
) -> None:
    slot = cron.parse(spec["schedule"]).latest_at_or_before(now)
    if slot is None or (schedule_from is not None and slot <= _utc(schedule_from)):
        return
    if not _claim_slot(c, machine_id, slot):
        return  # another worker (or an earlier tick) has this slot
    from src.services.snapshots import create_snapshot

    outcome, job_id, why = "skipped", None, ""
    with transaction(c.session_factory) as s:
        m = s.get(Machine, machine_id)
        endpoint = (m.ssh_host, m.ssh_port, m.ssh_user, m.workspace_path, m.status) if m else None
    if endpoint is None:
        return
    host, port, user, machine_workspace, status = endpoint
    if status not in ("running", "unknown"):
        why = f"machine_{status}: the machine is {status}"
    elif not host or not port:
        why = "no_ssh_endpoint: the machine has no SSH endpoint"
    else:
        try:
            _snap, job = create_snapshot(
                c,
                instance_id=machine_id,
                ssh_host=host,
                ssh_port=port,
                ssh_user=user,
                workspace_path=spec.get("workspace_path") or machine_workspace,
                name=f"scheduled {slot:%Y-%m-%dT%H:%MZ}",
                codec=spec.get("codec") or "auto",
                excludes=list(spec.get("excludes") or []),
            )
            outcome, job_id = "started", job["id"]
        except GpusnapError as e:  # busy (409), hibernated meanwhile, host no longer allowed, no bucket
            why = f"{e.code}: {e.message}"
    with transaction(c.session_factory) as s:
        s.execute(
            update(ScheduleSlot)
            .where(ScheduleSlot.machine_id == machine_id, ScheduleSlot.slot_at == slot)
            .values(outcome=outcome, job_id=job_id)
        )
        # Only the newest slot is ever claimed, so older rows are history: a month of it is kept.
        s.execute(
            delete(ScheduleSlot).where(
                ScheduleSlot.machine_id == machine_id, ScheduleSlot.slot_at < slot - SLOT_HISTORY
            )
        )
        if outcome == "skipped":
            add_event(
                s,
                machine_id,
                "schedule_skipped",
                f"slot {slot:%Y-%m-%dT%H:%MZ} skipped: {why}"[:2000],
                data={"slot": f"{slot:%Y-%m-%dT%H:%MZ}"},
            )
    report["scheduled" if outcome == "started" else "skipped"].append(job_id or machine_id)
    logger.info("schedule slot %s of %s: %s %s", f"{slot:%Y-%m-%dT%H:%MZ}", machine_id, outcome, job_id or why)


def _claim_slot(c: Container, machine_id: str, slot: dt.datetime) -> bool:
    """Insert the (machine, slot) row; False when it exists (claimed by another worker or tick)."""
    with transaction(c.session_factory) as s:
        dialect = s.get_bind().dialect.name
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert  # type: ignore[assignment]
        stmt = (
            insert(ScheduleSlot)
            .values(machine_id=machine_id, slot_at=slot, outcome="claimed", claimed_at=utcnow())
            .on_conflict_do_nothing()
            .returning(ScheduleSlot.machine_id)
        )
        return s.execute(stmt).scalar_one_or_none() is not None


# ---- idle -------------------------------------------------------------------------------------------


def _run_idle(c: Container, machine_id: str, spec: dict[str, Any], *, now: dt.datetime, report: dict[str, Any]) -> None:
    rules = spec["idle"]
    every = dt.timedelta(seconds=float(rules["sample_every_s"]))
    with transaction(c.session_factory) as s:
        m = s.get(Machine, machine_id)
        if m is None or m.status != "running" or active_job_id(s, machine_id) is not None:
            return  # not up, or a job holds it (busy by definition): no sample, and the gap counts as busy
        # Claim this interval's sample: of several workers, the one whose UPDATE matches takes it. 10% slack
        # so a tick a little early (the minute ticks drift) does not skip a whole interval.
        claimed = rowcount(
            s.execute(
                update(MachinePolicy)
                .where(
                    MachinePolicy.machine_id == machine_id,
                    or_(MachinePolicy.next_sample_at.is_(None), MachinePolicy.next_sample_at <= now),
                )
                .values(next_sample_at=now + every * 0.9)
            )
        )
    if claimed != 1:
        return
    from src.jobs.idle_probe import take_sample

    take_sample(c, machine_id, now=now)
    report["sampled"].append(machine_id)
    horizon = now - dt.timedelta(seconds=float(rules["for_s"]) + idle.max_gap_s(rules) * 2)
    with transaction(c.session_factory) as s:
        s.execute(delete(IdleSample).where(IdleSample.machine_id == machine_id, IdleSample.taken_at < horizon))
        rows = s.scalars(select(IdleSample).where(IdleSample.machine_id == machine_id)).all()
        samples = [
            idle.Sample(taken_at=r.taken_at, ok=r.ok, gpu_util=r.gpu_util, ssh_sessions=r.ssh_sessions, error=r.error)
            for r in rows
        ]
    decision = idle.decide(samples, now=now, rules=rules)
    if decision.idle:
        report["actions"].append(_act(c, machine_id, spec, decision))


def _act(c: Container, machine_id: str, spec: dict[str, Any], decision: idle.Decision) -> dict[str, Any]:
    """Run the idle action, then start a new window (so an action that could not start is tried again
    only after another full idle window, not every minute)."""
    from src.services import instances

    rules = spec["idle"]
    action = rules.get("action", "hibernate")
    done: dict[str, Any] = {"machine_id": machine_id, "action": action, "dry_run": bool(rules.get("dry_run"))}
    kind, text = "idle_action", ""
    try:
        if rules.get("dry_run"):
            kind, text = "idle_dry_run", f"would {action}: {decision.reason}"
        elif action == "notify":
            kind, text = "idle", f"idle: {decision.reason}"
        elif action == "pause":
            _require_sampled_instance(c, machine_id)
            done["job_id"] = instances.pause(c, machine_id)["id"]
            text = f"pausing (job {done['job_id']}): {decision.reason}"
        else:
            _require_sampled_instance(c, machine_id)
            with transaction(c.session_factory) as s:
                workspace = spec.get("workspace_path") or s.get(Machine, machine_id).workspace_path  # type: ignore[union-attr]
            done["job_id"] = instances.hibernate(
                c,
                machine_id,
                workspace_path=workspace,
                codec=spec.get("codec") or "auto",
                excludes=list(spec.get("excludes") or []),
                idle_guard={
                    "gpu_util_below": rules["gpu_util_below"],
                    "respect_ssh_sessions": rules.get("respect_ssh_sessions", True),
                },
            )["id"]
            text = f"hibernating (job {done['job_id']}): {decision.reason}"
    except GpusnapError as e:
        kind, text = "idle_action_skipped", f"idle, but {action} could not start: {e.code}: {e.message}"
        done["error"] = e.code
    with transaction(c.session_factory) as s:
        add_event(s, machine_id, kind, text[:2000], job_id=done.get("job_id"), data=done)
        s.execute(delete(IdleSample).where(IdleSample.machine_id == machine_id))
    logger.info("idle policy of %s: %s", machine_id, text)
    return done


def _require_sampled_instance(c: Container, machine_id: str) -> None:
    """Raise Unprocessable(`endpoint_mismatch`) unless vast.ai reports the machine's SSH endpoint, the host
    the samples came from, as its instance's own. A machine's instance may only be assumed from its
    numeric id (`vast_instance_assumed`): an idle plain host must not stop or destroy a rented one."""
    from src.errors import Unprocessable
    from src.jobs.hibernate import endpoint_text, own_endpoints

    with transaction(c.session_factory) as s:
        m = s.get(Machine, machine_id)
        host, port, vast_id = (m.ssh_host, m.ssh_port, m.vast_instance_id) if m else (None, None, None)
    if vast_id is None:
        return  # pause and hibernate refuse it themselves (`no_vast_instance`)
    instance = c.vast().show_instance(int(vast_id))
    own = own_endpoints(instance) if instance is not None else set()
    if not host or not port or endpoint_text(host, port) not in own:
        raise Unprocessable(
            f"the samples came from {host}:{port}, which vast.ai does not report as instance "
            f"{vast_id}'s ({', '.join(sorted(own)) or 'no endpoint'}); nothing was done",
            code="endpoint_mismatch",
        )


# ---- retention after a snapshot ---------------------------------------------------------------------


def with_retention(kind: JobKind) -> JobKind:
    """`kind` whose successful run then applies the machine's retention rules (deletes run as their own
    jobs). A retention that cannot run is logged and recorded; the snapshot job still succeeds."""
    run = kind.run

    def run_then_retain(ctx: JobContext) -> dict[str, Any] | None:
        result = run(ctx)
        if ctx.machine_id:
            from src.services.retention import apply_retention

            try:
                deleting = apply_retention(ctx.container, ctx.machine_id, job_id=ctx.job_id)
            except (GpusnapError, SQLAlchemyError):
                logger.exception("retention after job %s failed; the snapshot stands", ctx.job_id)
            else:
                if deleting and result is not None:
                    result = {**result, "retention_deleting": deleting}
        return result

    return dataclasses.replace(kind, run=run_then_retain)


def with_wake_queue(kind: JobKind) -> JobKind:
    """The `wake` kind under the wake queue: a waiting wake that reached a worker is put back unclaimed
    (it runs once admitted); a wake that ends, however, admits the next one."""
    run = kind.run

    def run_in_turn(ctx: JobContext) -> dict[str, Any] | None:
        from src.jobs.context import JobLost
        from src.services.wake_queue import admit_wakes, hold_unless_admitted

        if not hold_unless_admitted(ctx.container, ctx.job_id, attempt=ctx.attempt, state=ctx.state):
            ctx.lost = True  # the runner records nothing: the row is queued again, as it was
            raise JobLost(ctx.job_id)
        try:
            return run(ctx)
        finally:
            try:
                if not ctx.lost:  # a lost attempt's job goes on elsewhere and still holds its place
                    admit_wakes(ctx.container, finishing=ctx.job_id)
            except SQLAlchemyError:  # the next tick admits it
                logger.warning("could not admit the next wake after job %s", ctx.job_id, exc_info=True)

    return dataclasses.replace(kind, run=run_in_turn)


def _utc(value: dt.datetime) -> dt.datetime:
    return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)
