"""Two real worker processes (`tests.support.test_worker`, the production consumer with its periodic
tasks) share one SQLite database and queue file. Each runs the policy tick at the top of every minute;
a machine's schedule slot is claimed by one of them only. The machine is hibernated, so each slot ends
as one `schedule_skipped` event: counted per slot, a slot run twice would show two."""

from __future__ import annotations

import collections
import datetime as dt
import re
import time

import pytest
from sqlalchemy import select

from src.db import transaction
from src.models import Machine, MachineEvent, MachinePolicy, ScheduleSlot, utcnow
from tests.support.test_worker import WorkerProcess, control_app, worker_env

pytestmark = pytest.mark.slow


def test_two_workers_run_a_slot_once(tmp_path):  # type: ignore[no-untyped-def]
    env = worker_env(tmp_path, QUEUE_PATH=str(tmp_path / "queue.db"))
    app = control_app(env)
    c = app.extensions["gpusnap"]
    with transaction(c.session_factory) as s:
        s.add(Machine(id="asleep", status="hibernated", workspace_path="/workspace"))
        s.flush()
        s.add(
            MachinePolicy(
                machine_id="asleep",
                spec={"schedule": "* * * * *", "excludes": []},
                schedule_from=utcnow() - dt.timedelta(minutes=5),
            )
        )
    workers = [WorkerProcess(env, tmp_path, f"worker-{i}").start() for i in (1, 2)]
    try:
        for w in workers:
            w.wait_ready()
        started = utcnow()
        # Until both workers have ticked for one slot after they started (a minute boundary passed and
        # both logged the tick), then a few seconds for the slower one to finish its claim attempt.
        deadline = time.monotonic() + 150
        while True:
            with transaction(c.session_factory) as s:
                slots = list(s.scalars(select(ScheduleSlot.slot_at)))
            logs = [w.log_tail(200_000) for w in workers]
            # Each consumer enqueued its own tick, and both ticks ran to their end (on either worker).
            ticked = (
                all("Enqueueing periodic task src.jobs.queue.gpusnap.policy_tick" in log for log in logs)
                and sum(len(re.findall(r"gpusnap\.policy_tick: \S+ executed in", log)) for log in logs) >= 2
            )
            if slots and ticked:
                break
            assert time.monotonic() < deadline, "\n".join(w.log_tail() for w in workers)
            time.sleep(0.5)
        time.sleep(5)
    finally:
        for w in workers:
            w.stop()
    with transaction(c.session_factory) as s:
        slots = list(s.scalars(select(ScheduleSlot)))
        skipped = list(s.scalars(select(MachineEvent).where(MachineEvent.kind == "schedule_skipped")))
        events = [e.data["slot"] for e in skipped]
    assert slots and all(row.outcome == "skipped" for row in slots)
    assert all("machine_hibernated" in e.message for e in skipped)
    per_slot = collections.Counter(events)
    assert set(per_slot.values()) == {1}, per_slot
    assert len(per_slot) == len(slots)
    assert all(
        row.slot_at.replace(tzinfo=dt.timezone.utc)
        >= started.replace(second=0, microsecond=0) - dt.timedelta(minutes=1)
        for row in slots
    )  # the newest slot only, not the five missed ones
    app.extensions["gpusnap"].engine.dispose()
