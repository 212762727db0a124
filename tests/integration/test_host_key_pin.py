"""The host-key pin belongs to the machine, not to the host string it was reached by (issue 9): naming
a known machine by another host or port never resets it; only a wake onto a new instance or an
explicit `POST /api/instances/<id>/forget-host-key` (audited) does. In-process app, real database and
queue, a scripted SSH host that refuses a pinned key it does not present (as the real adapter does)."""

from __future__ import annotations

import hashlib

import pytest

from src.adapters.remote_types import host_key_fingerprint
from src.app import create_app
from tests.fakes.fake_object_store import FakeObjectStore
from tests.fakes.fake_remote_host import FakeSshClient, fake_host_key
from tests.support.fixtures_app import AUTH, make_settings, run_jobs
from tests.support.snapshots import write_snapshot_objects

ORIGINAL, IMPOSTOR = fake_host_key("the-real-gpu-host"), fake_host_key("someone-else")


@pytest.fixture
def world(tmp_path, database_url):  # type: ignore[no-untyped-def]
    settings = make_settings(
        tmp_path, database_url, r2_endpoint="http://unused", r2_bucket="b", r2_access_key="k", r2_secret_key="s"
    )
    store, ssh = FakeObjectStore(), FakeSshClient(host_key=ORIGINAL)
    app = create_app(settings, object_store=store, ssh=ssh, configure_logs=False)
    yield app, store, ssh
    app.extensions["gpusnap"].engine.dispose()


def _snapshot(app, store, ssh, *, host: str, port: int = 22) -> dict:  # type: ignore[no-untyped-def]
    """Run one create_snapshot job of machine `box` reached as host:port; return the finished job."""
    client = app.test_client()
    r = client.post(
        "/api/gpu-snapshots",
        json={"instance_id": "box", "ssh_host": host, "ssh_port": port, "workspace_path": "/workspace"},
        headers=AUTH,
    )
    assert r.status_code == 202, r.get_json()
    snap = r.get_json()["snapshot"]
    raw = write_snapshot_objects(store, snap["storage_prefix"], snapshot_id=snap["id"], format=snap["format"], parts=1)
    ssh.scripts["snapshot"] = [
        {"event": "started", "pid": 10, "pgid": 10},
        {
            "event": "result",
            "manifest_sha256": hashlib.sha256(raw).hexdigest(),
            "raw_bytes": 1024,
            "stored_bytes": 1024,
            "parts": 1,
            "files": 1,
            "codec": "none",
            "part_size": 1024,
            "uploaded_parts": 1,
            "skipped_parts": 0,
            "duration_s": 0.1,
            "timings": {},
        },
    ]
    run_jobs(app)
    return client.get(f"/api/jobs/{r.get_json()['job']['id']}", headers=AUTH).get_json()


def _machine(app) -> dict:  # type: ignore[no-untyped-def]
    return app.test_client().get("/api/instances/box", headers=AUTH).get_json()


def test_another_name_for_a_pinned_machine_keeps_the_pin(world):
    app, store, ssh = world
    assert _snapshot(app, store, ssh, host="127.0.0.1")["status"] == "succeeded"
    assert _machine(app)["host_key_pinned"]
    # The same machine named differently: still the same host key, still checked against the pin.
    assert _snapshot(app, store, ssh, host="10.0.0.7", port=2222)["status"] == "succeeded"
    assert ssh.opened[-1].pinned_host_key == ORIGINAL
    # Whatever answers under a new name with another key is refused before anything runs.
    ssh.host_key = IMPOSTOR
    job = _snapshot(app, store, ssh, host="10.0.0.8")
    assert job["status"] == "failed" and job["error"]["code"] == "host_key_mismatch", job
    machine = _machine(app)
    assert machine["host_key_pinned"]
    changed = [e for e in machine["events"] if e["kind"] == "endpoint_changed"]
    assert changed and all("pin kept" in e["message"] for e in changed)


def test_forget_host_key_clears_the_pin_audited(world):
    app, store, ssh = world
    client = app.test_client()
    assert _snapshot(app, store, ssh, host="127.0.0.1")["status"] == "succeeded"
    ssh.host_key = IMPOSTOR  # the machine was re-installed
    assert _snapshot(app, store, ssh, host="127.0.0.1")["error"]["code"] == "host_key_mismatch"

    r = client.post("/api/instances/box/forget-host-key", headers=AUTH)
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["id"] == "box" and not r.get_json()["host_key_pinned"]
    forgotten = [e for e in r.get_json()["events"] if e["kind"] == "host_key_forgotten"]
    assert forgotten and forgotten[-1]["data"]["fingerprint"] == host_key_fingerprint(ORIGINAL)

    assert _snapshot(app, store, ssh, host="127.0.0.1")["status"] == "succeeded"  # first use again
    assert ssh.opened[-1].pinned_host_key is None
    assert _machine(app)["host_key_pinned"]
    pinned = [e for e in _machine(app)["events"] if e["kind"] == "host_key_pinned"]
    assert host_key_fingerprint(IMPOSTOR) in pinned[-1]["message"]


@pytest.mark.parametrize("machine_id", ["nope", "999999", "..%2Fetc", "a" * 200])
def test_forget_host_key_of_an_unknown_machine_is_404_or_422(world, machine_id):
    app, _, _ = world
    r = app.test_client().post(f"/api/instances/{machine_id}/forget-host-key", headers=AUTH)
    assert r.status_code in (404, 422) and r.get_json()["error"]["code"] in (
        "not_found",
        "invalid_request",
        "validation_error",
    ), r.get_json()


def test_forget_host_key_needs_a_token(world):
    app, _, _ = world
    r = app.test_client().post("/api/instances/box/forget-host-key")
    assert r.status_code == 401


def test_forget_host_key_is_in_the_openapi_document(world):
    app, _, _ = world
    doc = app.test_client().get("/api/openapi.json", headers=AUTH).get_json()
    assert "post" in doc["paths"]["/api/instances/{instance_id}/forget-host-key"]
