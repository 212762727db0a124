"""The job, instance and probe endpoints over a real database (SQLite and PostgreSQL) and the real
SQLite (or an unreachable Redis) Huey queue."""

from __future__ import annotations

import shutil

import pytest
from huey import RedisHuey

from src.app import create_app
from src.db import transaction
from src.models import Machine
from tests.support.fixtures_app import AUTH, make_settings, run_jobs
from tests.support.services import port_open
from tests.support.snapshots import add_complete_snapshot


def _body(instance_id: str = "4242", **changes):  # type: ignore[no-untyped-def]
    return {
        "instance_id": instance_id,
        "ssh_host": "10.1.2.3",
        "ssh_port": 2222,
        "workspace_path": "/workspace",
        **changes,
    }


def _create(client, instance_id: str = "4242", **changes):  # type: ignore[no-untyped-def]
    r = client.post("/api/gpu-snapshots", json=_body(instance_id, **changes), headers=AUTH)
    assert r.status_code == 202, r.get_json()
    return r.get_json()


def _ids(page: dict) -> list[str]:
    return [j["id"] for j in page["items"]]


def _pages(client, url: str) -> list[dict]:  # type: ignore[no-untyped-def]
    """Every page of a listing, following next_cursor from `url` (which has a query string already)."""
    pages = []
    next_url = url
    while next_url:
        r = client.get(next_url, headers=AUTH)
        assert r.status_code == 200, r.get_json()
        pages.append(r.get_json())
        cursor = pages[-1]["next_cursor"]
        next_url = f"{url}&cursor={cursor}" if cursor else ""
    return pages


# ---- /api/jobs ---------------------------------------------------------------------------------


def test_get_job_200_with_contract_shape_and_404(client):
    job = _create(client)["job"]
    r = client.get(f"/api/jobs/{job['id']}", headers=AUTH)
    assert r.status_code == 200
    body = r.get_json()
    assert body["id"] == job["id"] and body["kind"] == "create_snapshot" and body["status"] == "queued"
    assert {
        "id",
        "kind",
        "status",
        "phase",
        "progress",
        "result",
        "error",
        "created_at",
        "started_at",
        "finished_at",
    } <= set(body)
    assert set(body["progress"]) == {"bytes_done", "bytes_total", "parts_done", "parts_total"}
    assert body["error"] is None and body["created_at"].endswith("Z") and body["started_at"] is None
    missing = client.get("/api/jobs/job_nope", headers=AUTH)
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "not_found"


def test_list_jobs_filters_by_kind_status_and_instance(client, app, store):
    create_a = _create(client, "a")["job"]["id"]
    create_b = _create(client, "b")["job"]["id"]
    snap = add_complete_snapshot(app, store, machine_id="c")
    verify = client.post(f"/api/gpu-snapshots/{snap['id']}/verify", headers=AUTH).get_json()["job"]["id"]
    assert run_jobs(app) == 3  # the two creates fail (no SSH host answers), the verify succeeds

    everything = client.get("/api/jobs", headers=AUTH).get_json()
    assert _ids(everything) == [verify, create_b, create_a] and everything["next_cursor"] is None
    by_kind = client.get("/api/jobs?kind=verify_snapshot", headers=AUTH).get_json()
    assert _ids(by_kind) == [verify]
    by_status = client.get("/api/jobs?status=succeeded", headers=AUTH).get_json()
    assert _ids(by_status) == [verify]
    failed = client.get("/api/jobs?status=failed&kind=create_snapshot", headers=AUTH).get_json()
    assert _ids(failed) == [create_b, create_a]
    assert _ids(client.get("/api/jobs?instance_id=a", headers=AUTH).get_json()) == [create_a]
    assert _ids(client.get("/api/jobs?instance_id=b&status=queued", headers=AUTH).get_json()) == []
    assert _ids(client.get("/api/jobs?kind=no_such_kind", headers=AUTH).get_json()) == []


def test_list_jobs_cursor_pagination_walks_every_job_once(client):
    created = [_create(client, f"m{i}")["job"]["id"] for i in range(5)]
    pages = _pages(client, "/api/jobs?limit=2")
    assert [job_id for page in pages for job_id in _ids(page)] == created[::-1] and len(pages) == 3


@pytest.mark.parametrize(
    "query",
    [
        "limit=0",
        "limit=201",
        "limit=x",
        "status=done",
        "kind=Bad-Kind",
        "cursor=%%%",
        "cursor=bm90IGFuIGlk!",
        "extra=1",
        "kind=a&kind=b",
        "instance_id=" + "x" * 129,
    ],
)
def test_list_jobs_bad_query_is_400(client, query):
    r = client.get(f"/api/jobs?{query}", headers=AUTH)
    assert r.status_code == 400, r.get_json()
    assert r.get_json()["error"]["code"] in ("invalid_query", "invalid_cursor")


def test_cancel_queued_job_is_immediate_and_frees_the_machine(client, app):
    created = _create(client, "4242")
    job_id = created["job"]["id"]
    busy = client.post("/api/gpu-snapshots", json=_body("4242"), headers=AUTH)
    assert busy.status_code == 409

    r = client.post(f"/api/jobs/{job_id}/cancel", headers=AUTH)
    assert r.status_code == 202
    assert r.get_json()["status"] == "cancelled"
    job = client.get(f"/api/jobs/{job_id}", headers=AUTH).get_json()
    assert job["status"] == "cancelled" and job["error"]["code"] == "cancelled" and job["finished_at"]
    snap = client.get(f"/api/gpu-snapshots/{created['snapshot']['id']}", headers=AUTH).get_json()
    assert snap["status"] == "failed"  # the create job's end hook ran in the cancelling transaction
    assert client.get("/api/instances/4242", headers=AUTH).get_json()["active_job_id"] is None

    # The lock is free: a new snapshot of the same machine is accepted.
    assert _create(client, "4242")["job"]["id"] != job_id
    # The cancelled job was still in the queue: the worker skips it instead of running it.
    assert run_jobs(app) == 2
    assert client.get(f"/api/jobs/{job_id}", headers=AUTH).get_json()["status"] == "cancelled"

    again = client.post(f"/api/jobs/{job_id}/cancel", headers=AUTH)
    assert again.status_code == 202 and again.get_json()["status"] == "cancelled"


def test_cancel_finished_job_is_409_and_unknown_is_404(client, app, store):
    snap = add_complete_snapshot(app, store)
    job_id = client.post(f"/api/gpu-snapshots/{snap['id']}/verify", headers=AUTH).get_json()["job"]["id"]
    run_jobs(app)
    r = client.post(f"/api/jobs/{job_id}/cancel", headers=AUTH)
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "job_finished"
    assert client.get(f"/api/jobs/{job_id}", headers=AUTH).get_json()["status"] == "succeeded"
    missing = client.post("/api/jobs/job_nope/cancel", headers=AUTH)
    assert missing.status_code == 404 and missing.get_json()["error"]["code"] == "not_found"


def test_cancel_body_with_unknown_field_is_422_and_cancels_nothing(client):
    job_id = _create(client)["job"]["id"]
    r = client.post(f"/api/jobs/{job_id}/cancel", json={"force": True}, headers=AUTH)
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "validation_error"
    assert "force" in r.get_json()["error"]["message"]
    assert client.get(f"/api/jobs/{job_id}", headers=AUTH).get_json()["status"] == "queued"
    assert client.post(f"/api/jobs/{job_id}/cancel", json={}, headers=AUTH).status_code == 202


# ---- /api/instances ----------------------------------------------------------------------------


def test_instances_list_and_detail_with_events(client):
    job_id = _create(client, "gpu-a")["job"]["id"]
    _create(client, "gpu-b")
    listed = client.get("/api/instances", headers=AUTH).get_json()
    assert [m["id"] for m in listed["items"]] == ["gpu-a", "gpu-b"] and listed["next_cursor"] is None
    assert listed["items"][0]["active_job_id"] == job_id and "events" not in listed["items"][0]
    page = client.get("/api/instances?limit=1", headers=AUTH).get_json()
    assert [m["id"] for m in page["items"]] == ["gpu-a"] and page["next_cursor"]
    rest = client.get(f"/api/instances?limit=1&cursor={page['next_cursor']}", headers=AUTH).get_json()
    assert [m["id"] for m in rest["items"]] == ["gpu-b"]
    assert client.get("/api/instances?status=running", headers=AUTH).get_json()["items"][0]["id"] == "gpu-a"
    assert client.get("/api/instances?status=hibernated", headers=AUTH).get_json()["items"] == []

    one = client.get("/api/instances/gpu-a", headers=AUTH)
    assert one.status_code == 200
    machine = one.get_json()
    assert machine["ssh_host"] == "10.1.2.3" and machine["ssh_port"] == 2222 and not machine["host_key_pinned"]
    assert [e["kind"] for e in machine["events"]] == ["registered", "create_snapshot_requested"]
    assert machine["events"][1]["job_id"] == job_id

    # A new endpoint for a known machine is recorded in its history.
    client.post(f"/api/jobs/{job_id}/cancel", headers=AUTH)
    _create(client, "gpu-a", ssh_host="10.9.9.9")
    kinds = [e["kind"] for e in client.get("/api/instances/gpu-a", headers=AUTH).get_json()["events"]]
    assert kinds == [
        "registered",
        "create_snapshot_requested",
        "snapshot_failed",
        "endpoint_changed",
        "create_snapshot_requested",
    ]


def test_instances_pagination_with_every_machine_id_character_and_the_longest_id(client):
    ids = ["10.1.2.3:2222", "a.b-c_d:e", "z" + "9" * 127]
    for machine_id in ids:
        _create(client, machine_id)
    pages = _pages(client, "/api/instances?limit=1")
    assert [machine_id for page in pages for machine_id in _ids(page)] == sorted(ids)


def test_instance_found_by_vast_instance_id_and_404_when_unknown(client, app):
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        s.add(Machine(id="gpu-renamed", status="running", vast_instance_id=987654))
    by_vast = client.get("/api/instances/987654", headers=AUTH)
    assert by_vast.status_code == 200 and by_vast.get_json()["id"] == "gpu-renamed"
    assert by_vast.get_json()["vast_instance_id"] == 987654
    for unknown in ("nobody", "123"):
        r = client.get(f"/api/instances/{unknown}", headers=AUTH)
        assert r.status_code == 404 and r.get_json()["error"]["code"] == "not_found"


HOSTILE_IDS = ["a%00b", "%0a", "x" * 129, "99999999999999999999999", "9223372036854775808", "%C2%B2", "%D9%A1%D9%A2"]


@pytest.mark.parametrize("raw", HOSTILE_IDS)
def test_ids_no_row_can_have_are_404_not_500(client, raw):
    """NUL (PostgreSQL refuses it), numbers past BIGINT, and digits `int()` refuses ('²')."""
    checks = [
        ("GET", f"/api/jobs/{raw}"),
        ("POST", f"/api/jobs/{raw}/cancel"),
        ("GET", f"/api/gpu-snapshots/{raw}"),
        ("POST", f"/api/gpu-snapshots/{raw}/verify"),
        ("DELETE", f"/api/gpu-snapshots/{raw}"),
        ("GET", f"/api/instances/{raw}"),
        ("POST", f"/api/instances/{raw}/pause"),
    ]
    for method, path in checks:
        r = client.open(path, method=method, headers=AUTH)
        assert r.status_code in (404, 503), (method, path, r.status_code, r.get_json())
        assert r.get_json()["error"]["code"] in ("not_found", "not_configured")


@pytest.mark.parametrize(
    "raw, expect_vast_id", [("99999999999999999999999", None), ("%C2%B2", None), ("123456789", 123456789)]
)
def test_hibernate_registers_numeric_ids_as_vast_ids_only_when_they_fit(client, raw, expect_vast_id):
    body = {"workspace_path": "/workspace", "ssh_host": "10.0.0.1", "ssh_port": 22, "destroy_after": False}
    r = client.post(f"/api/instances/{raw}/hibernate", json=body, headers=AUTH)
    assert r.status_code == 202, r.get_json()
    machine = client.get(f"/api/instances/{raw}", headers=AUTH).get_json()
    assert machine["vast_instance_id"] == expect_vast_id and machine["status"] == "hibernating"


# ---- /metrics and /readyz ----------------------------------------------------------------------


def test_metrics_count_jobs_by_kind_and_status_and_http_requests(client, app, store):
    _create(client, "a")
    _create(client, "b")
    cancelled = _create(client, "c")["job"]["id"]
    client.post(f"/api/jobs/{cancelled}/cancel", headers=AUTH)
    snap = add_complete_snapshot(app, store)
    client.post(f"/api/gpu-snapshots/{snap['id']}/verify", headers=AUTH)
    run_jobs(app, limit=10)  # verify succeeds; creates fail (nobody at 10.1.2.3)
    client.get("/api/jobs/job_nope", headers=AUTH)

    r = client.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    lines = set(r.get_data(as_text=True).splitlines())
    assert 'gpusnap_jobs{kind="create_snapshot",status="failed"} 2.0' in lines
    assert 'gpusnap_jobs{kind="create_snapshot",status="cancelled"} 1.0' in lines
    assert 'gpusnap_jobs{kind="verify_snapshot",status="succeeded"} 1.0' in lines
    assert 'gpusnap_http_requests_total{method="POST",route="/api/gpu-snapshots",status="202"} 3.0' in lines
    assert 'gpusnap_http_requests_total{method="GET",route="/api/jobs/<job_id>",status="404"} 1.0' in lines
    assert any(line.startswith('gpusnap_http_request_duration_seconds_count{method="POST"') for line in lines)
    assert 'gpusnap_snapshots{status="complete"} 1.0' in lines


def test_readyz_reports_database_and_queue(client):
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.get_json() == {"status": "ok", "checks": {"database": "ok", "queue": "ok"}}


def test_readyz_is_503_when_the_sqlite_queue_file_is_gone(tmp_path, sqlite_url, store):
    # The queue lives in its own directory (a volume, say); it vanishes under a running API.
    queue_dir = tmp_path / "queue-volume"
    app = create_app(
        make_settings(tmp_path, sqlite_url, queue_path=str(queue_dir / "queue.db")),
        object_store=store,
        configure_logs=False,
    )
    client = app.test_client()
    assert client.get("/readyz").status_code == 200
    app.extensions["gpusnap"].queue.huey.storage.close()  # as after a restart: the next use opens the file anew
    shutil.rmtree(queue_dir)
    r = client.get("/readyz")
    assert r.status_code == 503
    assert r.get_json() == {"status": "unavailable", "checks": {"database": "ok", "queue": "unavailable"}}
    assert client.get("/healthz").status_code == 200  # liveness does not depend on the queue
    app.extensions["gpusnap"].engine.dispose()


def test_readyz_is_503_when_the_redis_queue_is_unreachable(tmp_path, sqlite_url, store):
    port = 1  # nothing listens on port 1 here
    assert not port_open("127.0.0.1", port)
    app = create_app(
        make_settings(tmp_path, sqlite_url),
        object_store=store,
        configure_logs=False,
        huey=RedisHuey("gpusnap-readyz-test", url=f"redis://127.0.0.1:{port}/15"),
    )
    r = app.test_client().get("/readyz")
    assert r.status_code == 503
    assert r.get_json()["checks"] == {"database": "ok", "queue": "unavailable"}
    app.extensions["gpusnap"].engine.dispose()
