"""Hibernate and wake end to end: the fake vast.ai API rents "instances" that are the loopback sshd,
SeaweedFS holds the snapshots, a real worker process runs the jobs. Asserted on the fake's state: what
was destroyed, what is left running."""

from __future__ import annotations

import os
import shutil
import time

import pytest

from src.adapters.vast import VastClient
from src.jobs.wake import rental_label
from tests.support.trees import describe_tree, make_tricky_tree

pytestmark = pytest.mark.slow


@pytest.fixture
def box(fake_vast, stack, tmp_path):  # type: ignore[no-untyped-def]
    """A running vast.ai instance (the user's, rented before gpusnap knew it) with a workspace."""
    client = VastClient(fake_vast.api_key, fake_vast.base_url, backoff_base=0.01)  # outlasts the fake's 429s
    instance_id = client.create_instance(1001, image="pytorch/pytorch:latest", disk_gb=50, label="my-box")
    while not client.show_instance(instance_id).is_running:
        pass
    workspace = make_tricky_tree(tmp_path / "workspace")
    return {"id": instance_id, "workspace": workspace, "tree": describe_tree(workspace)}


def _ours(fake_vast) -> list[dict]:  # type: ignore[no-untyped-def]
    """Instances gpusnap rented that are still alive."""
    return [i for i in fake_vast.live_instances() if (i.get("label") or "").startswith("gpusnap:")]


def _hibernate(stack, box, **extra):  # type: ignore[no-untyped-def]
    r = stack.post(f"/api/instances/{box['id']}/hibernate", json={"workspace_path": str(box["workspace"]), **extra})
    assert r.status_code == 202, r.text
    return r.json()["job"]


def test_hibernate_then_wake_restores_same_machine(stack, fake_vast, box):
    job = stack.wait_job(_hibernate(stack, box)["id"])
    assert job["status"] == "succeeded", job
    assert fake_vast.instance(box["id"]) is None or box["id"] not in [i["id"] for i in fake_vast.live_instances()]
    machine = stack.get(f"/api/instances/{box['id']}").json()
    assert machine["status"] == "hibernated" and machine["vast_instance_id"] is None
    snap = stack.get(f"/api/gpu-snapshots/{job['result']['snapshot_id']}").json()
    assert snap["status"] == "complete"

    shutil.rmtree(box["workspace"])  # the rented disk is gone with the instance
    # Stay hibernated for a second: costs give hours to 4 decimals (0.36 s), and a wake asked for at once
    # would leave the hibernated time below what the costs below can show.
    time.sleep(1.0)
    r = stack.post(f"/api/instances/{box['id']}/wake", json={"gpu_type": "RTX 4090", "region": "us"})
    assert r.status_code == 202, r.text
    woke = stack.wait_job(r.json()["job"]["id"])
    assert woke["status"] == "succeeded", woke
    assert describe_tree(box["workspace"]) == box["tree"]
    machine = stack.get(f"/api/instances/{box['id']}").json()
    assert machine["id"] == str(box["id"]) and machine["status"] == "running"
    assert machine["vast_instance_id"] == woke["result"]["instance_id"] != box["id"]
    assert [i["id"] for i in _ours(fake_vast)] == [machine["vast_instance_id"]]
    created = fake_vast.create_body(machine["vast_instance_id"])
    assert created["label"] == rental_label(str(box["id"]), woke["id"], 1, 0) and created["disk"] >= 21
    kinds = [e["kind"] for e in machine["events"]]
    assert kinds.index("hibernated") < kinds.index("woke")
    # Costs: the hibernated time is priced at the destroyed instance's $0.40/h (offer 1001, recorded when
    # hibernate destroyed it); the machine now shows the rented offer's price and transfer prices.
    costs = machine["costs"]
    assert costs["hourly_usd"] == woke["result"]["dph_total"]
    assert costs["transfer_usd_per_gb"] == {"upload": 0.002, "download": 0.001}
    assert costs["hours"]["hibernated"] > 0 and costs["stored_bytes"] == snap["stored_bytes"]
    assert costs["saved_usd"] == pytest.approx(costs["hours"]["hibernated"] * 0.40, abs=1e-3)
    # The machine answers to its new vast.ai id too.
    assert stack.get(f"/api/instances/{machine['vast_instance_id']}").json()["id"] == str(box["id"])


def test_snapshot_failure_never_destroys_the_instance(stack, fake_vast, box, tmp_path):
    r = stack.post(f"/api/instances/{box['id']}/hibernate", json={"workspace_path": str(tmp_path / "missing")})
    job = stack.wait_job(r.json()["job"]["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "workspace_not_found", job
    assert fake_vast.calls_to("DELETE") == []
    assert fake_vast.instance(box["id"])["actual_status"] == "running"
    machine = stack.get(f"/api/instances/{box['id']}").json()
    assert machine["status"] == "running" and machine["vast_instance_id"] == box["id"]


def test_destroy_failures_are_retried_until_confirmed(stack, fake_vast, box):
    fake_vast.fail_next_destroys(2)
    fake_vast.linger_after_destroy(gets=2)
    job = stack.wait_job(_hibernate(stack, box)["id"])
    assert job["status"] == "succeeded", job
    assert len(fake_vast.calls_to("DELETE", f"/api/v0/instances/{box['id']}/")) >= 3
    assert box["id"] not in [i["id"] for i in fake_vast.live_instances()]


def test_worker_killed_between_verify_and_destroy_destroys_exactly_once(stack, fake_vast, box):
    stack.stop_worker()
    worker = stack.start_worker(GPUSNAP_FAILPOINTS="hibernate.after_verify")
    job = _hibernate(stack, box)
    assert worker.wait(timeout=120) == 137  # died at the failpoint, as if killed
    assert stack.get(f"/api/jobs/{job['id']}").json()["status"] == "running"
    assert fake_vast.calls_to("DELETE") == []
    stack.start_worker()  # recovers the job left by the dead worker
    done = stack.wait_job(job["id"])
    assert done["status"] == "succeeded" and done["attempts"] == 2, done
    assert len(fake_vast.calls_to("DELETE", f"/api/v0/instances/{box['id']}/")) == 1
    assert stack.get(f"/api/instances/{box['id']}").json()["status"] == "hibernated"


def test_wake_skips_a_host_that_never_becomes_ready(stack, fake_vast, box):
    assert stack.wait_job(_hibernate(stack, box)["id"])["status"] == "succeeded"
    fake_vast.stay_loading(next_n=1)
    r = stack.post(f"/api/instances/{box['id']}/wake", json={"gpu_type": "RTX 4090"})
    job = stack.wait_job(r.json()["job"]["id"])
    assert job["status"] == "succeeded", job
    rented = [c for c in fake_vast.calls_to("PUT", "/api/v0/asks/") if c.json["label"].startswith("gpusnap:")]
    assert len(rented) == 2 and rented[0].path != rented[1].path  # the next offer was used
    assert [i["id"] for i in _ours(fake_vast)] == [job["result"]["instance_id"]]


def test_wake_with_no_fitting_offer_rents_nothing(stack, fake_vast, box):
    assert stack.wait_job(_hibernate(stack, box)["id"])["status"] == "succeeded"
    r = stack.post(f"/api/instances/{box['id']}/wake", json={"max_price": 0.01})
    job = stack.wait_job(r.json()["job"]["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "no_offer", job
    assert [c for c in fake_vast.calls_to("PUT", "/api/v0/asks/") if c.json["label"] != "my-box"] == []
    assert stack.get(f"/api/instances/{box['id']}").json()["status"] == "hibernated"


def test_failed_wakes_leave_no_instance_behind(stack, fake_vast, box):
    assert stack.wait_job(_hibernate(stack, box)["id"])["status"] == "succeeded"
    # Every offer fails: one create errors but leaves a contract, the others never become ready.
    fake_vast.fail_next_creates(1, mode="http_500")
    fake_vast.fail_start("exited", next_n=5)
    r = stack.post(f"/api/instances/{box['id']}/wake", json={})
    job = stack.wait_job(r.json()["job"]["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "no_ready_offer", job
    assert _ours(fake_vast) == []
    assert fake_vast.calls_to("PUT", "/api/v0/asks/")  # it did try
    snap_id = stack.get(f"/api/instances/{box['id']}").json()["last_snapshot_id"]
    assert stack.get(f"/api/gpu-snapshots/{snap_id}").json()["status"] == "complete"
    machine = stack.get(f"/api/instances/{box['id']}").json()
    assert machine["status"] == "hibernated"


def test_wake_failing_after_rent_destroys_the_new_instance(stack, fake_vast, box, s3_server):
    assert stack.wait_job(_hibernate(stack, box)["id"])["status"] == "succeeded"
    # The restore cannot succeed: the workspace path's parent does not exist on the host.
    os.makedirs(box["workspace"], exist_ok=True)
    r = stack.post(f"/api/instances/{box['id']}/wake", json={"workspace_path": "/gpusnap-no-such-parent/ws"})
    job = stack.wait_job(r.json()["job"]["id"])
    assert job["status"] == "failed", job
    assert _ours(fake_vast) == []
    assert stack.get(f"/api/instances/{box['id']}").json()["status"] == "hibernated"


def test_pause_and_resume(stack, fake_vast, box):
    r = stack.post(
        f"/api/instances/{box['id']}/hibernate", json={"workspace_path": str(box["workspace"]), "destroy_after": False}
    )
    assert stack.wait_job(r.json()["job"]["id"])["status"] == "succeeded"
    assert fake_vast.instance(box["id"])["actual_status"] == "running"
    r = stack.post(f"/api/instances/{box['id']}/pause")
    assert stack.wait_job(r.json()["job"]["id"])["status"] == "succeeded"
    assert fake_vast.instance(box["id"])["actual_status"] == "stopped"
    assert stack.get(f"/api/instances/{box['id']}").json()["status"] == "paused"
    assert stack.post(f"/api/instances/{box['id']}/pause").status_code == 409
    r = stack.post(f"/api/instances/{box['id']}/resume")
    assert stack.wait_job(r.json()["job"]["id"])["status"] == "succeeded"
    assert stack.get(f"/api/instances/{box['id']}").json()["status"] == "running"


def test_jupyter_box_hibernates_through_the_proxy_and_wakes_on_direct_ssh(stack, fake_vast, tmp_path):
    """A user's box rented with a Jupyter runtype is reached through vast.ai's proxy on `ssh_port + 1`
    (the fake's `ssh_port` itself is dead); the wake rents `ssh_direct` on a host with direct ports and
    reaches the new instance on its direct mapping (its proxy endpoint is dead)."""
    client = VastClient(fake_vast.api_key, fake_vast.base_url, backoff_base=0.01)
    instance_id = client.create_instance(
        1001, image="pytorch/pytorch:latest", disk_gb=50, label="my-notebook", runtype="jupyter"
    )
    while not client.show_instance(instance_id).is_running:
        pass
    workspace = make_tricky_tree(tmp_path / "workspace")
    tree = describe_tree(workspace)
    r = stack.post(f"/api/instances/{instance_id}/hibernate", json={"workspace_path": str(workspace)})
    assert stack.wait_job(r.json()["job"]["id"])["status"] == "succeeded"
    shutil.rmtree(workspace)
    r = stack.post(f"/api/instances/{instance_id}/wake", json={"gpu_type": "RTX 4090"})
    woke = stack.wait_job(r.json()["job"]["id"])
    assert woke["status"] == "succeeded", woke
    assert describe_tree(workspace) == tree
    new = fake_vast.instance(woke["result"]["instance_id"])
    assert woke["result"]["ssh_port"] == int(new["ports"]["22/tcp"][0]["HostPort"]) != new["ssh_port"]
    assert fake_vast.create_body(new["id"])["runtype"] == "ssh_direct"
    searches = [c for c in fake_vast.calls_to("POST", "/api/v0/bundles/") if c.status == 200]
    assert searches[-1].json["direct_port_count"] == {"gte": 1}
