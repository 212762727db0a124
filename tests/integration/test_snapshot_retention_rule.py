"""`snapshots_needed_by_machines`: the one rule DELETE, the delete job and any future retention or
garbage collection use to leave alone the snapshot a machine without an instance would wake from. On
SQLite and PostgreSQL (the query groups by machine), with rows written directly."""

from __future__ import annotations

import time

from src.db import transaction
from src.models import Job, Machine, Snapshot, new_id
from src.services.snapshots import snapshots_needed_by_machines
from tests.support.fixtures_app import AUTH, run_jobs


def _add(app, machine_id: str, status: str, snapshots: list[str]) -> list[str]:  # type: ignore[no-untyped-def]
    """A machine and its snapshots (statuses, oldest first); returns their ids."""
    ids = []
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        s.add(Machine(id=machine_id, status=status))
        for snap_status in snapshots:
            time.sleep(0.002)  # ids order by creation only across milliseconds
            sid = new_id("snap")
            s.add(
                Snapshot(
                    id=sid,
                    machine_id=machine_id,
                    status=snap_status,
                    workspace_path="/workspace",
                    storage_prefix=f"snapshots/{machine_id}/{sid}/",
                    excludes=[],
                )
            )
            ids.append(sid)
    return ids


def _needed(app, **kw) -> dict:  # type: ignore[no-untyped-def]
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        return snapshots_needed_by_machines(s, **kw)


def test_the_newest_complete_snapshot_of_each_machine_without_an_instance(app):  # type: ignore[no-untyped-def]
    old, newest, failed = _add(app, "m-hib", "hibernated", ["complete", "complete", "failed"])
    _, running_newest = _add(app, "m-run", "running", ["complete", "complete"])
    (err,) = _add(app, "m-err", "error", ["complete"])
    (waking,) = _add(app, "m-wake", "waking", ["complete"])
    _add(app, "m-none", "hibernated", ["failed"])
    assert _needed(app) == {newest: ["m-hib"], err: ["m-err"], waking: ["m-wake"]}
    # A delete in progress asks about a snapshot that is `deleting` now: was it the one?
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        s.get(Snapshot, newest).status = "deleting"
    assert _needed(app)[old] == ["m-hib"]  # meanwhile the next one down is protected
    assert _needed(app, assume_restorable=[newest])[newest] == ["m-hib"]
    assert running_newest not in _needed(app) and failed not in _needed(app)


def test_delete_refuses_a_needed_snapshot_unless_forced(app, client):  # type: ignore[no-untyped-def]
    older, newest = _add(app, "m1", "hibernated", ["complete", "complete"])
    r = client.delete(f"/api/gpu-snapshots/{newest}", headers=AUTH)
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "snapshot_needed"
    assert "m1" in r.get_json()["error"]["message"]
    assert client.delete(f"/api/gpu-snapshots/{newest}?force=nope", headers=AUTH).status_code == 400
    r = client.delete(f"/api/gpu-snapshots/{older}", headers=AUTH)  # not the one it would wake from
    assert r.status_code == 202, r.get_json()
    r = client.delete(f"/api/gpu-snapshots/{newest}?force=true", headers=AUTH)
    assert r.status_code == 202, r.get_json()
    assert client.get(f"/api/gpu-snapshots/{newest}", headers=AUTH).get_json()["status"] == "deleting"


def test_the_delete_job_checks_again_before_removing_anything(app, client, store):  # type: ignore[no-untyped-def]
    """Accepted while the machine ran; by the time the job runs the machine was hibernated onto it."""
    (sid,) = _add(app, "m2", "running", ["complete"])
    store.objects[f"snapshots/m2/{sid}/manifest.json"] = b"{}"
    r = client.delete(f"/api/gpu-snapshots/{sid}", headers=AUTH)
    assert r.status_code == 202
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        s.get(Machine, "m2").status = "hibernated"
    run_jobs(app)
    job = client.get(f"/api/jobs/{r.get_json()['job']['id']}", headers=AUTH).get_json()
    assert job["status"] == "failed" and job["error"]["code"] == "snapshot_needed", job
    assert f"snapshots/m2/{sid}/manifest.json" in store.objects
    assert client.get(f"/api/gpu-snapshots/{sid}", headers=AUTH).get_json()["status"] == "complete"


def test_a_snapshot_in_use_by_a_restore_is_not_deleted_even_forced(app, client):  # type: ignore[no-untyped-def]
    (sid,) = _add(app, "m3", "running", ["complete"])
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        s.add(
            Job(
                id=new_id("job"),
                kind="restore_snapshot",
                status="running",
                params={"snapshot_id": sid},
                machine_id="m3",
                snapshot_id=sid,
                lock_key="machine:m3",
            )
        )
    r = client.delete(f"/api/gpu-snapshots/{sid}?force=true", headers=AUTH)
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "snapshot_busy"


def test_a_hibernated_machine_takes_no_snapshot_from_some_host(app, client):  # type: ignore[no-untyped-def]
    """It would become the newest complete snapshot: what wake restores and what is protected."""
    (sid,) = _add(app, "m4", "hibernated", ["complete"])
    r = client.post(
        "/api/gpu-snapshots",
        headers=AUTH,
        json={"instance_id": "m4", "ssh_host": "127.0.0.1", "ssh_port": 22, "workspace_path": "/tmp/empty"},
    )
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "machine_hibernated"
    assert _needed(app) == {sid: ["m4"]}
