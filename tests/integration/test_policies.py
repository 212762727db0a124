"""Machine policies through the API and the scheduler, on SQLite and PostgreSQL: validation, the
policy in the machine's view, schedule slots (missed slots run once, a slot runs once however many
workers tick at once, a hibernated or busy machine is skipped with an event), retention through the
normal delete path with its protections, and the wake queue. The scheduler's `tick` is called with an
explicit clock; jobs it starts are run with `run_jobs` where a test needs them to end."""

from __future__ import annotations

import datetime as dt
import threading
import time

import pytest

from src.app import create_app
from src.db import transaction
from src.jobs.runner import JobRunner
from src.jobs.scheduler import tick
from src.models import Job, Machine, MachineEvent, ScheduleSlot, Snapshot, utcnow
from src.services import jobs as job_service
from src.services.retention import apply_retention
from src.services.wake_queue import admit_wakes, hold_unless_admitted
from tests.support.fixtures_app import AUTH, make_settings, run_jobs
from tests.support.snapshots import add_complete_snapshot

POLICY = {
    "workspace_path": "/workspace",
    "excludes": [".cache"],
    "schedule": "0 3 * * *",
    "retention": {"keep_last": 7, "keep_daily": 7, "keep_weekly": 4, "keep_monthly": 0},
    "idle": {
        "gpu_util_below": 5,
        "for_s": 1800,
        "sample_every_s": 60,
        "action": "notify",
        "respect_ssh_sessions": True,
        "dry_run": False,
    },
}


def _machine(app, machine_id: str = "m1", *, status: str = "running", vast_id: int | None = None) -> None:
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        s.add(
            Machine(
                id=machine_id,
                status=status,
                ssh_host="127.0.0.1",
                ssh_port=22,
                workspace_path="/workspace",
                vast_instance_id=vast_id,
            )
        )


def _events(app, machine_id: str, kind: str) -> list[MachineEvent]:
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        return list(s.query(MachineEvent).filter_by(machine_id=machine_id, kind=kind).order_by(MachineEvent.id))


def _jobs(app, kind: str) -> list[Job]:
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        return list(s.query(Job).filter_by(kind=kind).order_by(Job.id))


# ---- the resource ---------------------------------------------------------------------------------


def test_put_get_delete_and_the_machine_view(app, client):  # type: ignore[no-untyped-def]
    _machine(app)
    r = client.put("/api/instances/m1/policy", json=POLICY, headers=AUTH)
    assert r.status_code == 200, r.get_json()
    body = r.get_json()
    assert body["schedule"] == "0 3 * * *" and body["retention"] == POLICY["retention"]
    assert body["idle"] == POLICY["idle"] and body["excludes"] == [".cache"]
    assert body["next_run_at"].endswith("T03:00:00Z") and body["last_slot_at"] is None
    assert client.get("/api/instances/m1/policy", headers=AUTH).get_json() == body
    machine = client.get("/api/instances/m1", headers=AUTH).get_json()
    assert machine["policy"] == body
    assert [e["kind"] for e in machine["events"]][-1] == "policy_set"
    # Every part is optional; a PUT replaces the whole policy.
    r = client.put("/api/instances/m1/policy", json={"retention": {"keep_last": 2}}, headers=AUTH)
    assert r.status_code == 200 and r.get_json()["schedule"] is None and r.get_json()["idle"] is None
    assert client.delete("/api/instances/m1/policy", headers=AUTH).status_code == 204
    assert client.delete("/api/instances/m1/policy", headers=AUTH).status_code == 204  # idempotent
    r = client.get("/api/instances/m1/policy", headers=AUTH)
    assert r.status_code == 404 and r.get_json()["error"]["code"] == "no_policy"
    assert client.get("/api/instances/m1", headers=AUTH).get_json()["policy"] is None


@pytest.mark.parametrize(
    "body, code, where",
    [
        ({"schedule": "0 3 * *"}, "validation_error", "schedule"),
        ({"schedule": "61 * * * *"}, "validation_error", "schedule"),
        ({"schedule": "0 0 31 2 *"}, "validation_error", "schedule"),
        ({"schedule": "0 3 * * * ; rm -rf /"}, "validation_error", "schedule"),
        ({"retention": {"keep_last": 0}}, "validation_error", "retention"),
        ({"retention": {"keep_last": -1}}, "validation_error", "retention"),
        ({"retention": {"keep_hourly": 3}}, "validation_error", "retention"),
        ({"idle": {"for_s": 30, "sample_every_s": 60}}, "validation_error", "idle"),
        ({"idle": {"action": "destroy"}}, "validation_error", "idle"),
        ({"idle": {"gpu_util_below": 0}}, "validation_error", "idle"),
        ({"workspace_path": "/workspace/../etc"}, "validation_error", "workspace_path"),
        ({"excludes": ["*"], "schedule": "0 3 * * *"}, "exclude_matches_root", None),
        ({"surprise": 1}, "validation_error", "surprise"),
    ],
)
def test_bad_policies_are_refused(app, client, body, code, where):  # type: ignore[no-untyped-def]
    _machine(app)
    r = client.put("/api/instances/m1/policy", json=body, headers=AUTH)
    assert r.status_code == 422, r.get_json()
    error = r.get_json()["error"]
    assert error["code"] == code
    if where:
        assert error["message"].startswith(where)
    assert client.get("/api/instances/m1/policy", headers=AUTH).status_code == 404


def test_policy_refusals_that_need_the_machine(app, client):  # type: ignore[no-untyped-def]
    r = client.put("/api/instances/nobody/policy", json={}, headers=AUTH)
    assert r.status_code == 404
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        s.add(Machine(id="bare", status="running", ssh_host="127.0.0.1", ssh_port=22))
    r = client.put("/api/instances/bare/policy", json={"schedule": "0 3 * * *"}, headers=AUTH)
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "no_workspace_path"
    # hibernate needs vast.ai, which this app has no key for: 503 now, not a failed job at 3 a.m.
    r = client.put(
        "/api/instances/bare/policy", json={"workspace_path": "/w", "idle": {"action": "hibernate"}}, headers=AUTH
    )
    assert r.status_code == 503 and r.get_json()["error"]["code"] == "not_configured"
    r = client.put(
        "/api/instances/bare/policy",
        json={"workspace_path": "/w", "idle": {"action": "hibernate", "dry_run": True}},
        headers=AUTH,
    )
    assert r.status_code == 200


# ---- schedules ------------------------------------------------------------------------------------


def _set(app, client, machine_id: str, body: dict) -> dt.datetime:  # type: ignore[no-untyped-def]
    r = client.put(f"/api/instances/{machine_id}/policy", json=body, headers=AUTH)
    assert r.status_code == 200, r.get_json()
    return utcnow()


def test_a_due_slot_starts_one_snapshot_job_and_missed_slots_run_once(app, client):  # type: ignore[no-untyped-def]
    c = app.extensions["gpusnap"]
    _machine(app)
    set_at = _set(app, client, "m1", {"schedule": "* * * * *"})
    assert tick(c, now=set_at)["scheduled"] == []  # the slot of the minute the policy was set is in the past
    first = tick(c, now=set_at + dt.timedelta(minutes=1))
    assert len(first["scheduled"]) == 1
    assert tick(c, now=set_at + dt.timedelta(minutes=1, seconds=30))["scheduled"] == []  # same slot
    (job,) = _jobs(app, "create_snapshot")
    assert job.id == first["scheduled"][0] and job.machine_id == "m1"
    with transaction(c.session_factory) as s:
        snap = s.get(Snapshot, job.snapshot_id)
        assert snap.name.startswith("scheduled ") and snap.excludes == [] and snap.workspace_path == "/workspace"
    with transaction(c.session_factory) as s:  # the job ends (as a worker would end it)
        row = s.get(Job, job.id)
        job_service.finish_in_session(s, row, status="succeeded")
    # No worker ran for an hour: one snapshot for the newest slot, not sixty.
    later = tick(c, now=set_at + dt.timedelta(hours=1, minutes=1))
    assert len(later["scheduled"]) == 1
    assert len(_jobs(app, "create_snapshot")) == 2


def test_a_hibernated_or_busy_machine_is_skipped_with_an_event(app, client):  # type: ignore[no-untyped-def]
    c = app.extensions["gpusnap"]
    _machine(app, "busy")
    _machine(app, "asleep")
    set_at = _set(app, client, "busy", {"schedule": "*/5 * * * *"})
    _set(app, client, "asleep", {"schedule": "*/5 * * * *"})
    r = client.post(
        "/api/gpu-snapshots",
        json={"instance_id": "busy", "ssh_host": "127.0.0.1", "ssh_port": 22, "workspace_path": "/workspace"},
        headers=AUTH,
    )
    assert r.status_code == 202
    with transaction(c.session_factory) as s:
        s.get(Machine, "asleep").status = "hibernated"
    report = tick(c, now=set_at + dt.timedelta(minutes=5))
    assert report["scheduled"] == [] and sorted(report["skipped"]) == ["asleep", "busy"]
    assert "machine_busy" in _events(app, "busy", "schedule_skipped")[0].message
    assert "machine_hibernated" in _events(app, "asleep", "schedule_skipped")[0].message
    with transaction(c.session_factory) as s:
        assert {r.outcome for r in s.query(ScheduleSlot)} == {"skipped"}
    assert len(_jobs(app, "create_snapshot")) == 1  # only the one the request started


def test_workers_ticking_at_once_run_each_slot_exactly_once(app, client, tmp_path, database_url, store):  # type: ignore[no-untyped-def]
    """Four "workers" (each its own app, engine and connection pool, as separate processes would have)
    tick at the same instants for several slots; each slot starts one job."""
    c = app.extensions["gpusnap"]
    for i in range(3):
        _machine(app, f"m{i}")
    set_at = _set(app, client, "m0", {"schedule": "* * * * *"})
    _set(app, client, "m1", {"schedule": "* * * * *"})
    _set(app, client, "m2", {"schedule": "* * * * *"})
    workers = [
        create_app(make_settings(tmp_path, database_url), object_store=store, configure_logs=False) for _ in range(4)
    ]
    started: list[str] = []
    errors: list[BaseException] = []
    for minute in range(1, 4):
        with transaction(c.session_factory) as s:  # let the previous slot's jobs end
            for job in s.query(Job).filter(Job.status == "queued"):
                job_service.finish_in_session(s, job, status="succeeded")
        now = set_at + dt.timedelta(minutes=minute)
        gate = threading.Barrier(len(workers))

        def run(w) -> None:  # type: ignore[no-untyped-def]
            try:
                gate.wait()
                started.extend(tick(w.extensions["gpusnap"], now=now)["scheduled"])
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)

        threads = [threading.Thread(target=run, args=(w,)) for w in workers]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
    for w in workers:
        w.extensions["gpusnap"].engine.dispose()
    assert errors == []
    jobs = _jobs(app, "create_snapshot")
    assert len(jobs) == 9 and sorted(started) == sorted(j.id for j in jobs)
    with transaction(c.session_factory) as s:
        assert s.query(ScheduleSlot).count() == 9


# ---- retention ------------------------------------------------------------------------------------


def _snapshots(app, store, machine_id: str, n: int) -> list[str]:  # type: ignore[no-untyped-def]
    ids = []
    for _ in range(n):
        ids.append(add_complete_snapshot(app, store, machine_id=machine_id, parts=1)["id"])
        time.sleep(0.002)  # ids order by creation only across milliseconds
    return ids


def _status(app, ids: list[str]) -> list[str | None]:  # type: ignore[no-untyped-def]
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        return [(s.get(Snapshot, i).status if s.get(Snapshot, i) else None) for i in ids]


def test_retention_deletes_through_the_delete_job_and_keeps_protected_ones(app, client, store):  # type: ignore[no-untyped-def]
    c = app.extensions["gpusnap"]
    _machine(app)
    ids = _snapshots(app, store, "m1", 5)
    _set(app, client, "m1", {"retention": {"keep_last": 2}})
    # ids[0] is being restored somewhere: in use, so kept whatever the rules say.
    r = client.post(
        f"/api/gpu-snapshots/{ids[0]}/restore",
        json={"ssh_host": "127.0.0.1", "ssh_port": 22, "workspace_path": "/restore", "instance_id": "other"},
        headers=AUTH,
    )
    assert r.status_code == 202
    deleting = apply_retention(c, "m1")
    assert deleting == [ids[2], ids[1]]
    assert [j.snapshot_id for j in _jobs(app, "delete_snapshot")] == deleting
    assert _status(app, ids) == ["complete", "deleting", "deleting", "complete", "complete"]
    with transaction(c.session_factory) as s:  # the restore is not run here: end it so its worker is not needed
        job_service.finish_in_session(s, s.get(Job, r.get_json()["job"]["id"]), status="cancelled")
    run_jobs(app)
    assert _status(app, ids) == ["complete", None, None, "complete", "complete"]
    assert list(store.list(f"snapshots/m1/{ids[1]}/")) == [] and list(store.list(f"snapshots/m1/{ids[0]}/"))
    kept = _events(app, "m1", "retention")[-1].data["kept"]
    assert kept[ids[0]] == ["in use by a job"] and set(kept) == {ids[0], ids[3], ids[4]}


def test_retention_never_deletes_what_a_hibernated_machine_would_wake_from(app, client, store):  # type: ignore[no-untyped-def]
    c = app.extensions["gpusnap"]
    _machine(app)
    ids = _snapshots(app, store, "m1", 3)
    _set(app, client, "m1", {"retention": {"keep_last": 1}})
    with transaction(c.session_factory) as s:
        s.get(Machine, "m1").status = "hibernated"
        # The newest snapshot by id (what wake picks) is dated earliest here: the rules alone would drop it.
        s.get(Snapshot, ids[2]).created_at = dt.datetime(2020, 1, 1, tzinfo=dt.timezone.utc)
    deleting = apply_retention(c, "m1")
    assert ids[2] not in deleting and deleting == [ids[0]]
    assert _events(app, "m1", "retention")[-1].data["kept"][ids[2]] == ["needed to wake"]


def test_a_successful_snapshot_job_applies_retention(app, client, store):  # type: ignore[no-untyped-def]
    """The hook the production kinds carry (`with_retention`), run around a stand-in snapshot job."""
    from src.jobs.context import JobContext
    from src.jobs.kinds import JobKind
    from src.jobs.scheduler import with_retention

    c = app.extensions["gpusnap"]
    _machine(app)
    ids = _snapshots(app, store, "m1", 3)
    _set(app, client, "m1", {"retention": {"keep_last": 2}})
    ran: list[str] = []
    kind = with_retention(JobKind("create_snapshot", lambda ctx: ran.append(ctx.job_id) or {"ok": True}))
    with transaction(c.session_factory) as s:
        job = job_service.add_job(s, kind="create_snapshot", params={}, lock_key="machine:m1", machine_id="m1")
    result = kind.run(JobContext(container=c, job=job))
    assert ran == [job.id] and result == {"ok": True, "retention_deleting": [ids[0]]}


# ---- the wake queue -------------------------------------------------------------------------------


@pytest.fixture
def capped(tmp_path, database_url, store):  # type: ignore[no-untyped-def]
    application = create_app(
        make_settings(tmp_path, database_url, wake_concurrency=1, vast_api_key="k"),
        object_store=store,
        vast=object(),
        configure_logs=False,
    )
    yield application
    application.extensions["gpusnap"].engine.dispose()


def _queued_ids(app) -> list[str]:  # type: ignore[no-untyped-def]
    huey = app.extensions["gpusnap"].queue.huey
    return [t.args[0] for t in huey.pending()]


def test_wakes_wait_for_a_place_highest_priority_first(capped, store):  # type: ignore[no-untyped-def]
    c = capped.extensions["gpusnap"]
    client = capped.test_client()
    for name in ("a", "b", "c", "d"):
        add_complete_snapshot(capped, store, machine_id=name)
        with transaction(c.session_factory) as s:
            s.get(Machine, name).status = "hibernated"
    jobs = {}
    for name, priority in (("a", 5), ("b", 1), ("c", 9), ("d", 5)):
        r = client.post(f"/api/instances/{name}/wake", json={"priority": priority}, headers=AUTH)
        assert r.status_code == 202, r.get_json()
        jobs[name] = r.get_json()["job"]
    assert jobs["a"]["phase"] == "wake_queued"
    assert _queued_ids(capped) == [jobs["a"]["id"]]  # the first took the only place
    with transaction(c.session_factory) as s:
        assert [s.get(Job, jobs[n]["id"]).phase for n in "bcd"] == ["wake_queued"] * 3
    assert admit_wakes(c) == []  # no free place while "a" holds it
    # A waiting wake that reaches a worker anyway (recovery re-sends old queued jobs) is put back,
    # by the runner as the worker runs it, and by the check itself.
    JobRunner(c).run(jobs["b"]["id"])
    claimed = job_service.claim(c.session_factory, jobs["b"]["id"], worker="w")
    assert not hold_unless_admitted(c, claimed.id, attempt=claimed.attempts, state=claimed.state)
    with transaction(c.session_factory) as s:
        row = s.get(Job, jobs["b"]["id"])
        assert (row.status, row.attempts, row.phase, row.started_at) == ("queued", 0, "wake_queued", None)
    # "a" ends: the next place goes to priority 9, then the older of the two 5s, then 1.
    order = []
    for name in ("a", "c", "d"):
        with transaction(c.session_factory) as s:
            job_service.finish_in_session(s, s.get(Job, jobs[name]["id"]), status="failed", error=("x", "y"))
        order += admit_wakes(c)
    assert order == [jobs["c"]["id"], jobs["d"]["id"], jobs["b"]["id"]]
    with transaction(c.session_factory) as s:
        assert "admitted_at" in s.get(Job, jobs["b"]["id"]).state


def test_wake_priority_is_validated(capped, store):  # type: ignore[no-untyped-def]
    client = capped.test_client()
    add_complete_snapshot(capped, store, machine_id="a")
    r = client.post("/api/instances/a/wake", json={"priority": 10}, headers=AUTH)
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "validation_error"
