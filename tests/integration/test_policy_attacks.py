"""An outside tester's attacks on machine policies (issue 11) that found something: each test is a
repro that failed before its fix. The scheduler's `tick` runs with an explicit clock, as in
tests/integration/test_policies.py."""
from __future__ import annotations

import time

from src.db import transaction
from src.models import Machine, Snapshot
from src.services.retention import apply_retention
from tests.support.fixtures_app import AUTH
from tests.support.snapshots import add_complete_snapshot


def _machine(app, machine_id: str = "m1") -> None:  # type: ignore[no-untyped-def]
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        s.add(Machine(id=machine_id, status="running", ssh_host="127.0.0.1", ssh_port=22,
                      workspace_path="/workspace"))


def _snapshot_of(app, store, path: str) -> str:  # type: ignore[no-untyped-def]
    snap_id = add_complete_snapshot(app, store, machine_id="m1", parts=1)["id"]
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        s.get(Snapshot, snap_id).workspace_path = path
    time.sleep(0.002)  # ids order by creation only across milliseconds
    return snap_id


def test_retention_counts_each_workspace_path_apart(app, client, store):  # type: ignore[no-untyped-def]
    """restic's forget groups snapshots by host and paths before it applies the keep rules (`--group-by`
    defaults to `host,paths`). Without that, keep_last 1 and one manual snapshot of another directory
    (a dataset, a subdirectory) deleted the machine's only snapshot of its workspace."""
    c = app.extensions["gpusnap"]
    _machine(app)
    workspace = [_snapshot_of(app, store, "/workspace") for _ in range(2)]
    data = _snapshot_of(app, store, "/data")  # a manual snapshot of another path, newest of all
    r = client.put("/api/instances/m1/policy", json={"retention": {"keep_last": 1}}, headers=AUTH)
    assert r.status_code == 200, r.get_json()
    deleting = apply_retention(c, "m1")
    assert deleting == [workspace[0]]  # the older /workspace one only
    kept = app.extensions["gpusnap"]
    with transaction(kept.session_factory) as s:
        assert s.get(Snapshot, workspace[1]).status == "complete" and s.get(Snapshot, data).status == "complete"
