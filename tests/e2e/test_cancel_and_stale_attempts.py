"""Faults end in the truth, end to end (real worker processes, SeaweedFS, the loopback sshd as the GPU
host, the fake vast.ai API):

- a cancel accepted while hibernate verifies against a slow bucket (HEADs take seconds, through a proxy
  in front of SeaweedFS) is final: the instance is never destroyed, the job ends `cancelled`;
- a cancel after the destroy was sent answers 409 `too_late_to_cancel`, and the job finishes;
- a worker frozen (SIGSTOP) in the middle of a wake past its lease, whose job another worker then
  finishes, does nothing when it thaws: the new instance lives, the machine row stays right."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from typing import Any

import pytest

from src.adapters.vast import VastClient
from src.models import Job
from src.services.jobs import NO_RETURN
from tests.support.fixtures_e2e import Stack
from tests.support.slow_s3_proxy import SlowS3Proxy
from tests.support.test_worker import WorkerProcess
from tests.support.trees import describe_tree, make_tricky_tree

pytestmark = pytest.mark.slow


@pytest.fixture
def box(fake_vast, stack, tmp_path):  # type: ignore[no-untyped-def]
    """A running vast.ai instance (the user's) with a workspace."""
    client = VastClient(fake_vast.api_key, fake_vast.base_url, backoff_base=0.001)
    instance_id = client.create_instance(1001, image="pytorch/pytorch:latest", disk_gb=50, label="my-box")
    while not client.show_instance(instance_id).is_running:
        pass
    workspace = make_tricky_tree(tmp_path / "workspace")
    return {"id": instance_id, "workspace": workspace, "tree": describe_tree(workspace)}


def _hibernate(stack: Stack, box: dict[str, Any]) -> dict[str, Any]:
    r = stack.post(f"/api/instances/{box['id']}/hibernate", json={"workspace_path": str(box["workspace"])})
    assert r.status_code == 202, r.text
    return r.json()["job"]


def _wait_row(stack: Stack, job_id: str, until: Callable[[Job], bool], *, timeout: float = 90) -> Job:
    """The job's row once `until(row)` holds (read from the database: the state is not in the API)."""
    sf = stack.app.extensions["gpusnap"].session_factory
    deadline = time.monotonic() + timeout
    while True:
        with sf() as s:
            row = s.get(Job, job_id)
            s.expunge(row)
        if until(row):
            return row
        assert row.status in ("queued", "running"), (row.status, row.error_code, row.error_message)
        assert time.monotonic() < deadline, f"job {job_id} never got there: {row.phase} {row.state}"
        time.sleep(0.05)


def test_cancel_accepted_while_hibernate_verifies_against_a_slow_bucket_is_final(stack, fake_vast, box, s3_server):
    head_delay = 5.0  # the slow end of what the fault run saw (HEADs of 2-5 s)
    with SlowS3Proxy(s3_server.endpoint, head_delay_s=head_delay) as proxy:
        stack.stop_worker()
        stack.start_worker(R2_ENDPOINT=proxy.endpoint)  # the worker and its remote scripts use the slow bucket
        job = _hibernate(stack, box)
        # Hibernate's own verify step (after the snapshot) has begun, and its HEADs are held by the bucket
        # right now: the handler has looked at the cancel flag for the last time before they answer. (The
        # snapshot step's own check of its upload ends before `snapshot_done` is saved, so a HEAD held after
        # that is the verify's. Counting HEADs instead raced: on a loaded machine all of the verify's HEADs
        # could arrive before the test took its count.)
        _wait_row(stack, job["id"], lambda j: bool((j.state or {}).get("snapshot_done")))
        _wait_row(stack, job["id"], lambda j: proxy.heads_held > 0, timeout=120)
        r = stack.post(f"/api/jobs/{job['id']}/cancel")
        cancelled_at = time.monotonic()
        assert r.status_code == 202, r.text
        assert r.json()["cancel_requested"] is True
        done = stack.wait_job(job["id"])
        stopped_after = time.monotonic() - cancelled_at
    assert done["status"] == "cancelled" and done["error"]["code"] == "cancelled", done
    # The wait for the slow HEADs was interrupted: it did not sit out the bucket.
    assert stopped_after < head_delay, stopped_after
    assert fake_vast.calls_to("DELETE") == []
    assert fake_vast.instance(box["id"])["actual_status"] == "running"
    machine = stack.get(f"/api/instances/{box['id']}").json()
    assert machine["status"] == "running" and machine["vast_instance_id"] == box["id"]
    assert describe_tree(box["workspace"]) == box["tree"]
    with stack.app.extensions["gpusnap"].session_factory() as s:
        state = s.get(Job, job["id"]).state
    assert NO_RETURN not in state and "destroying" not in state


def test_cancel_after_the_destroy_was_sent_is_409_and_the_job_finishes(stack, fake_vast, box):
    fake_vast.slow_next(1, seconds=3, method="DELETE")  # the destroy request takes a while to answer
    job = _hibernate(stack, box)
    _wait_row(stack, job["id"], lambda j: NO_RETURN in (j.state or {}))
    r = stack.post(f"/api/jobs/{job['id']}/cancel")
    assert r.status_code == 409, r.text
    assert r.json()["error"]["code"] == "too_late_to_cancel"
    done = stack.wait_job(job["id"])
    assert done["status"] == "succeeded" and done["cancel_requested"] is False, done
    assert box["id"] not in [i["id"] for i in fake_vast.live_instances()]
    assert stack.get(f"/api/instances/{box['id']}").json()["status"] == "hibernated"


def _label_attempt(label: str) -> int:
    return int(label.split(":")[3])


def test_a_frozen_wake_attempt_does_nothing_after_another_worker_finished_its_job(stack, fake_vast, box, tmp_path):
    assert stack.wait_job(_hibernate(stack, box)["id"])["status"] == "succeeded"
    shutil.rmtree(box["workspace"])  # the rented disk is gone with the instance
    stack.stop_worker()
    env = {**stack.env, "JOB_STALE_AFTER_S": "5", "VAST_READY_DEADLINE_S": "120", "TEST_WORKER_KINDS": "all"}
    frozen = WorkerProcess(env, tmp_path, "frozen").start()
    successor = WorkerProcess(env, tmp_path, "successor")
    try:
        frozen.wait_ready()
        fake_vast.stay_loading(next_n=1)  # the first rental never boots: attempt 1 waits for it
        r = stack.post(f"/api/instances/{box['id']}/wake", json={"gpu_type": "RTX 4090"})
        assert r.status_code == 202, r.text
        job_id = r.json()["job"]["id"]
        row = _wait_row(stack, job_id, lambda j: j.phase == "wait_running" and j.attempts == 1)
        first_instance = row.state["instance_id"]
        frozen.freeze()
        time.sleep(6.5)  # past JOB_STALE_AFTER_S: its lease has run out

        successor.start().wait_ready()  # recovers the job at start and runs attempt 2
        done = stack.wait_job(job_id)
        assert done["status"] == "succeeded" and done["attempts"] == 2, (done, successor.log_tail())
        new_instance = done["result"]["instance_id"]
        label = fake_vast.create_body(new_instance)["label"]
        assert _label_attempt(label) == 2 and len(label) <= 64, label
        assert _label_attempt(fake_vast.create_body(first_instance)["label"]) == 1
        assert first_instance not in [i["id"] for i in fake_vast.live_instances()]  # attempt 2 cleaned it up
        machine_before = stack.get(f"/api/instances/{box['id']}").json()
        calls_before = len(fake_vast.calls)

        frozen.thaw()
        deadline = time.monotonic() + 30
        while "taken over by another worker" not in frozen.log_tail(20000):
            assert time.monotonic() < deadline, frozen.log_tail()
            time.sleep(0.1)
        time.sleep(1.0)  # anything it would still do, it would have done by now

        acted = [(c.method, c.path) for c in fake_vast.calls[calls_before:] if c.method != "GET"]
        assert acted == []  # no destroy, no rent, no label change from the stale attempt
        assert new_instance in [i["id"] for i in fake_vast.running_instances()]
        machine = stack.get(f"/api/instances/{box['id']}").json()
        assert machine["status"] == "running" and machine["vast_instance_id"] == new_instance
        assert machine["events"] == machine_before["events"]  # no row write either
        assert stack.get(f"/api/jobs/{job_id}").json() == done
        assert describe_tree(box["workspace"]) == box["tree"]
    finally:
        frozen.thaw()
        frozen.stop()
        successor.stop()
