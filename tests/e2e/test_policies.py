"""Policies end to end: the HTTP API, a real worker process running the jobs, the loopback sshd as the
GPU host with a fake `nvidia-smi` first on its PATH, SeaweedFS as the bucket and the fake vast.ai API.
The scheduler's `tick` (what the worker's periodic task runs every minute) is called by the test with
an explicit clock, so minutes pass at once; the worker's own ticks are off (SCHEDULER_ENABLED=false)."""

from __future__ import annotations

import datetime as dt
import pathlib
import sys
import time

import paramiko
import pytest

from src.adapters.vast import VastClient
from src.jobs.scheduler import tick
from src.migrate import upgrade
from src.models import utcnow
from tests.support.fixtures_e2e import Stack, stack_env

pytestmark = pytest.mark.slow

# Stands in for nvidia-smi on the host. It answers only the query gpusnap sends, in the format
# `nvidia-smi --help-query-gpu` documents for csv,noheader,nounits (one bare integer per GPU per line),
# and fails as the real one does when the driver is unreachable (a message on stdout, exit status 9).
FAKE_NVIDIA_SMI = """#!/bin/sh
if [ "$*" != "--query-gpu=utilization.gpu --format=csv,noheader,nounits" ]; then
  echo "Invalid combination of input arguments. Please run 'nvidia-smi -h' for help." >&2; exit 2
fi
if [ -e {state}/fail ]; then
  echo "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."; exit 9
fi
cat {state}/util
"""


class Gpus:
    """The fake's state: what every GPU reads, or a failing driver."""

    def __init__(self, root: pathlib.Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def read(self, *percent: int) -> None:
        (self.root / "util").write_text("".join(f"{p}\n" for p in percent))
        (self.root / "fail").unlink(missing_ok=True)

    def fail(self) -> None:
        (self.root / "fail").write_text("")


def host_python(tmp: pathlib.Path, gpus: Gpus) -> str:
    """A REMOTE_PYTHON that puts the fake nvidia-smi first on the host's PATH."""
    bindir = tmp / "hostbin"
    bindir.mkdir()
    smi = bindir / "nvidia-smi"
    smi.write_text(FAKE_NVIDIA_SMI.format(state=gpus.root))
    smi.chmod(0o755)
    wrapper = tmp / "host-python"
    wrapper.write_text(f'#!/bin/sh\nPATH={bindir}:$PATH; export PATH\nexec {sys.executable} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


@pytest.fixture
def gpus(tmp_path) -> Gpus:  # type: ignore[no-untyped-def]
    return Gpus(tmp_path / "gpus")


@pytest.fixture
def pstack(tmp_path, sshd, s3_server, s3_prefix, fake_vast, gpus):  # type: ignore[no-untyped-def]
    env = {
        **stack_env(tmp_path, sshd, s3_server, s3_prefix, fake_vast),
        "SCHEDULER_ENABLED": "false",
        "REMOTE_PYTHON": host_python(tmp_path, gpus),
    }
    upgrade(env["DATABASE_URL"])
    s = Stack(env=env, tmp=tmp_path)
    s.start_worker()
    yield s
    s.close()


def _snapshot(stack, machine_id: str, sshd, workspace: pathlib.Path) -> dict:  # type: ignore[no-untyped-def]
    r = stack.post(
        "/api/gpu-snapshots",
        json={
            "instance_id": machine_id,
            "ssh_host": sshd.host,
            "ssh_port": sshd.port,
            "workspace_path": str(workspace),
        },
    )
    assert r.status_code == 202, r.text
    job = stack.wait_job(r.json()["job"]["id"])
    assert job["status"] == "succeeded", job
    return job


def _complete(stack, machine_id: str) -> list[str]:  # type: ignore[no-untyped-def]
    items = stack.get("/api/gpu-snapshots", params={"instance_id": machine_id, "status": "complete"}).json()["items"]
    return [s["id"] for s in items]


def _wait_no_active(stack, kind: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while any(
        j["status"] in ("queued", "running")
        for j in stack.get("/api/jobs", params={"kind": kind, "limit": 200}).json()["items"]
    ):
        assert time.monotonic() < deadline, f"{kind} jobs still active after {timeout}s"
        time.sleep(0.1)


def test_a_schedule_every_minute_with_keep_last_2_leaves_two(pstack, sshd, s3_server, tmp_path):  # type: ignore[no-untyped-def]
    c = pstack.app.extensions["gpusnap"]
    workspace = tmp_path / "ws"
    workspace.mkdir()
    (workspace / "model.bin").write_bytes(b"weights" * 1000)
    _snapshot(pstack, "box", sshd, workspace)  # the machine is known from a manual snapshot
    r = pstack.http.put(
        f"{pstack.url}/api/instances/box/policy",
        json={"schedule": "* * * * *", "retention": {"keep_last": 2}},
        timeout=10,
    )
    assert r.status_code == 200, r.text
    set_at = utcnow()
    scheduled = []
    for minute in range(1, 4):
        (workspace / f"step-{minute}.txt").write_text(str(minute))
        report = tick(c, now=set_at + dt.timedelta(minutes=minute))
        assert len(report["scheduled"]) == 1, report
        job = pstack.wait_job(report["scheduled"][0])
        assert job["status"] == "succeeded", job
        scheduled.append(job["result"]["snapshot_id"])
        _wait_no_active(pstack, "delete_snapshot")
    complete = _complete(pstack, "box")
    assert sorted(complete) == sorted(scheduled[-2:])  # the newest two; the manual one and the first went
    deleted = [j for j in pstack.get("/api/jobs", params={"kind": "delete_snapshot"}).json()["items"]]
    assert len(deleted) == 2 and all(j["status"] == "succeeded" for j in deleted)
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
    )
    for job in deleted:
        prefix = pstack.env["SNAPSHOT_PREFIX"] + f"box/{job['snapshot_id']}/"
        assert s3.list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix).get("KeyCount", 0) == 0
    events = [e["kind"] for e in pstack.get("/api/instances/box").json()["events"]]
    assert events.count("retention") == 3


@pytest.fixture
def box(fake_vast, tmp_path):  # type: ignore[no-untyped-def]
    """A running vast.ai instance (the fake reports the loopback sshd as its endpoint) with a workspace."""
    client = VastClient(fake_vast.api_key, fake_vast.base_url, backoff_base=0.01)
    instance_id = client.create_instance(1001, image="pytorch/pytorch:latest", disk_gb=50, label="my-box")
    while not client.show_instance(instance_id).is_running:
        pass
    workspace = tmp_path / "box-ws"
    workspace.mkdir()
    (workspace / "train.py").write_text("print('hi')\n")
    return {"id": str(instance_id), "workspace": workspace}


class Ticker:
    """Ticks the scheduler one second apart (the policy samples every second), from `start`."""

    def __init__(self, stack: Stack) -> None:
        self.c = stack.app.extensions["gpusnap"]
        self.now = utcnow()

    def run(self, seconds: int) -> list[dict]:
        reports = []
        for _ in range(seconds):
            self.now += dt.timedelta(seconds=1)
            reports.append(tick(self.c, now=self.now))
        return reports


def _samples(stack, machine_id: str) -> list[dict]:  # type: ignore[no-untyped-def]
    return [e["data"] for e in stack.get(f"/api/instances/{machine_id}").json()["events"] if e["kind"] == "idle_sample"]


def _interactive_session(sshd) -> tuple[paramiko.SSHClient, paramiko.Channel]:  # type: ignore[no-untyped-def]
    """Log in as a person would: a terminal and a shell. Returns once the shell runs."""
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect(
        sshd.host,
        port=sshd.port,
        username=sshd.user,
        key_filename=str(sshd.client_key_path),
        look_for_keys=False,
        allow_agent=False,
        timeout=10,
    )
    channel = client.invoke_shell()
    channel.send(b"echo shell-is-up\n")
    seen, deadline = b"", time.monotonic() + 20
    while b"shell-is-up\r\n" not in seen.replace(b"echo shell-is-up", b""):
        assert time.monotonic() < deadline, f"no shell: {seen!r}"
        if channel.recv_ready():
            seen += channel.recv(4096)
        else:
            time.sleep(0.05)
    return client, channel


def test_idle_gpus_hibernate_the_machine_and_nothing_else_does(pstack, sshd, fake_vast, box, gpus):  # type: ignore[no-untyped-def]
    _snapshot(pstack, box["id"], sshd, box["workspace"])
    r = pstack.http.put(
        f"{pstack.url}/api/instances/{box['id']}/policy",
        timeout=10,
        json={
            "workspace_path": str(box["workspace"]),
            "idle": {"gpu_util_below": 5, "for_s": 3, "sample_every_s": 1, "action": "hibernate"},
        },
    )
    assert r.status_code == 200, r.text
    ticker = Ticker(pstack)

    # One GPU at 80% keeps the machine awake, however idle the other is.
    gpus.read(0, 80)
    assert all(not rep["actions"] for rep in ticker.run(6))
    assert _samples(pstack, box["id"])[-1] == {"gpu_util": [0, 80], "ssh_sessions": 0, "ok": True, "error": None}

    # A driver that does not answer is busy, never idle (not "0%").
    gpus.fail()
    assert all(not rep["actions"] for rep in ticker.run(6))
    failed = _samples(pstack, box["id"])[-1]
    assert failed["ok"] is False and failed["error"].startswith("nvidia_smi_failed: exit 9")

    # Idle GPUs, but someone is logged in over SSH: deferred.
    gpus.read(0, 0)
    client, channel = _interactive_session(sshd)
    try:
        assert all(not rep["actions"] for rep in ticker.run(6))
        assert _samples(pstack, box["id"])[-1]["ssh_sessions"] >= 1
    finally:
        channel.close()
        client.close()
    deadline = time.monotonic() + 20
    while True:  # sshd tears the session down after the client leaves
        reps = ticker.run(1)
        if _samples(pstack, box["id"])[-1]["ssh_sessions"] == 0:
            break
        assert not reps[0]["actions"] and time.monotonic() < deadline

    # Every GPU below 5% in every sample for the whole window: hibernate, as an ordinary job.
    actions = [a for rep in ticker.run(5) for a in rep["actions"]]
    assert len(actions) == 1 and actions[0]["action"] == "hibernate" and "job_id" in actions[0], (
        actions,
        [e["message"] for e in pstack.get(f"/api/instances/{box['id']}").json()["events"]][-3:],
    )
    job = pstack.wait_job(actions[0]["job_id"], timeout=120)
    assert job["kind"] == "hibernate" and job["status"] == "succeeded", job
    snap = pstack.get(f"/api/gpu-snapshots/{job['result']['snapshot_id']}").json()
    assert snap["status"] == "complete" and snap["verified_at"]
    machine = pstack.get(f"/api/instances/{box['id']}").json()
    assert machine["status"] == "hibernated"
    assert int(box["id"]) not in [i["id"] for i in fake_vast.live_instances()]
    assert "idle_action" in [e["kind"] for e in machine["events"]]
    # A hibernated machine is not sampled.
    assert all(not rep["sampled"] for rep in ticker.run(2))
    metrics = pstack.get("/metrics").text
    assert "gpusnap_wake_phase_seconds_bucket" in metrics


def test_dry_run_only_says_what_it_would_do(pstack, sshd, fake_vast, box, gpus):  # type: ignore[no-untyped-def]
    _snapshot(pstack, box["id"], sshd, box["workspace"])
    r = pstack.http.put(
        f"{pstack.url}/api/instances/{box['id']}/policy",
        timeout=10,
        json={
            "workspace_path": str(box["workspace"]),
            "idle": {"gpu_util_below": 5, "for_s": 2, "sample_every_s": 1, "action": "hibernate", "dry_run": True},
        },
    )
    assert r.status_code == 200, r.text
    gpus.read(1)
    actions = [a for rep in Ticker(pstack).run(4) for a in rep["actions"]]
    assert actions and all(a["dry_run"] and "job_id" not in a for a in actions)
    machine = pstack.get(f"/api/instances/{box['id']}").json()
    assert machine["status"] == "running" and machine["active_job_id"] is None
    dry = [e for e in machine["events"] if e["kind"] == "idle_dry_run"]
    assert dry and dry[0]["message"].startswith("would hibernate")
    assert 'gpusnap_idle_gpu_utilization{gpu="0",machine="%s"} 1.0' % box["id"] in pstack.get("/metrics").text


def test_one_snapshot_restores_onto_several_hosts_at_once(pstack, sshd, sshd_factory, tmp_path):  # type: ignore[no-untyped-def]
    """Replication: one restore job per target, running at the same time (each locks only its target)."""
    workspace = tmp_path / "src-ws"
    workspace.mkdir()
    (workspace / "data.bin").write_bytes(b"x" * 300_000)
    snap_id = _snapshot(pstack, "origin", sshd, workspace)["result"]["snapshot_id"]
    second = sshd_factory()
    second.authorize_key_of(pstack.env["SSH_KEY_PATH"])
    targets = [(sshd, tmp_path / "copy-a"), (second, tmp_path / "copy-b")]
    jobs = []
    for server, dest in targets:
        r = pstack.post(
            f"/api/gpu-snapshots/{snap_id}/restore",
            json={"ssh_host": server.host, "ssh_port": server.port, "workspace_path": str(dest)},
        )
        assert r.status_code == 202, r.text  # the second is not refused while the first runs
        jobs.append(r.json()["job"]["id"])
    # Both were running at once at some point (the worker has two threads).
    deadline, both = time.monotonic() + 60, False
    while not both and time.monotonic() < deadline:
        states = [pstack.get(f"/api/jobs/{j}").json() for j in jobs]
        both = all(s["status"] == "running" for s in states)
        if all(s["status"] not in ("queued", "running") for s in states):
            break
        time.sleep(0.02)
    finished = [pstack.wait_job(j) for j in jobs]
    assert [j["status"] for j in finished] == ["succeeded", "succeeded"], finished
    for _server, dest in targets:
        assert (dest / "data.bin").read_bytes() == b"x" * 300_000
    starts = sorted(j["started_at"] for j in finished)
    ends = sorted(j["finished_at"] for j in finished)
    assert both or starts[1] < ends[0], "the two restores ran one after the other"


def test_a_login_after_the_idle_decision_stops_the_destroy(pstack, sshd, fake_vast, box, gpus):  # type: ignore[no-untyped-def]
    """Outside tester's repro: the idle samples are checked when the action starts, but hibernate then
    snapshots and verifies (minutes on a big workspace) before it destroys. Someone who logs in
    meanwhile lost the instance under their shell, and whatever they wrote since the snapshot. An idle
    policy's hibernate now asks the host again right before the destroy (`no_longer_idle`)."""
    _snapshot(pstack, box["id"], sshd, box["workspace"])
    r = pstack.http.put(
        f"{pstack.url}/api/instances/{box['id']}/policy",
        timeout=10,
        json={
            "workspace_path": str(box["workspace"]),
            "idle": {"gpu_util_below": 5, "for_s": 2, "sample_every_s": 1, "action": "hibernate"},
        },
    )
    assert r.status_code == 200, r.text
    gpus.read(0, 0)
    pstack.stop_worker()  # the hibernate job waits while the person logs in
    actions = [a for rep in Ticker(pstack).run(4) for a in rep["actions"]]
    assert len(actions) == 1 and "job_id" in actions[0], actions
    client, channel = _interactive_session(sshd)
    try:
        pstack.start_worker()
        job = pstack.wait_job(actions[0]["job_id"], timeout=120)
    finally:
        channel.close()
        client.close()
    assert job["status"] == "failed" and job["error"]["code"] == "no_longer_idle", job
    assert int(box["id"]) in [i["id"] for i in fake_vast.live_instances()]  # nothing destroyed
    machine = pstack.get(f"/api/instances/{box['id']}").json()
    assert machine["status"] == "running"
    assert pstack.get(f"/api/gpu-snapshots/{job['snapshot_id']}").json()["status"] == "complete"  # kept
