"""A job whose remote script could not be confirmed dead says so (issue 14): it fails with
`remote_state_unknown`, never a plain failure, and the machine's history gets a machine-readable
`remote_state_unknown` event saying the workspace may have changed. In-process app; the scripted SSH
host raises what the real adapter raises when neither its connection nor a fresh one can kill the script."""

from __future__ import annotations

import pytest

from src.adapters.remote_errors import RemoteStateUnknown, RemoteTimeout
from src.app import create_app
from tests.fakes.fake_object_store import FakeObjectStore
from tests.fakes.fake_remote_host import FakeSshClient
from tests.support.fixtures_app import AUTH, make_settings, run_jobs
from tests.support.snapshots import add_complete_snapshot


@pytest.fixture
def app(tmp_path, database_url):  # type: ignore[no-untyped-def]
    settings = make_settings(
        tmp_path, database_url, r2_endpoint="http://unused", r2_bucket="b", r2_access_key="k", r2_secret_key="s"
    )
    store = FakeObjectStore()
    cause = RemoteTimeout("remote script restore on 10.0.0.9 was silent for 600s")
    unknown = RemoteStateUnknown(
        "remote script restore on 10.0.0.9:22 was stopped (remote_timeout: ...) but process "
        "group 4242 could not be confirmed dead; it may still be running and changing the host",
        cause=cause,
        pgid=4242,
        script="restore",
    )
    ssh = FakeSshClient(
        scripts={
            "restore": [
                {"event": "started", "pid": 4242, "pgid": 4242},
                {"event": "progress", "phase": "download", "bytes_done": 1},
                unknown,
            ]
        }
    )
    application = create_app(settings, object_store=store, ssh=ssh, configure_logs=False)
    application.extensions["test.store"] = store
    yield application
    application.extensions["gpusnap"].engine.dispose()


def test_unconfirmed_kill_fails_remote_state_unknown_with_a_machine_event(app):
    snap = add_complete_snapshot(app, app.extensions["test.store"], machine_id="src")
    client = app.test_client()
    r = client.post(
        f"/api/gpu-snapshots/{snap['id']}/restore",
        headers=AUTH,
        json={"ssh_host": "10.0.0.9", "ssh_port": 22, "workspace_path": "/workspace", "instance_id": "dst"},
    )
    assert r.status_code == 202, r.get_json()
    run_jobs(app)
    job = client.get(f"/api/jobs/{r.get_json()['job']['id']}", headers=AUTH).get_json()
    assert job["status"] == "failed" and job["error"]["code"] == "remote_state_unknown", job
    assert "may still be running" in job["error"]["message"]
    events = client.get("/api/instances/dst", headers=AUTH).get_json()["events"]
    unknown = [e for e in events if e["kind"] == "remote_state_unknown"]
    assert len(unknown) == 1 and "workspace may have changed" in unknown[0]["message"]
    assert unknown[0]["data"] == {
        "script": "restore",
        "pgid": 4242,
        "cause": "remote_timeout",
        "host": "10.0.0.9",
        "port": 22,
    }
    assert unknown[0]["job_id"] == job["id"]
    assert not [e for e in events if e["kind"] == "restored"]
