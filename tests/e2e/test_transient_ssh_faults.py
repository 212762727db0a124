"""A dropped SSH link is retried inside the job (issue 14), end to end: a real worker process, the loopback
sshd behind tests/support/fault_relay.py (which resets live TCP connections on demand), SeaweedFS behind
tests/support/slow_s3_proxy.py, which holds the upload after a few parts so that the link is cut mid-upload
however fast this machine stores the rest."""

from __future__ import annotations

import os
import pathlib
import time

import boto3
import pytest

from tests.support.fault_relay import FaultRelay
from tests.support.trees import describe_tree

# These count format-1 parts stored and skipped across a cut link (format 2 resumes by its chunk store:
# tests/integration/test_remote_dedup.py).
pytestmark = [pytest.mark.slow, pytest.mark.snapshot_format(1)]


@pytest.fixture
def relay(sshd):  # type: ignore[no-untyped-def]
    with FaultRelay((sshd.host, sshd.port)) as r:
        yield r


def _workspace(tmp_path: pathlib.Path) -> pathlib.Path:
    workspace = tmp_path / "workspace"
    workspace.mkdir()
    for i in range(12):  # incompressible: 48 parts of 1 MiB
        (workspace / f"blob{i}.bin").write_bytes(os.urandom(4 << 20))
    return workspace


def _create_via(stack, relay, workspace, instance_id):  # type: ignore[no-untyped-def]
    r = stack.post(
        "/api/gpu-snapshots",
        json={
            "instance_id": instance_id,
            "ssh_host": "127.0.0.1",
            "ssh_port": relay.port,
            "workspace_path": str(workspace),
        },
    )
    assert r.status_code == 202, r.text
    return r.json()


def _reset_once_parts_are_stored(stack, relay, held_bucket, job_id: str) -> None:  # type: ignore[no-untyped-def]
    """Cut the SSH link while the upload is held after 3 stored parts, then let the bucket go on."""
    held_bucket.hold_puts_after(3, key_part="/part-")
    deadline = time.monotonic() + 90
    while True:
        job = stack.get(f"/api/jobs/{job_id}").json()
        if job["phase"] == "upload" and (job["progress"]["parts_done"] or 0) >= 3 and held_bucket.puts_held:
            break
        assert job["status"] in ("queued", "running"), job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)
    assert relay.reset_all() >= 1
    held_bucket.release_puts()


def _keys(s3_server, prefix: str) -> list[str]:  # type: ignore[no-untyped-def]
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
    )
    return [o["Key"] for o in s3.list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix).get("Contents", [])]


def test_a_reset_mid_upload_is_retried_and_resumes(stack, relay, held_bucket, tmp_path):  # type: ignore[no-untyped-def]
    stack.stop_worker()
    stack.start_worker(REMOTE_RETRY_BACKOFF_S="1", R2_ENDPOINT=held_bucket.endpoint)
    workspace = _workspace(tmp_path)
    created = _create_via(stack, relay, workspace, "reset-1")
    job_id = created["job"]["id"]
    _reset_once_parts_are_stored(stack, relay, held_bucket, job_id)
    job = stack.wait_job(job_id, timeout=240)
    assert job["status"] == "succeeded", job
    assert job["remote_tries"] == 2 and job["result"]["remote_tries"] == 2
    assert job["result"]["skipped_parts"] >= 1  # the second try resumed instead of starting over
    assert job["result"]["snapshot_id"] == created["snapshot"]["id"]
    events = stack.get("/api/instances/reset-1").json().get("events") or []
    assert any(e.get("kind") == "remote_retry" for e in events), events

    target = tmp_path / "restored"
    r = stack.post(
        f"/api/gpu-snapshots/{created['snapshot']['id']}/restore",
        json={"ssh_host": "127.0.0.1", "ssh_port": relay.port, "workspace_path": str(target), "instance_id": "reset-1"},
    )
    assert r.status_code == 202, r.text
    assert stack.wait_job(r.json()["job"]["id"], timeout=240)["status"] == "succeeded"
    assert describe_tree(target) == describe_tree(workspace)


def test_cancel_during_the_retry_wait_is_final_and_removes_the_parts(
    stack,
    relay,
    held_bucket,  # type: ignore[no-untyped-def]
    s3_server,
    tmp_path,
):
    stack.stop_worker()
    stack.start_worker(REMOTE_RETRY_BACKOFF_S="120", R2_ENDPOINT=held_bucket.endpoint)
    workspace = _workspace(tmp_path)
    created = _create_via(stack, relay, workspace, "reset-2")
    job_id = created["job"]["id"]
    _reset_once_parts_are_stored(stack, relay, held_bucket, job_id)
    job = stack.wait_phase(job_id, ("retry_wait",), timeout=60)
    assert job["phase"] == "retry_wait" and job["remote_tries"] == 2, job
    assert stack.post(f"/api/jobs/{job_id}/cancel").status_code == 202
    started = time.monotonic()
    job = stack.wait_job(job_id, timeout=60)
    assert job["status"] == "cancelled", job
    assert time.monotonic() - started < 30  # not after the 120 s backoff
    snap = stack.get(f"/api/gpu-snapshots/{created['snapshot']['id']}").json()
    assert snap["status"] == "failed"
    deadline = time.monotonic() + 20  # the first try's script may store a last part as it stops
    while _keys(s3_server, snap["storage_prefix"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _keys(s3_server, snap["storage_prefix"]) == []
