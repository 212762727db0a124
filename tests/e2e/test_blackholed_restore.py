"""'failed' means the live workspace is untouched (issue 14): when the SSH link of a restore is
black-holed (a TCP relay in front of the loopback sshd stops forwarding without closing), the remote
script must not live on to swap the workspace in later. Before the job ends, its process group is
killed over a fresh connection and confirmed gone; when no fresh connection can be made either, the
job says so (`remote_state_unknown`, with a machine event) instead of a plain `failed`.

The restore is held mid-way by a second relay in front of the S3 server that black-holes every
connection, so the script is alive (stalled downloading) when its SSH link dies."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.support.tcp_relay import TcpRelay
from tests.support.trees import make_tricky_tree

pytestmark = pytest.mark.slow


def restore_processes(sshd_port: int) -> dict[int, int]:
    """{pid: pgid} of every live `restore.py` run from one of our `mktemp` script folders through the
    sshd on `sshd_port` (the 'GPU host' is this machine, which other test runs may share: sshd puts
    the server port in each session's SSH_CONNECTION)."""
    found = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if not any(b"/gpusnap." in a and a.endswith(b"/restore.py") for a in cmdline):
                continue
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        connection = next((e for e in environ if e.startswith(b"SSH_CONNECTION=")), b"")
        if fields[0] != "Z" and connection.endswith(b" %d" % sshd_port):
            found[int(proc.name)] = int(fields[2])
    return found


@pytest.fixture
def relays(s3_server, sshd) -> Iterator[tuple[TcpRelay, TcpRelay]]:  # type: ignore[no-untyped-def]
    s3 = urlsplit(s3_server.endpoint)
    with TcpRelay((s3.hostname, s3.port)) as s3_relay, TcpRelay((sshd.host, sshd.port)) as ssh_relay:
        yield s3_relay, ssh_relay


def _stalled_restore(stack, sshd, tmp_path, relays) -> tuple[dict, Path, dict[int, int]]:  # type: ignore[no-untyped-def]
    s3_relay, ssh_relay = relays
    workspace = make_tricky_tree(tmp_path / "workspace")
    r = stack.post(
        "/api/gpu-snapshots",
        json={"instance_id": "bh-src", "ssh_host": sshd.host, "ssh_port": sshd.port, "workspace_path": str(workspace)},
    )
    assert stack.wait_job(r.json()["job"]["id"])["status"] == "succeeded"
    snapshot_id = r.json()["snapshot"]["id"]

    stack.stop_worker()
    stack.start_worker(
        R2_ENDPOINT=f"http://{s3_relay.host}:{s3_relay.port}",
        REMOTE_IDLE_TIMEOUT_S="5",
        SSH_CONNECT_TIMEOUT_S="2",
        SSH_CLEANUP_TIMEOUT_S="6",
    )
    s3_relay.blackhole(new_connections=True)  # the restore's downloads hang: it stays alive mid-way
    assert restore_processes(sshd.port) == {}
    target = tmp_path / "restored"
    r = stack.post(
        f"/api/gpu-snapshots/{snapshot_id}/restore",
        json={
            "ssh_host": ssh_relay.host,
            "ssh_port": ssh_relay.port,
            "workspace_path": str(target),
            "instance_id": "bh-target",
        },
    )
    assert r.status_code == 202, r.text
    job = r.json()["job"]
    deadline = time.monotonic() + 60
    while not (running := restore_processes(sshd.port)):
        assert time.monotonic() < deadline, (
            f"the restore script never started: {stack.get('/api/jobs/' + job['id']).json()}"
        )
        time.sleep(0.05)
    return job, target, running


def test_blackholed_link_kills_the_script_over_a_fresh_connection(stack, sshd, tmp_path, relays):
    _, ssh_relay = relays
    job, target, running = _stalled_restore(stack, sshd, tmp_path, relays)
    ssh_relay.blackhole()  # this connection is dead; a new one still gets through
    done = stack.wait_job(job["id"], timeout=90)
    assert done["status"] == "failed" and done["error"]["code"] == "remote_timeout", done
    # Known dead when the job ended, so it can never swap the workspace in.
    assert restore_processes(sshd.port) == {}, running
    assert not target.exists()
    assert ssh_relay.connections >= 2  # the cleanup came over a fresh connection


def test_no_way_back_to_the_host_ends_remote_state_unknown(stack, sshd, tmp_path, relays):
    _, ssh_relay = relays
    job, target, running = _stalled_restore(stack, sshd, tmp_path, relays)
    ssh_relay.blackhole(new_connections=True)  # the whole path is dead: nothing can confirm the kill
    try:
        done = stack.wait_job(job["id"], timeout=90)
        assert done["status"] == "failed" and done["error"]["code"] == "remote_state_unknown", done
        assert "may still be running" in done["error"]["message"]
        assert restore_processes(sshd.port), "the script was in fact still running: the job must not claim otherwise"
        events = stack.get("/api/instances/bh-target").json()["events"]
        unknown = [e for e in events if e["kind"] == "remote_state_unknown"]
        assert unknown and "workspace may have changed" in unknown[-1]["message"], events
    finally:
        for pgid in set(restore_processes(sshd.port).values()):
            os.killpg(pgid, signal.SIGKILL)
