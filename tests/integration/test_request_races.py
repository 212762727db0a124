"""Requests that race, over a real database (SQLite and PostgreSQL): concurrent first requests for a new
machine, the same Idempotency-Key sent to two API processes at once, and a queue that refuses the job
after its row was committed. Threads released together by a barrier make the race; each request gets a
clear answer and nothing answers 500."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Callable
from typing import Any

from flask import Flask
from huey import RedisHuey

from src.app import create_app
from src.db import transaction
from src.models import Job, Machine, MachineEvent
from src.services import jobs as job_service
from tests.support.fixtures_app import AUTH, make_settings, run_jobs
from tests.support.services import free_port
from tests.support.snapshots import add_complete_snapshot


def _together(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run `calls` in threads released at the same moment; their results in order."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return results


def _post(app: Flask, path: str, body: dict[str, Any], key: str | None = None) -> tuple[int, dict[str, Any]]:
    headers = dict(AUTH, **({"Idempotency-Key": key} if key else {}))
    r = app.test_client().post(path, json=body, headers=headers)
    return r.status_code, r.get_json()


def _snapshot_body(machine_id: str) -> dict[str, Any]:
    return {"instance_id": machine_id, "ssh_host": "10.1.2.3", "ssh_port": 2222, "workspace_path": "/workspace"}


def _hibernate_body() -> dict[str, Any]:
    # destroy_after false: the race is about registering the machine and its lock; a destroying hibernate
    # would also need vast.ai at request time (503 not_configured without it).
    return {"workspace_path": "/workspace", "ssh_host": "10.1.2.3", "ssh_port": 2222, "destroy_after": False}


def test_concurrent_first_requests_for_a_new_machine_one_202_the_rest_409(app):
    for round_ in range(3):
        snap_machine, hib_machine = f"new-{round_}", str(7000 + round_)
        answers = _together([lambda: _post(app, "/api/gpu-snapshots", _snapshot_body(snap_machine))] * 5)
        assert sorted(code for code, _ in answers) == [202, 409, 409, 409, 409], answers
        assert {body["error"]["code"] for code, body in answers if code == 409} == {"machine_busy"}
        answers = _together([lambda: _post(app, f"/api/instances/{hib_machine}/hibernate", _hibernate_body())] * 5)
        assert sorted(code for code, _ in answers) == [202, 409, 409, 409, 409], answers
        codes = {body["error"]["code"] for code, body in answers if code == 409}
        assert codes <= {"machine_busy", "machine_hibernating"}, answers
        with app.extensions["gpusnap"].session_factory() as s:
            for machine_id in (snap_machine, hib_machine):
                assert s.get(Machine, machine_id) is not None
                registered = s.query(MachineEvent).filter_by(machine_id=machine_id, kind="registered").count()
                assert registered == 1
                assert s.query(Job).filter_by(machine_id=machine_id).count() == 1


def test_same_idempotency_key_to_two_api_processes_at_once_gives_both_the_same_job(tmp_path, database_url, store):
    # Two apps, each with its own engine and connection pool, sharing the database: two API processes.
    apps = [
        create_app(make_settings(tmp_path, database_url), object_store=store, configure_logs=False) for _ in range(2)
    ]
    try:
        for round_ in range(4):
            machine_id = f"idem-{round_}"
            key = f"key-{round_}"
            answers = _together(
                [lambda a=a: _post(a, "/api/gpu-snapshots", _snapshot_body(machine_id), key) for a in apps]
            )
            assert [code for code, _ in answers] == [202, 202], answers
            assert answers[0][1]["job"]["id"] == answers[1][1]["job"]["id"]
            assert answers[0][1]["snapshot"]["id"] == answers[1][1]["snapshot"]["id"]
            # The same race for an existing machine, on another endpoint.
            key = f"hib-{round_}"
            answers = _together(
                [
                    lambda a=a: _post(
                        a,
                        f"/api/instances/{machine_id}/hibernate",
                        {"workspace_path": "/w", "destroy_after": False, "ssh_host": "10.1.2.3", "ssh_port": 2222},
                        key,
                    )
                    for a in apps
                ]
            )
            # The machine is busy with the snapshot job: both get the same 409 (no job carries the key).
            assert [(code, body["error"]["code"]) for code, body in answers] == [(409, "machine_busy")] * 2
        # The key with another body is still refused, race or not.
        code, body = _post(apps[0], "/api/gpu-snapshots", _snapshot_body("other"), "key-0")
        assert code == 409 and body["error"]["code"] == "idempotency_key_reused"
    finally:
        for a in apps:
            a.extensions["gpusnap"].engine.dispose()


def test_same_idempotency_key_race_for_a_new_machine_on_hibernate(tmp_path, database_url, store):
    apps = [
        create_app(make_settings(tmp_path, database_url), object_store=store, configure_logs=False) for _ in range(2)
    ]
    try:
        for round_ in range(4):
            path = f"/api/instances/{8100 + round_}/hibernate"
            answers = _together([lambda a=a: _post(a, path, _hibernate_body(), f"h-{round_}") for a in apps])
            assert [code for code, _ in answers] == [202, 202], answers
            assert answers[0][1]["job"]["id"] == answers[1][1]["job"]["id"]
    finally:
        for a in apps:
            a.extensions["gpusnap"].engine.dispose()


def test_enqueue_failure_after_commit_answers_202_and_recovery_runs_the_job(tmp_path, database_url, store):
    port = free_port()  # nothing listens there: a real connection refused, every time
    down = create_app(
        make_settings(tmp_path, database_url),
        object_store=store,
        configure_logs=False,
        huey=RedisHuey("gpusnap-enqueue-test", url=f"redis://127.0.0.1:{port}/15"),
    )
    up = create_app(
        make_settings(tmp_path, database_url, job_stale_after_s=60), object_store=store, configure_logs=False
    )
    try:
        snap = add_complete_snapshot(up, store, machine_id="m-enq")
        r = down.test_client().post(f"/api/gpu-snapshots/{snap['id']}/verify", headers=AUTH)
        assert r.status_code == 202, r.get_json()
        job_id = r.get_json()["job"]["id"]
        c = up.extensions["gpusnap"]
        with c.session_factory() as s:
            row = s.get(Job, job_id)
            assert (row.status, row.phase, row.lock_key) == ("queued", "enqueue_failed", f"snapshot:{snap['id']}")
        # A retry of the request finds the snapshot busy: the first answer (202) was the truth.
        assert down.test_client().post(f"/api/gpu-snapshots/{snap['id']}/verify", headers=AUTH).status_code == 409
        assert run_jobs(up) == 0  # nothing reached a queue
        assert c.queue.recover_stale_jobs() == []  # not yet: it may still be on its way
        with transaction(c.session_factory) as s:
            s.get(Job, job_id).created_at -= dt.timedelta(seconds=61)
        assert c.queue.recover_stale_jobs() == [job_id]
        assert run_jobs(up) == 1
        assert up.test_client().get(f"/api/jobs/{job_id}", headers=AUTH).get_json()["status"] == "succeeded"
    finally:
        down.extensions["gpusnap"].engine.dispose()
        up.extensions["gpusnap"].engine.dispose()


def test_enqueue_failure_is_reported_by_the_queue_not_raised(tmp_path, sqlite_url, store):
    port = free_port()
    app = create_app(
        make_settings(tmp_path, sqlite_url),
        object_store=store,
        configure_logs=False,
        huey=RedisHuey("gpusnap-enqueue-test", url=f"redis://127.0.0.1:{port}/15"),
    )
    try:
        c = app.extensions["gpusnap"]
        with transaction(c.session_factory) as s:
            job_id = job_service.add_job(s, kind="verify_snapshot", params={}, lock_key=None).id
        assert c.queue.enqueue(job_id) is False
        assert c.queue.enqueue("job_that_does_not_exist") is False  # no row to mark: still no exception
    finally:
        app.extensions["gpusnap"].engine.dispose()
