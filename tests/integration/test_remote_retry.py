"""The remote step's retry policy and the failure path of a snapshot, in-process: a scripted SSH host
(FakeSshClient), an in-memory bucket, a real SQLite database. The e2e tests do the same with a real sshd
behind a TCP relay that resets connections (tests/e2e/test_transient_ssh_faults.py)."""

from __future__ import annotations

import hashlib

import pytest

from src.adapters.remote_errors import SshAuthFailed, SshConnectionLost, SshUnreachable
from src.app import create_app
from tests.fakes.fake_object_store import FakeObjectStore
from tests.fakes.fake_remote_host import FakeSshClient
from tests.support.fixtures_app import AUTH, make_settings, run_jobs
from tests.support.snapshots import write_snapshot_objects


@pytest.fixture
def app(tmp_path, sqlite_url):  # type: ignore[no-untyped-def]
    settings = make_settings(
        tmp_path,
        sqlite_url,
        remote_tries=3,
        remote_retry_backoff_s=0.01,
        r2_endpoint="http://unused",
        r2_bucket="b",
        r2_access_key="k",
        r2_secret_key="s",
    )
    store, ssh = FakeObjectStore(), FakeSshClient()
    app = create_app(settings, object_store=store, ssh=ssh, configure_logs=False)
    app.store, app.ssh = store, ssh  # type: ignore[attr-defined]
    yield app
    app.extensions["gpusnap"].engine.dispose()


def _create(app):  # type: ignore[no-untyped-def]
    r = app.test_client().post(
        "/api/gpu-snapshots",
        headers=AUTH,
        json={"instance_id": "box", "ssh_host": "10.0.0.5", "ssh_port": 22, "workspace_path": "/workspace"},
    )
    assert r.status_code == 202, r.get_json()
    return r.get_json()


def _script_succeeds(app, snapshot):  # type: ignore[no-untyped-def]
    raw = write_snapshot_objects(
        app.store, snapshot["storage_prefix"], snapshot_id=snapshot["id"], format=snapshot["format"], parts=2
    )
    app.ssh.scripts["snapshot"] = [
        {"event": "started", "pid": 10, "pgid": 10},
        {
            "event": "result",
            "manifest_sha256": hashlib.sha256(raw).hexdigest(),
            "raw_bytes": 2048,
            "stored_bytes": 2048,
            "parts": 2,
            "files": 1,
            "codec": "none",
            "part_size": 1024,
            "uploaded_parts": 1,
            "skipped_parts": 1,
            "duration_s": 0.1,
            "timings": {},
        },
    ]


def _job(app, job_id):  # type: ignore[no-untyped-def]
    return app.test_client().get(f"/api/jobs/{job_id}", headers=AUTH).get_json()


def test_a_dropped_link_is_tried_again_with_the_same_snapshot(app):  # type: ignore[no-untyped-def]
    created = _create(app)
    _script_succeeds(app, created["snapshot"])
    app.ssh.fail_next_opens = [SshConnectionLost("reset by peer"), SshUnreachable("no route")]
    run_jobs(app)
    job = _job(app, created["job"]["id"])
    assert job["status"] == "succeeded", job
    assert job["remote_tries"] == 3 and job["result"]["remote_tries"] == 3
    assert len(app.ssh.opened) == 3
    prefixes = {c.params["prefix"] for c in app.ssh.script_calls if c.name != "probe_host"}
    assert prefixes == {created["snapshot"]["storage_prefix"]}
    machine = app.test_client().get("/api/instances/box", headers=AUTH).get_json()
    retries = [e for e in machine["events"] if e["kind"] == "remote_retry"]
    assert [e["message"].split(" in ")[0] for e in retries] == ["snapshot: try 2 of 3", "snapshot: try 3 of 3"]


def test_retries_are_bounded_and_then_the_parts_are_removed(app):  # type: ignore[no-untyped-def]
    created = _create(app)
    prefix = created["snapshot"]["storage_prefix"]
    app.store.put_bytes(prefix + "part-00000", b"stored by a try that died")
    app.store.put_bytes("snapshots/box/other-snapshot/part-00000", b"not ours")
    app.ssh.fail_next_opens = [SshConnectionLost("reset")] * 5
    run_jobs(app)
    job = _job(app, created["job"]["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "ssh_connection_lost", job
    assert "after 3 tries" in job["error"]["message"]
    assert len(app.ssh.opened) == 3 and len(app.ssh.fail_next_opens) == 2
    assert [k for k in app.store.objects if k.startswith(prefix)] == []
    assert "snapshots/box/other-snapshot/part-00000" in app.store.objects
    snap = app.test_client().get(f"/api/gpu-snapshots/{created['snapshot']['id']}", headers=AUTH).get_json()
    assert snap["status"] == "failed"


def test_a_script_download_or_upload_failure_is_tried_again(app):  # type: ignore[no-untyped-def]
    created = _create(app)
    app.ssh.scripts["snapshot"] = [{"event": "error", "code": "upload_failed", "message": "503 SlowDown"}]
    run_jobs(app)
    job = _job(app, created["job"]["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "upload_failed"
    assert len([c for c in app.ssh.script_calls if c.name != "probe_host"]) == 3 and job["remote_tries"] == 3


@pytest.mark.parametrize(
    "failure,code",
    [
        (SshAuthFailed("key refused"), "ssh_auth_failed"),
        (SshUnreachable("handshake failed", retryable=False), "ssh_unreachable"),
    ],
)
def test_permanent_failures_are_not_retried(app, failure, code):  # type: ignore[no-untyped-def]
    created = _create(app)
    app.ssh.fail_next_opens = [failure]
    run_jobs(app)
    job = _job(app, created["job"]["id"])
    assert job["status"] == "failed" and job["error"]["code"] == code
    assert len(app.ssh.opened) == 1 and job["remote_tries"] is None


def test_integrity_failures_are_not_retried(app):  # type: ignore[no-untyped-def]
    created = _create(app)
    app.ssh.scripts["snapshot"] = [{"event": "error", "code": "disk_full", "message": "no space"}]
    run_jobs(app)
    job = _job(app, created["job"]["id"])
    assert job["error"]["code"] == "disk_full" and len([c for c in app.ssh.script_calls if c.name != "probe_host"]) == 1


def test_verify_after_upload_outlasts_a_burst_of_store_errors(app):  # type: ignore[no-untyped-def]
    created = _create(app)
    _script_succeeds(app, created["snapshot"])
    app.store.fail_calls = 2
    run_jobs(app)
    job = _job(app, created["job"]["id"])
    assert job["status"] == "succeeded", job
    assert (
        app.store.fail_calls == 0 and len([c for c in app.ssh.script_calls if c.name != "probe_host"]) == 1
    )  # verify retried, not the upload


def test_a_store_that_stays_down_fails_the_job_with_a_retryable_code(app):  # type: ignore[no-untyped-def]
    created = _create(app)
    _script_succeeds(app, created["snapshot"])
    app.store.unreachable = True
    run_jobs(app)
    job = _job(app, created["job"]["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "storage_error", job
    app.store.unreachable = False
    # the parts could not be removed then; they stay until the record is deleted
    assert any(k.startswith(created["snapshot"]["storage_prefix"]) for k in app.store.objects)


def test_an_attempt_that_lost_the_job_never_removes_the_parts(tmp_path, sqlite_url):  # type: ignore[no-untyped-def]
    """A frozen worker wakes up to a dead connection after its job was handed to another worker: the
    new owner is uploading into the same prefix, so the old attempt's failure path must not touch it."""
    from sqlalchemy import update

    from src.db import transaction
    from src.models import Job

    class ReplacedWhileFrozen(FakeSshClient):
        def open(self, target, **kwargs):  # type: ignore[no-untyped-def]
            with transaction(app.extensions["gpusnap"].session_factory) as s:  # recovery re-ran the job
                s.execute(update(Job).values(attempts=Job.attempts + 1))
            raise SshAuthFailed("the old attempt's connection is gone")

    settings = make_settings(
        tmp_path, sqlite_url, r2_endpoint="http://unused", r2_bucket="b", r2_access_key="k", r2_secret_key="s"
    )
    store = FakeObjectStore()
    app = create_app(settings, object_store=store, ssh=ReplacedWhileFrozen(), configure_logs=False)
    try:
        created = _create(app)
        prefix = created["snapshot"]["storage_prefix"]
        store.put_bytes(prefix + "part-00000", b"uploaded by the new owner")
        run_jobs(app)
        assert store.objects[prefix + "part-00000"] == b"uploaded by the new owner"
        assert _job(app, created["job"]["id"])["status"] == "running"  # the new owner's to finish
    finally:
        app.extensions["gpusnap"].engine.dispose()
