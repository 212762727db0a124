"""A wake whose worker died (kill -9) after renting, and that recovery will not run again (the user
cancelled it meanwhile, or no attempts are left), still destroys what it rented: recovery gives it one
cleanup run (`JobKind.cleans_up`) before it ends `cancelled` / `failed interrupted`. Found by an outside
tester: before, the rental stayed alive and billing. README: "a wake cancelled before the hand-over
destroys the instance it rented"."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.e2e.test_cancel_and_stale_attempts import _hibernate, _wait_row, box  # noqa: F401
from tests.support.test_worker import WorkerProcess

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("variant", ["cancel", "max_attempts"])
def test_an_abandoned_wake_destroys_its_rental(stack, fake_vast, box, tmp_path, variant):  # noqa: F811
    assert stack.wait_job(_hibernate(stack, box)["id"])["status"] == "succeeded"
    shutil.rmtree(box["workspace"])
    stack.stop_worker()
    env = {
        **stack.env,
        "JOB_STALE_AFTER_S": "5",
        "VAST_READY_DEADLINE_S": "120",
        "TEST_WORKER_KINDS": "all",
        "JOB_MAX_ATTEMPTS": "1" if variant == "max_attempts" else "3",
    }
    first = WorkerProcess(env, tmp_path, "first").start()
    second = WorkerProcess(env, tmp_path, "second")
    try:
        first.wait_ready()
        fake_vast.stay_loading(next_n=1)  # the rental takes its time to boot
        r = stack.post(f"/api/instances/{box['id']}/wake", json={"gpu_type": "RTX 4090"})
        assert r.status_code == 202, r.text
        job_id = r.json()["job"]["id"]
        row = _wait_row(stack, job_id, lambda j: j.phase == "wait_running" and j.attempts == 1)
        rented = row.state["instance_id"]
        first.kill()  # the worker crashes
        if variant == "cancel":
            r = stack.post(f"/api/jobs/{job_id}/cancel")
            assert r.status_code == 202, r.text  # accepted: "final", and the rental should be destroyed
        time.sleep(6.5)
        second.start().wait_ready()  # recovery
        done = stack.wait_job(job_id, timeout=60)
        assert done["status"] == ("cancelled" if variant == "cancel" else "failed"), done
        time.sleep(5)
        live = [i["id"] for i in fake_vast.live_instances()]
        assert rented not in live, f"instance {rented} rented by the cancelled wake is still alive (and billing)"
    finally:
        first.kill()
        second.stop()
