"""The `gpusnap` runbook client against the real app behind a real HTTP server (werkzeug, in a thread),
on SQLite, with an in-memory object store. Jobs run only in the tests that start the `worker` fixture."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import pytest
import requests
from click.testing import CliRunner, Result
from werkzeug.serving import WSGIRequestHandler, make_server

from src.app import create_app
from src.cli import main
from src.db import transaction
from src.models import Machine
from tests.support.fixtures_app import TOKEN, make_settings, run_jobs
from tests.support.services import free_port
from tests.support.snapshots import add_complete_snapshot

CREATE = ["--instance", "4242", "--host", "10.1.2.3", "--port", "2222", "--workspace", "/workspace"]
FAST = ["--interval", "0.05", "--timeout", "20"]  # a safety net: a stuck job fails the test, not the run


@pytest.fixture
def app(tmp_path, sqlite_url, store, fake_vast):  # type: ignore[no-untyped-def]
    settings = make_settings(
        tmp_path, sqlite_url, vast_api_key=fake_vast.api_key, vast_api_url=fake_vast.base_url, vast_poll_interval_s=0.05
    )
    application = create_app(settings, object_store=store, configure_logs=False)
    yield application
    application.extensions["gpusnap"].engine.dispose()


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: object, **kwargs: object) -> None:  # polling would flood failure reports
        pass


@pytest.fixture
def url(app) -> Iterator[str]:  # type: ignore[no-untyped-def]
    """The app served over HTTP on a free loopback port for the duration of the test."""
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=5)


@pytest.fixture
def worker(app) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Runs queued jobs every 50 ms in a background thread, as `gpusnap worker` would."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.is_set():
            run_jobs(app)
            stop.wait(0.05)

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield
    stop.set()
    thread.join(timeout=10)


@pytest.fixture
def cli(url):  # type: ignore[no-untyped-def]
    """`cli("snapshots", "ls")` runs the command against the served app with the test token."""
    runner = CliRunner()

    def run(*args: str, token: str | None = TOKEN, base_url: str | None = None) -> Result:
        env = {"GPUSNAP_URL": base_url or url, "GPUSNAP_TOKEN": token}
        return runner.invoke(main, list(args), env=env, catch_exceptions=False)

    return run


# ---- snapshots -----------------------------------------------------------------------------------


def test_snapshots_ls_shows_a_table_and_json(cli, app, store):
    snap = add_complete_snapshot(app, store, parts=3, part_size=1024)
    r = cli("snapshots", "ls")
    assert r.exit_code == 0, r.output
    header, row = r.stdout.splitlines()
    assert header.split()[:3] == ["ID", "INSTANCE", "STATUS"]
    assert row.split()[:8] == [snap["id"], "m1", "complete", "3.0", "KiB", "3.0", "KiB", "1.00x"]
    listed = json.loads(cli("snapshots", "ls", "--json").stdout)
    assert [s["id"] for s in listed["items"]] == [snap["id"]]


def test_snapshots_ls_pages_and_all_follows_the_cursor(cli, app, store):
    ids = {add_complete_snapshot(app, store)["id"] for _ in range(3)}
    first = cli("snapshots", "ls", "--limit", "2")
    assert first.exit_code == 0
    assert len(first.stdout.splitlines()) == 3  # header and two rows
    assert "--cursor" in first.stderr and "--all" in first.stderr
    everything = json.loads(cli("snapshots", "ls", "--limit", "2", "--all", "--json").stdout)
    assert {s["id"] for s in everything["items"]} == ids and everything["next_cursor"] is None
    assert "m1" in cli("snapshots", "ls", "--instance", "m1", "--status", "complete").stdout
    assert cli("snapshots", "ls", "--instance", "nobody").stdout.strip() == "no snapshots"


def test_snapshots_show(cli, app, store):
    snap = add_complete_snapshot(app, store)
    r = cli("snapshots", "show", snap["id"])
    assert r.exit_code == 0
    assert "id:" in r.stdout and snap["id"] in r.stdout and "complete" in r.stdout
    assert snap["prefix"] in r.stdout
    assert json.loads(cli("snapshots", "show", snap["id"], "--json").stdout)["parts"] == 3


def test_snapshots_create_prints_the_job_and_a_second_one_is_a_409(cli):
    r = cli("snapshots", "create", *CREATE, "--name", "before upgrade", "--exclude", "*.tmp", "--codec", "zstd")
    assert r.exit_code == 0, r.output
    assert "of instance 4242" in r.stdout
    assert "(create_snapshot) queued" in r.stdout
    assert "follow it: gpusnap jobs wait job_" in r.stdout
    again = cli("snapshots", "create", *CREATE)
    assert again.exit_code == 1
    assert again.stderr.startswith("error: machine_busy: ")
    assert again.stdout == ""


@pytest.mark.parametrize("flag,kept", [([], False), (["--keep-setuid"], True)])
def test_snapshots_restore_passes_keep_setuid(cli, app, store, flag, kept):
    from src.models import Job

    snap = add_complete_snapshot(app, store)
    r = cli(
        "snapshots", "restore", snap["id"], "--host", "10.0.0.9", "--port", "22", "--workspace", "/w", *flag, "--json"
    )
    assert r.exit_code == 0, r.output
    with app.extensions["gpusnap"].session_factory() as s:
        assert s.get(Job, json.loads(r.stdout)["job"]["id"]).params["keep_setuid"] is kept


def test_snapshots_create_json_and_idempotency_key(cli):
    first = json.loads(cli("snapshots", "create", *CREATE, "--json", "--idempotency-key", "k1").stdout)
    again = json.loads(cli("snapshots", "create", *CREATE, "--json", "--idempotency-key", "k1").stdout)
    assert again["job"]["id"] == first["job"]["id"] and first["snapshot"]["excludes"] == []


def test_validation_errors_from_the_server_are_shown(cli):
    r = cli("snapshots", "create", "--instance", "1", "--host", "10.1.2.3", "--port", "22", "--workspace", "rel")
    assert r.exit_code == 1
    assert r.stderr.startswith("error: validation_error: ") and "workspace_path" in r.stderr


def test_unknown_snapshot_is_not_found(cli):
    r = cli("snapshots", "show", "snap_nope")
    assert r.exit_code == 1 and r.stderr.startswith("error: not_found: ")


# ---- auth and connection -------------------------------------------------------------------------


def test_wrong_or_missing_token_exits_1_and_never_prints_the_token(cli):
    wrong = cli("snapshots", "ls", token="not-the-token")
    assert wrong.exit_code == 1
    assert wrong.stderr.startswith("error: invalid_token: ") and "GPUSNAP_TOKEN" in wrong.stderr
    assert "not-the-token" not in wrong.output
    missing = cli("jobs", "ls", token=None)
    assert missing.exit_code == 1 and missing.stderr.startswith("error: unauthorized: ")


def test_token_option_overrides_the_environment(cli):
    r = cli("snapshots", "ls", "--token", TOKEN, token="wrong")
    assert r.exit_code == 0


def test_unreachable_url_is_a_clear_message_naming_it(cli):
    dead = f"http://127.0.0.1:{free_port()}"
    r = cli("snapshots", "ls", base_url=dead)
    assert r.exit_code == 1
    assert r.stderr.startswith("error: unreachable: ") and dead in r.stderr and "GPUSNAP_URL" in r.stderr
    assert "Traceback" not in r.output


def test_url_option_overrides_the_environment(cli, url):
    dead = f"http://127.0.0.1:{free_port()}"
    assert cli("snapshots", "ls", "--url", url + "/", base_url=dead).exit_code == 0
    bad = cli("snapshots", "ls", "--url", "ftp://example.invalid")
    assert bad.exit_code == 1 and bad.stderr.startswith("error: invalid_url: ")


# ---- jobs and waiting ----------------------------------------------------------------------------


def test_verify_wait_then_rm_wait_against_a_complete_snapshot(cli, app, store, worker):
    snap = add_complete_snapshot(app, store)
    r = cli("snapshots", "verify", snap["id"], "--deep", "--wait", *FAST)
    assert r.exit_code == 0, r.output
    assert "(verify_snapshot) succeeded" in r.stdout and '"deep": true' in r.stdout
    assert "phase=" in r.stderr  # plain progress lines: stderr is not a terminal here
    gone = cli("snapshots", "rm", snap["id"], "--wait", "--json", *FAST)
    assert gone.exit_code == 0, gone.output
    job = json.loads(gone.stdout)
    assert job["status"] == "succeeded" and job["result"]["already_gone"] is False
    assert not any(key.startswith(snap["prefix"]) for key in store.objects)
    assert cli("snapshots", "show", snap["id"]).stderr.startswith("error: not_found: ")


def test_gc_wait_removes_what_a_deleted_v2_snapshot_left_and_keeps_the_rest(cli, app, store, worker):
    import os

    from tests.support.chunkstore import add_v2_snapshot

    first = add_v2_snapshot(app, store, blocks=[os.urandom(4096), os.urandom(4096)])
    second = add_v2_snapshot(app, store, blocks=[os.urandom(4096)], previous=first["manifest"])
    assert cli("snapshots", "rm", first["id"], "--wait", *FAST).exit_code == 0
    left = {k for k in store.objects if "/chunks/" in k}
    assert len(left) == 3  # shared chunks stay with the record gone
    r = cli("gc", "--grace", "0", "--wait", "--json", *FAST)
    assert r.exit_code == 0, r.output
    job = json.loads(r.stdout)
    assert job["kind"] == "gc" and job["status"] == "succeeded" and job["result"]["deleted_objects"] == 2
    assert {k for k in store.objects if "/chunks/" in k} == {
        second["store_prefix"] + o.key for o in second["manifest"].objects
    }


def test_wait_on_a_failed_job_exits_1_with_its_code(cli, app, store, worker):
    snap = add_complete_snapshot(app, store)
    store.delete_keys([snap["prefix"] + "manifest.json"])
    r = cli("snapshots", "verify", snap["id"], "--wait", *FAST)
    assert r.exit_code == 1
    assert "error: manifest_missing: " in r.stderr
    job_id = r.stdout.split()[1]
    again = cli("jobs", "wait", job_id, *FAST)
    assert again.exit_code == 1 and "error: manifest_missing: " in again.stderr
    shown = cli("jobs", "show", job_id)
    assert "failed" in shown.stdout and "manifest_missing" in shown.stdout


def test_wait_times_out_with_exit_2_and_the_job_goes_on(cli, app, store):
    snap = add_complete_snapshot(app, store)
    job_id = json.loads(cli("snapshots", "verify", snap["id"], "--json").stdout)["job"]["id"]
    r = cli("jobs", "wait", job_id, "--timeout", "0.3", "--interval", "0.05")
    assert r.exit_code == 2
    assert r.stderr.splitlines()[-1].startswith(f"error: timeout: job {job_id} is still queued after 0.3s")
    assert json.loads(cli("jobs", "show", job_id, "--json").stdout)["status"] == "queued"


def test_cancel_a_queued_job_then_wait_exits_1_cancelled(cli, app, store):
    snap = add_complete_snapshot(app, store)
    job_id = json.loads(cli("snapshots", "verify", snap["id"], "--json").stdout)["job"]["id"]
    r = cli("jobs", "cancel", job_id)
    assert r.exit_code == 0 and "cancelled" in r.stdout
    waited = cli("jobs", "wait", job_id, "--json", *FAST)
    assert waited.exit_code == 1 and "error: cancelled: " in waited.stderr
    assert json.loads(waited.stdout)["status"] == "cancelled"


def test_jobs_ls_and_show(cli, app, store):
    snap = add_complete_snapshot(app, store)
    job_id = json.loads(cli("snapshots", "verify", snap["id"], "--json").stdout)["job"]["id"]
    r = cli("jobs", "ls", "--kind", "verify_snapshot", "--status", "queued")
    assert r.exit_code == 0 and job_id in r.stdout and "verify_snapshot" in r.stdout
    assert cli("jobs", "ls", "--status", "failed").stdout.strip() == "no jobs"
    shown = cli("jobs", "show", job_id)
    assert "id:" in shown.stdout and snap["id"] in shown.stdout
    assert cli("jobs", "show", "job_nope").stderr.startswith("error: not_found: ")


# ---- instances -----------------------------------------------------------------------------------


def test_instances_ls_and_show(cli, app, store):
    add_complete_snapshot(app, store, machine_id="m7")
    created = cli("snapshots", "create", "--instance", "m7", "--host", "10.1.2.3", "--port", "22", "--workspace", "/w")
    assert created.exit_code == 0, created.output
    r = cli("instances", "ls")
    assert r.exit_code == 0 and "m7" in r.stdout
    shown = cli("instances", "show", "m7")
    assert shown.exit_code == 0
    assert shown.stdout.startswith("id:") and "m7" in shown.stdout
    machine = json.loads(cli("instances", "show", "m7", "--json").stdout)
    assert machine["id"] == "m7" and isinstance(machine["events"], list)


def test_instances_forget_host_key(cli, app):
    from src.db import transaction
    from src.models import Machine
    from tests.fakes.fake_remote_host import FAKE_HOST_KEY

    assert cli("snapshots", "create", *CREATE).exit_code == 0
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        s.get(Machine, "4242").host_key = FAKE_HOST_KEY
    r = cli("instances", "forget-host-key", "4242", "--json")
    assert r.exit_code == 0, r.output
    machine = json.loads(r.stdout)
    assert not machine["host_key_pinned"] and machine["events"][-1]["kind"] == "host_key_forgotten"
    missing = cli("instances", "forget-host-key", "nope")
    assert missing.exit_code != 0 and "not_found" in missing.stderr


def test_instances_hibernate_keep_instance_submits_a_job(cli):
    r = cli(
        "instances",
        "hibernate",
        "m9",
        "--workspace",
        "/workspace",
        "--host",
        "10.1.2.3",
        "--port",
        "22",
        "--keep-instance",
        "--json",
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["job"]["kind"] == "hibernate"
    busy = cli("instances", "hibernate", "m9", "--workspace", "/workspace", "--keep-instance")
    assert busy.exit_code == 1 and busy.stderr.startswith("error: machine_hibernating: ")
    assert cli("instances", "show", "m9", "--json").stdout.count('"hibernating"') == 1


def test_instances_wake_of_a_running_machine_is_refused(cli, app, store):
    add_complete_snapshot(app, store, machine_id="m8")
    r = cli("instances", "wake", "m8", "--gpu-type", "RTX 4090", "--max-price", "0.5", "--disk-gb", "50")
    assert r.exit_code == 1
    assert r.stderr.startswith("error: machine_not_hibernated: ") and "Traceback" not in r.output


def test_pause_then_resume_with_wait_and_the_history_shows_both(cli, app, vast_client, worker):
    instance_id = vast_client.create_instance(1001, image="img", disk_gb=50, label="gpusnap-m5")
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        s.add(Machine(id="m5", status="running", vast_instance_id=instance_id, ssh_host="10.1.2.3", ssh_port=22))
    paused = cli("instances", "pause", "m5", "--wait", *FAST)
    assert paused.exit_code == 0, paused.output
    assert "(pause) succeeded" in paused.stdout
    assert json.loads(cli("instances", "show", "m5", "--json").stdout)["status"] == "paused"
    resumed = cli("instances", "resume", "m5", "--wait", "--json", *FAST)
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["result"]["instance_id"] == instance_id
    history = cli("instances", "show", "m5").stdout
    assert "running" in history.splitlines()[1]
    assert "paused" in history and "resumed" in history


def _requests_seen(app, route: str) -> float:  # type: ignore[no-untyped-def]
    registry = app.extensions["gpusnap"].metrics.registry
    return (
        registry.get_sample_value("gpusnap_http_requests_total", {"method": "GET", "route": route, "status": "200"})
        or 0.0
    )


def test_jobs_wait_follows_the_event_stream_instead_of_polling(cli, app, store):
    snap = add_complete_snapshot(app, store)
    job_id = json.loads(cli("snapshots", "verify", snap["id"], "--json").stdout)["job"]["id"]

    def run_once_the_stream_is_open() -> None:  # the job runs only while `jobs wait` is following it
        deadline = time.monotonic() + 20
        while _requests_seen(app, "/api/events") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        run_jobs(app)

    runner = threading.Thread(target=run_once_the_stream_is_open, daemon=True)
    runner.start()
    r = cli("jobs", "wait", job_id, *FAST)
    runner.join(20)
    assert r.exit_code == 0, r.output
    assert "succeeded" in r.stdout and "phase=" in r.stderr
    assert _requests_seen(app, "/api/events") == 1
    # One read when the stream opened and one for the finished job: no polls every 50 ms in between.
    assert _requests_seen(app, "/api/jobs/<job_id>") == 2


def test_jobs_wait_falls_back_to_polling_when_the_server_has_no_stream_free(cli, app, store, url, worker):
    c = app.extensions["gpusnap"]
    c.settings = c.settings.replace(events_max_streams=1)
    held = requests.get(f"{url}/api/events", headers={"Authorization": f"Bearer {TOKEN}"}, stream=True, timeout=10)
    try:
        assert held.status_code == 200
        snap = add_complete_snapshot(app, store)
        r = cli("snapshots", "verify", snap["id"], "--wait", *FAST)
        assert r.exit_code == 0, r.output
        assert "succeeded" in r.stdout
        refused = c.metrics.registry.get_sample_value(
            "gpusnap_http_requests_total", {"method": "GET", "route": "/api/events", "status": "503"}
        )
        assert refused == 1  # it asked for the stream, was told no, and polled
    finally:
        held.close()


def test_jobs_wait_reopens_a_stream_the_server_ended(cli, app, store):
    c = app.extensions["gpusnap"]
    c.settings = c.settings.replace(events_max_stream_s=0.3, events_poll_s=0.05)  # streams end quickly
    snap = add_complete_snapshot(app, store)
    job_id = json.loads(cli("snapshots", "verify", snap["id"], "--json").stdout)["job"]["id"]

    def run_after_two_streams() -> None:  # the job runs only once `jobs wait` has opened a second stream
        deadline = time.monotonic() + 20
        while _requests_seen(app, "/api/events") < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        run_jobs(app)

    runner = threading.Thread(target=run_after_two_streams, daemon=True)
    runner.start()
    r = cli("jobs", "wait", job_id, *FAST)
    runner.join(20)
    assert r.exit_code == 0, r.output
    assert "succeeded" in r.stdout
    assert _requests_seen(app, "/api/events") >= 2


def test_jobs_wait_does_not_hammer_a_stream_that_keeps_ending_at_once(cli, app, store):
    """A stream that ends as soon as it opens (a proxy that cuts it, a tiny EVENTS_MAX_STREAM_S) was
    reopened in a tight loop, hundreds of requests a second, ignoring the stream's `retry: 2000`."""
    c = app.extensions["gpusnap"]
    c.settings = c.settings.replace(events_max_stream_s=0.001, events_poll_s=0.01)
    snap = add_complete_snapshot(app, store)
    job_id = json.loads(cli("snapshots", "verify", snap["id"], "--json").stdout)["job"]["id"]
    r = cli("jobs", "wait", job_id, "--interval", "0.05", "--timeout", "3")  # no worker: the job stays queued
    assert r.exit_code != 0 and "queued" in r.output, r.output
    opened = _requests_seen(app, "/api/events")
    assert 1 <= opened <= 6, f"{opened:g} streams opened in 3 s"
