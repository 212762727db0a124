"""Hosts that accept our key and then never answer must not hold a worker (issue 9): a real paramiko
SSH server that authenticates and then stays silent on `exec` (or on the SFTP subsystem), driven
through the HTTP API and a real worker process. Cancel ends the job within seconds; the job kind's
deadline ends it `remote_timeout`; either way the worker is free for the next job."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.support.silent_ssh_server import SilentSshServer
from tests.support.trees import make_tricky_tree

pytestmark = pytest.mark.slow


@pytest.fixture(params=["exec", "sftp"])
def silent(request, sshd) -> Iterator[SilentSshServer]:  # type: ignore[no-untyped-def]
    with SilentSshServer(authorized_key_path=sshd.client_key_path, mode=request.param) as server:
        yield server


def _snapshot_of(stack, server, instance_id: str = "silent-1") -> dict:  # type: ignore[no-untyped-def]
    r = stack.post(
        "/api/gpu-snapshots",
        json={
            "instance_id": instance_id,
            "ssh_host": server.host,
            "ssh_port": server.port,
            "workspace_path": "/workspace",
        },
    )
    assert r.status_code == 202, r.text
    return r.json()["job"]


def _wait_held(server: SilentSshServer, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while server.held == 0:
        assert time.monotonic() < deadline, "the worker never reached the silent request"
        time.sleep(0.05)


def test_cancel_ends_a_job_stuck_on_a_silent_host_within_seconds(stack, silent, sshd, tmp_path):
    job = _snapshot_of(stack, silent)
    _wait_held(silent)  # the worker is now blocked on a request the host will never answer
    time.sleep(1.0)
    assert stack.get(f"/api/jobs/{job['id']}").json()["status"] == "running"
    began = time.monotonic()
    r = stack.post(f"/api/jobs/{job['id']}/cancel")
    assert r.status_code == 202, r.text
    done = stack.wait_job(job["id"], timeout=30)
    took = time.monotonic() - began
    assert done["status"] == "cancelled", done
    assert took < 10, f"cancel took {took:.1f}s"
    assert silent.exec_requests if silent.mode == "exec" else silent.subsystem_requests

    # The worker is free: a real host's snapshot goes through.
    workspace = make_tricky_tree(tmp_path / "workspace")
    r = stack.post(
        "/api/gpu-snapshots",
        json={"instance_id": "real-1", "ssh_host": sshd.host, "ssh_port": sshd.port, "workspace_path": str(workspace)},
    )
    assert stack.wait_job(r.json()["job"]["id"])["status"] == "succeeded"


def test_the_kind_deadline_fails_a_silent_job_remote_timeout(stack, silent):
    stack.stop_worker()
    stack.start_worker(JOB_DEADLINE_SNAPSHOT_S="3")
    began = time.monotonic()
    jobs = [_snapshot_of(stack, silent, instance_id=f"silent-{n}") for n in range(3)]  # more than the threads
    for job in jobs:
        done = stack.wait_job(job["id"], timeout=60)
        assert done["status"] == "failed" and done["error"]["code"] == "remote_timeout", done
        assert "deadline of 3s" in done["error"]["message"]
    # Two worker threads, three jobs of at most ~3 s each (plus the heartbeat's granularity).
    assert time.monotonic() - began < 20
    snap = stack.get(f"/api/gpu-snapshots/{_snapshot_id(stack, jobs[0])}").json()
    assert snap["status"] == "failed"


def _snapshot_id(stack, job: dict) -> str:  # type: ignore[no-untyped-def]
    return stack.get(f"/api/jobs/{job['id']}").json()["snapshot_id"]
