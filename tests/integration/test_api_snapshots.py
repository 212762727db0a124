"""The snapshot endpoints over a real database (SQLite and PostgreSQL): happy paths and every refusal."""

from __future__ import annotations

import pytest

from tests.support.fixtures_app import AUTH, run_jobs
from tests.support.snapshots import add_complete_snapshot

CREATE = {"instance_id": "4242", "ssh_host": "10.1.2.3", "ssh_port": 2222, "workspace_path": "/workspace"}


def test_create_answers_202_with_snapshot_job_and_location(client):
    r = client.post("/api/gpu-snapshots", json=CREATE, headers=AUTH)
    assert r.status_code == 202
    body = r.get_json()
    assert body["snapshot"]["status"] == "pending"
    assert body["snapshot"]["instance_id"] == "4242"
    assert body["snapshot"]["storage_prefix"] == f"snapshots/4242/{body['snapshot']['id']}/"
    assert body["job"]["status"] == "queued" and body["job"]["kind"] == "create_snapshot"
    assert r.headers["Location"] == f"/api/jobs/{body['job']['id']}"
    listed = client.get("/api/gpu-snapshots", headers=AUTH).get_json()
    assert [s["id"] for s in listed["items"]] == [body["snapshot"]["id"]]


def test_create_alias_path(client):
    r = client.post("/api/gpu-snapshots/create", json=CREATE, headers=AUTH)
    assert r.status_code == 202


def test_second_operation_on_same_machine_is_409_and_writes_nothing(client):
    assert client.post("/api/gpu-snapshots", json=CREATE, headers=AUTH).status_code == 202
    r = client.post("/api/gpu-snapshots", json=CREATE, headers=AUTH)
    assert r.status_code == 409
    assert r.get_json()["error"]["code"] == "machine_busy"
    assert len(client.get("/api/gpu-snapshots", headers=AUTH).get_json()["items"]) == 1
    assert len(client.get("/api/jobs", headers=AUTH).get_json()["items"]) == 1


def test_idempotency_key_returns_same_job_and_refuses_other_body(client):
    headers = {**AUTH, "Idempotency-Key": "abc-1"}
    first = client.post("/api/gpu-snapshots", json=CREATE, headers=headers).get_json()
    again = client.post("/api/gpu-snapshots", json=CREATE, headers=headers)
    assert again.status_code == 202
    assert again.get_json()["job"]["id"] == first["job"]["id"]
    assert again.get_json()["snapshot"]["id"] == first["snapshot"]["id"]
    other = client.post("/api/gpu-snapshots", json={**CREATE, "instance_id": "other"}, headers=headers)
    assert other.status_code == 409
    assert other.get_json()["error"]["code"] == "idempotency_key_reused"
    assert len(client.get("/api/jobs", headers=AUTH).get_json()["items"]) == 1


@pytest.mark.parametrize(
    "change, field",
    [
        ({"workspace_path": "relative/path"}, "workspace_path"),
        ({"workspace_path": "/workspace/../etc"}, "workspace_path"),
        ({"workspace_path": "/"}, "workspace_path"),
        ({"ssh_port": 0}, "ssh_port"),
        ({"ssh_port": 70000}, "ssh_port"),
        ({"ssh_host": "not a host"}, "ssh_host"),
        ({"codec": "gzip"}, "codec"),
        ({"unexpected": 1}, "unexpected"),
        ({"instance_id": ""}, "instance_id"),
    ],
)
def test_invalid_create_bodies_are_422_with_the_field_named(client, change, field):
    r = client.post("/api/gpu-snapshots", json={**CREATE, **change}, headers=AUTH)
    assert r.status_code == 422, r.get_json()
    error = r.get_json()["error"]
    assert error["code"] == "validation_error"
    assert field in error["message"]
    assert "Traceback" not in r.get_data(as_text=True)


def test_missing_field_is_422(client):
    r = client.post("/api/gpu-snapshots", json={"instance_id": "1"}, headers=AUTH)
    assert r.status_code == 422


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe", b'"text"'])
def test_malformed_json_is_400_not_500(client, raw):
    r = client.post("/api/gpu-snapshots", data=raw, headers={**AUTH, "Content-Type": "application/json"})
    assert r.status_code == 400
    assert r.get_json()["error"]["code"] == "invalid_json"


def test_body_over_limit_is_413(client):
    big = {**CREATE, "excludes": ["x" * 1000] * 2000}
    r = client.post("/api/gpu-snapshots", json=big, headers=AUTH)
    assert r.status_code == 413
    assert r.get_json()["error"]["code"] == "payload_too_large"


def test_host_outside_allowed_networks_is_422(client):
    r = client.post("/api/gpu-snapshots", json={**CREATE, "ssh_host": "192.168.7.7"}, headers=AUTH)
    assert r.status_code == 422
    assert r.get_json()["error"]["code"] == "target_not_allowed"
    assert client.get("/api/jobs", headers=AUTH).get_json()["items"] == []


def test_unknown_snapshot_is_404_everywhere(client):
    assert client.get("/api/gpu-snapshots/snap_nope", headers=AUTH).status_code == 404
    body = {"ssh_host": "10.0.0.5", "ssh_port": 22, "workspace_path": "/w"}
    assert client.post("/api/gpu-snapshots/snap_nope/restore", json=body, headers=AUTH).status_code == 404
    assert client.post("/api/gpu-snapshots/snap_nope/verify", headers=AUTH).status_code == 404
    assert client.delete("/api/gpu-snapshots/snap_nope", headers=AUTH).status_code == 404


def test_list_filters_and_cursor_pagination(client, app, store):
    ids = [add_complete_snapshot(app, store, machine_id="a" if i % 2 else "b", parts=1)["id"] for i in range(5)]
    page1 = client.get("/api/gpu-snapshots?limit=2", headers=AUTH).get_json()
    assert [s["id"] for s in page1["items"]] == ids[::-1][:2]
    page2 = client.get(f"/api/gpu-snapshots?limit=2&cursor={page1['next_cursor']}", headers=AUTH).get_json()
    page3 = client.get(f"/api/gpu-snapshots?limit=2&cursor={page2['next_cursor']}", headers=AUTH).get_json()
    assert [s["id"] for s in page2["items"] + page3["items"]] == ids[::-1][2:]
    assert page3["next_cursor"] is None
    only_a = client.get("/api/gpu-snapshots?instance_id=a&status=complete", headers=AUTH).get_json()
    assert {s["instance_id"] for s in only_a["items"]} == {"a"} and len(only_a["items"]) == 2


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=abc", "limit=201", "status=weird", "cursor=%%%", "bogus=1", "limit=1&limit=2"]
)
def test_bad_query_is_400(client, query):
    r = client.get(f"/api/gpu-snapshots?{query}", headers=AUTH)
    assert r.status_code == 400
    assert r.get_json()["error"]["code"] in ("invalid_query", "invalid_cursor")


def test_restore_of_incomplete_snapshot_is_409(client):
    snap = client.post("/api/gpu-snapshots", json=CREATE, headers=AUTH).get_json()["snapshot"]
    body = {"ssh_host": "10.0.0.5", "ssh_port": 22, "workspace_path": "/w"}
    r = client.post(f"/api/gpu-snapshots/{snap['id']}/restore", json=body, headers=AUTH)
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "snapshot_not_complete"


def test_restore_of_complete_snapshot_queues_job_on_target_machine(client, app, store):
    snap = add_complete_snapshot(app, store)
    body = {"ssh_host": "10.0.0.5", "ssh_port": 22, "workspace_path": "/w", "instance_id": "target-1"}
    r = client.post(f"/api/gpu-snapshots/{snap['id']}/restore", json=body, headers=AUTH)
    assert r.status_code == 202
    job = r.get_json()["job"]
    assert job["kind"] == "restore_snapshot" and job["machine_id"] == "target-1"
    assert client.post(f"/api/gpu-snapshots/{snap['id']}/restore", json=body, headers=AUTH).status_code == 409


def test_verify_then_delete_run_for_real_against_the_store(client, app, store):
    snap = add_complete_snapshot(app, store, parts=4)
    r = client.post(f"/api/gpu-snapshots/{snap['id']}/verify", json={"deep": True}, headers=AUTH)
    assert r.status_code == 202
    assert run_jobs(app) == 1
    job = client.get(r.headers["Location"], headers=AUTH).get_json()
    assert job["status"] == "succeeded", job
    assert job["result"]["parts"] == 4 and job["progress"]["parts_done"] == 4
    assert client.get(f"/api/gpu-snapshots/{snap['id']}", headers=AUTH).get_json()["verified_at"]

    r = client.delete(f"/api/gpu-snapshots/{snap['id']}", headers=AUTH)
    assert r.status_code == 202
    assert client.get(f"/api/gpu-snapshots/{snap['id']}", headers=AUTH).get_json()["status"] == "deleting"
    run_jobs(app)
    job = client.get(r.headers["Location"], headers=AUTH).get_json()
    assert job["status"] == "succeeded" and job["result"]["deleted_objects"] == 5
    assert not any(k.startswith(snap["prefix"]) for k in store.objects)
    assert client.get(f"/api/gpu-snapshots/{snap['id']}", headers=AUTH).status_code == 404


def test_deep_verify_reports_corrupt_part_and_marks_snapshot_failed(client, app, store):
    snap = add_complete_snapshot(app, store, parts=3)
    key = snap["prefix"] + "part-00001"
    store.objects[key] = b"\0" + store.objects[key][1:]
    r = client.post(f"/api/gpu-snapshots/{snap['id']}/verify", json={"deep": True}, headers=AUTH)
    run_jobs(app)
    job = client.get(r.headers["Location"], headers=AUTH).get_json()
    assert job["status"] == "failed"
    assert job["error"]["code"] == "part_corrupt" and "part-00001" in job["error"]["message"]
    assert client.get(f"/api/gpu-snapshots/{snap['id']}", headers=AUTH).get_json()["status"] == "failed"


def test_shallow_verify_finds_truncated_and_missing_parts(client, app, store):
    snap = add_complete_snapshot(app, store, parts=3)
    store.objects[snap["prefix"] + "part-00000"] = b"short"
    del store.objects[snap["prefix"] + "part-00002"]
    r = client.post(f"/api/gpu-snapshots/{snap['id']}/verify", headers=AUTH)
    run_jobs(app)
    job = client.get(r.headers["Location"], headers=AUTH).get_json()
    assert job["error"]["code"] == "part_truncated"
    assert "2 of 3" in job["error"]["message"] and "part-00002 (part_missing)" in job["error"]["message"]


def test_delete_of_objects_already_gone_succeeds(client, app, store):
    snap = add_complete_snapshot(app, store)
    for key in [k for k in store.objects if k.startswith(snap["prefix"])]:
        del store.objects[key]
    r = client.delete(f"/api/gpu-snapshots/{snap['id']}", headers=AUTH)
    run_jobs(app)
    assert client.get(r.headers["Location"], headers=AUTH).get_json()["status"] == "succeeded"
    assert client.get(f"/api/gpu-snapshots/{snap['id']}", headers=AUTH).status_code == 404


def test_delete_with_store_down_keeps_snapshot_complete(client, app, store):
    snap = add_complete_snapshot(app, store)
    store.unreachable = True
    r = client.delete(f"/api/gpu-snapshots/{snap['id']}", headers=AUTH)
    run_jobs(app)
    job = client.get(r.headers["Location"], headers=AUTH).get_json()
    assert job["status"] == "failed" and job["error"]["code"] == "storage_error"
    assert client.get(f"/api/gpu-snapshots/{snap['id']}", headers=AUTH).get_json()["status"] == "complete"


def test_delete_while_snapshot_in_use_is_409(client, app, store):
    snap = add_complete_snapshot(app, store)
    assert client.post(f"/api/gpu-snapshots/{snap['id']}/verify", headers=AUTH).status_code == 202
    r = client.delete(f"/api/gpu-snapshots/{snap['id']}", headers=AUTH)
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "snapshot_busy"


@pytest.mark.parametrize("given,stored", [({}, False), ({"keep_setuid": True}, True)])
def test_restore_carries_keep_setuid_to_the_job(client, app, store, given, stored):
    from src.models import Job

    snap = add_complete_snapshot(app, store)
    body = {"ssh_host": "10.0.0.5", "ssh_port": 22, "workspace_path": "/w", **given}
    r = client.post(f"/api/gpu-snapshots/{snap['id']}/restore", json=body, headers=AUTH)
    assert r.status_code == 202
    with app.extensions["gpusnap"].session_factory() as s:
        assert s.get(Job, r.get_json()["job"]["id"]).params["keep_setuid"] is stored


@pytest.mark.parametrize("value", ["yes", 1, None, [True]])
def test_restore_refuses_a_keep_setuid_that_is_not_a_boolean(client, app, store, value):
    snap = add_complete_snapshot(app, store)
    body = {"ssh_host": "10.0.0.5", "ssh_port": 22, "workspace_path": "/w", "keep_setuid": value}
    r = client.post(f"/api/gpu-snapshots/{snap['id']}/restore", json=body, headers=AUTH)
    assert r.status_code in (400, 422) and "error" in r.get_json()
