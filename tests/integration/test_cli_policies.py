"""`gpusnap instances policy set|show|rm`, `instances wake --priority` and `snapshots restore` with
several `--host`, against the real app over HTTP (the fixtures of test_cli_client.py)."""

from __future__ import annotations

import json

from src.db import transaction
from src.models import Job, Machine
from tests.integration.test_cli_client import app, cli, url  # noqa: F401 - fixtures
from tests.support.snapshots import add_complete_snapshot


def _machine(app, machine_id: str = "12345") -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        s.add(Machine(id=machine_id, status="running", ssh_host="10.0.0.9", ssh_port=22, workspace_path="/workspace"))


def test_policy_set_show_rm(cli, app):  # type: ignore[no-untyped-def]  # noqa: F811
    _machine(app)
    r = cli(
        "instances",
        "policy",
        "set",
        "12345",
        "--schedule",
        "0 3 * * *",
        "--keep-last",
        "7",
        "--keep-daily",
        "7",
        "--exclude",
        ".cache",
        "--idle-below",
        "5",
        "--idle-for",
        "1800",
        "--idle-action",
        "notify",
        "--json",
    )
    assert r.exit_code == 0, r.output
    policy = json.loads(r.stdout)
    assert policy["schedule"] == "0 3 * * *" and policy["excludes"] == [".cache"]
    assert policy["retention"] == {"keep_last": 7, "keep_daily": 7, "keep_weekly": 0, "keep_monthly": 0}
    assert policy["idle"] == {
        "gpu_util_below": 5,
        "for_s": 1800,
        "sample_every_s": 60,
        "action": "notify",
        "respect_ssh_sessions": True,
        "dry_run": False,
    }
    shown = cli("instances", "policy", "show", "12345")
    assert shown.exit_code == 0, shown.output
    assert "0 3 * * * (UTC)" in shown.stdout and "keep_last=7, keep_daily=7" in shown.stdout
    assert "notify when every GPU < 5% for 1800s" in shown.stdout
    machine = cli("instances", "show", "12345")
    assert (
        "policy:" in machine.stdout
        and "snapshots 0 3 * * * UTC; retention last=7,daily=7; idle notify" in machine.stdout
    )
    bad = cli("instances", "policy", "set", "12345", "--schedule", "0 3 * *")
    assert bad.exit_code == 1 and bad.stderr.startswith("error: validation_error: schedule")
    assert cli("instances", "policy", "rm", "12345").exit_code == 0
    gone = cli("instances", "policy", "show", "12345")
    assert gone.exit_code == 1 and gone.stderr.startswith("error: no_policy: ")


def test_policy_set_from_a_file(cli, app, tmp_path):  # type: ignore[no-untyped-def]  # noqa: F811
    _machine(app)
    body = tmp_path / "policy.json"
    body.write_text(json.dumps({"retention": {"keep_last": 2}, "idle": {"action": "notify", "dry_run": True}}))
    r = cli("instances", "policy", "set", "12345", "--from-file", str(body), "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["idle"]["dry_run"] is True
    both = cli("instances", "policy", "set", "12345", "--from-file", str(body), "--keep-last", "3")
    assert both.exit_code == 2 and "--from-file" in both.output


def test_restore_onto_several_hosts_starts_one_job_each(cli, app, store):  # type: ignore[no-untyped-def]  # noqa: F811
    snap = add_complete_snapshot(app, store)
    r = cli(
        "snapshots",
        "restore",
        snap["id"],
        "--host",
        "10.0.0.5:22",
        "--host",
        "10.0.0.6",
        "--port",
        "2222",
        "--workspace",
        "/w",
        "--json",
        "--idempotency-key",
        "rep-1",
    )
    assert r.exit_code == 0, r.output
    jobs = json.loads(r.stdout)["jobs"]
    assert len(jobs) == 2 and {j["machine_id"] for j in jobs} == {"10.0.0.5:22", "10.0.0.6:2222"}
    again = cli(
        "snapshots",
        "restore",
        snap["id"],
        "--host",
        "10.0.0.5:22",
        "--host",
        "10.0.0.6",
        "--port",
        "2222",
        "--workspace",
        "/w",
        "--json",
        "--idempotency-key",
        "rep-1",
    )
    assert [j["id"] for j in json.loads(again.stdout)["jobs"]] == [j["id"] for j in jobs]  # a retry: same jobs
    assert cli("snapshots", "restore", snap["id"], "--host", "10.0.0.7", "--workspace", "/w").exit_code == 2
    two = cli(
        "snapshots", "restore", snap["id"], "--host", "a:1", "--host", "b:1", "--instance", "x", "--workspace", "/w"
    )
    assert two.exit_code == 2 and "--instance" in two.output


def test_wake_priority_is_sent(cli, app, store):  # type: ignore[no-untyped-def]  # noqa: F811
    add_complete_snapshot(app, store, machine_id="m9")
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        s.get(Machine, "m9").status = "hibernated"
    r = cli("instances", "wake", "m9", "--priority", "9", "--json")
    assert r.exit_code == 0, r.output
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        assert s.get(Job, json.loads(r.stdout)["job"]["id"]).state["priority"] == 9
