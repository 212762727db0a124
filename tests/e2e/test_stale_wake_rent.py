"""A wake attempt frozen between its ownership check and the vast.ai rent call (or whose rent request is
slow to be acted on) rents after its successor's last sweep. When it thaws it finds the job lost, and
destroys what carries its own attempt's label before it stops: nothing leaks. (Found by an outside
tester: the instance used to stay alive, billing, owned by nobody.)"""

from __future__ import annotations

import shutil
import time

import pytest

from tests.e2e.test_cancel_and_stale_attempts import _hibernate, _label_attempt, _wait_row, box  # noqa: F401
from tests.support.test_worker import WorkerProcess

pytestmark = pytest.mark.slow


def test_frozen_wake_attempt_rents_after_successor_finished_and_leaks(stack, fake_vast, box, tmp_path):  # noqa: F811
    assert stack.wait_job(_hibernate(stack, box)["id"])["status"] == "succeeded"
    shutil.rmtree(box["workspace"])
    stack.stop_worker()
    env = {**stack.env, "JOB_STALE_AFTER_S": "5", "VAST_READY_DEADLINE_S": "120", "TEST_WORKER_KINDS": "all"}
    frozen = WorkerProcess(env, tmp_path, "frozen").start()
    successor = WorkerProcess(env, tmp_path, "successor")
    try:
        frozen.wait_ready()
        # attempt 1's rent request is slow to be acted on (vast.ai / network latency), the worker freezes
        fake_vast.slow_next(1, seconds=25, method="PUT", path_prefix="/api/v0/asks/")
        r = stack.post(f"/api/instances/{box['id']}/wake", json={"gpu_type": "RTX 4090"})
        assert r.status_code == 202, r.text
        job_id = r.json()["job"]["id"]
        _wait_row(stack, job_id, lambda j: j.phase == "rent" and j.attempts == 1)
        time.sleep(1.0)  # the PUT is in flight
        frozen.freeze()
        time.sleep(6.5)
        successor.start().wait_ready()
        done = stack.wait_job(job_id, timeout=120)
        assert done["status"] == "succeeded" and done["attempts"] == 2, (done, successor.log_tail())
        new_instance = done["result"]["instance_id"]
        # wait for the stale rent to land at vast.ai (after the successor's final sweep and hand-over)
        deadline = time.monotonic() + 40
        while not [
            c
            for c in fake_vast.calls_to("PUT", "/api/v0/asks/")
            if c.json["label"].startswith("gpusnap:") and _label_attempt(c.json["label"]) == 1
        ]:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        frozen.thaw()
        deadline = time.monotonic() + 30
        while "taken over by another worker" not in frozen.log_tail(20000):
            assert time.monotonic() < deadline, frozen.log_tail()
            time.sleep(0.1)
        time.sleep(2.0)
        live = fake_vast.live_instances()
        leaked = [i for i in live if i["id"] != new_instance and i["id"] != box["id"]]
        print("LIVE", [(i["id"], i.get("label")) for i in live], "NEW", new_instance)
        print("FROZEN LOG", frozen.log_tail(3000))
        assert leaked == [], f"leaked instances (nobody will ever destroy them): {leaked}"
    finally:
        frozen.thaw()
        frozen.stop()
        successor.stop()
