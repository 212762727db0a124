"""Hibernate, wake, pause and resume as jobs, in-process: a scripted SSH host (FakeSshClient), an
in-memory bucket, and the fake vast.ai API over real HTTP. The edge cases live here; the e2e tests run
the same flows with the real sshd, scripts and SeaweedFS."""

from __future__ import annotations

import hashlib

import pytest

from src.app import create_app
from src.db import transaction
from src.jobs.wake import rental_label
from src.models import Job
from tests.fakes.fake_object_store import FakeObjectStore
from tests.fakes.fake_remote_host import FakeSshClient
from tests.support.fixtures_app import AUTH, make_settings, run_jobs
from tests.support.snapshots import write_snapshot_objects


class World:
    """The app plus its fakes, and the steps tests repeat."""

    def __init__(self, app, store, ssh, vast, fake_vast) -> None:  # type: ignore[no-untyped-def]
        self.app, self.store, self.ssh, self.vast, self.fake = app, store, ssh, vast, fake_vast
        self.client = app.test_client()

    def rent_box(self) -> int:
        instance_id = self.vast.create_instance(1001, image="img", disk_gb=50, label="my-box")
        while not self.vast.show_instance(instance_id).is_running:
            pass
        return instance_id

    def post(self, path: str, body: dict | None = None, **headers: str):  # type: ignore[no-untyped-def]
        return self.client.post(path, json=body or {}, headers={**AUTH, **headers})

    def job(self, job_id: str) -> dict:
        return self.client.get(f"/api/jobs/{job_id}", headers=AUTH).get_json()

    def machine(self, machine_id: int | str) -> dict:
        return self.client.get(f"/api/instances/{machine_id}", headers=AUTH).get_json()

    def script_snapshot_success(self, snapshot: dict, codec: str = "none") -> None:
        """Make the next `snapshot` script run succeed: objects in the bucket, a matching result event."""
        raw = write_snapshot_objects(
            self.store, snapshot["storage_prefix"], snapshot_id=snapshot["id"], format=snapshot["format"], parts=2
        )
        self.ssh.scripts["snapshot"] = [
            {"event": "started", "pid": 10, "pgid": 10},
            {
                "event": "progress",
                "phase": "upload",
                "bytes_done": 1024,
                "bytes_total": 2048,
                "parts_done": 1,
                "parts_total": 2,
            },
            {
                "event": "result",
                "manifest_sha256": hashlib.sha256(raw).hexdigest(),
                "raw_bytes": 2048,
                "stored_bytes": 2048,
                "parts": 2,
                "files": 1,
                "codec": codec,
                "part_size": 1024,
                "uploaded_parts": 2,
                "skipped_parts": 0,
                "duration_s": 0.1,
                "timings": {},
            },
        ]

    def hibernate(self, instance_id: int, **body) -> dict:  # type: ignore[no-untyped-def]
        r = self.post(f"/api/instances/{instance_id}/hibernate", {"workspace_path": "/workspace", **body})
        assert r.status_code == 202, r.get_json()
        job = r.get_json()["job"]
        snap = self.client.get(f"/api/gpu-snapshots/{job['snapshot_id']}", headers=AUTH).get_json()
        return {"job": job, "snapshot": snap}

    def hibernated_box(self, codec: str = "none") -> int:
        box = self.rent_box()
        started = self.hibernate(box)
        self.script_snapshot_success(started["snapshot"], codec)
        run_jobs(self.app)
        assert self.job(started["job"]["id"])["status"] == "succeeded"
        return box

    def ours(self) -> list[dict]:
        return [i for i in self.fake.live_instances() if (i.get("label") or "").startswith("gpusnap:")]


@pytest.fixture
def world(tmp_path, sqlite_url, fake_vast, vast_client):  # type: ignore[no-untyped-def]
    settings = make_settings(
        tmp_path,
        sqlite_url,
        vast_api_key=fake_vast.api_key,
        vast_api_url=fake_vast.base_url,
        vast_poll_interval_s=0.01,
        vast_ready_deadline_s=1.0,
        vast_destroy_deadline_s=1.0,
        r2_endpoint="http://unused",
        r2_bucket="b",
        r2_access_key="k",
        r2_secret_key="s",
    )
    store, ssh = FakeObjectStore(), FakeSshClient(scripts={"restore": [{"event": "result", "raw_bytes": 2048}]})
    app = create_app(settings, object_store=store, ssh=ssh, vast=vast_client, configure_logs=False)
    yield World(app, store, ssh, vast_client, fake_vast)
    app.extensions["gpusnap"].engine.dispose()


def test_hibernate_snapshots_verifies_then_destroys(world):
    box = world.rent_box()
    started = world.hibernate(box)
    assert world.machine(box)["status"] == "hibernating"
    world.script_snapshot_success(started["snapshot"])
    run_jobs(world.app)
    job = world.job(started["job"]["id"])
    assert job["status"] == "succeeded", job
    assert job["result"]["destroyed_instance_id"] == box
    assert world.fake.instance(box) is None or box not in [i["id"] for i in world.fake.live_instances()]
    machine = world.machine(box)
    assert machine["status"] == "hibernated" and machine["vast_instance_id"] is None
    assert machine["ssh_host"] is None and not machine["host_key_pinned"]
    # The SSH endpoint came from vast.ai, and the script got the bucket credentials on stdin.
    call = next(c for c in world.ssh.script_calls if c.name != "probe_host")
    assert call.target.host == "127.0.0.1" and call.params["s3"]["secret_key"] == "s"


def test_hibernate_with_a_bad_snapshot_never_destroys(world):
    box = world.rent_box()
    started = world.hibernate(box)
    world.ssh.scripts["snapshot"] = [{"event": "error", "code": "disk_full", "message": "no space left"}]
    run_jobs(world.app)
    job = world.job(started["job"]["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "disk_full"
    assert world.fake.calls_to("DELETE") == []
    assert world.machine(box)["status"] == "running"
    snap = world.client.get(f"/api/gpu-snapshots/{started['snapshot']['id']}", headers=AUTH).get_json()
    assert snap["status"] == "failed" and snap["error"]["code"] == "disk_full"


def test_hibernate_when_the_manifest_is_not_in_the_bucket_never_destroys(world):
    box = world.rent_box()
    started = world.hibernate(box)
    world.script_snapshot_success(started["snapshot"])
    world.store.objects.pop(started["snapshot"]["storage_prefix"] + "manifest.json")
    run_jobs(world.app)
    job = world.job(started["job"]["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "manifest_missing"
    assert world.fake.calls_to("DELETE") == []


def test_unconfirmed_destroy_leaves_machine_in_error_and_snapshot_complete(world):
    box = world.rent_box()
    started = world.hibernate(box)
    world.script_snapshot_success(started["snapshot"])
    world.fake.fail_next_destroys(1000)
    run_jobs(world.app)
    job = world.job(started["job"]["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "destroy_unconfirmed"
    assert world.machine(box)["status"] == "error"
    snap = world.client.get(f"/api/gpu-snapshots/{started['snapshot']['id']}", headers=AUTH).get_json()
    assert snap["status"] == "complete"


def test_hibernate_is_idempotent_and_refused_while_busy_or_hibernated(world):
    box = world.rent_box()
    first = world.post(f"/api/instances/{box}/hibernate", {"workspace_path": "/workspace"}, **{"Idempotency-Key": "h1"})
    again = world.post(f"/api/instances/{box}/hibernate", {"workspace_path": "/workspace"}, **{"Idempotency-Key": "h1"})
    assert first.get_json()["job"]["id"] == again.get_json()["job"]["id"]
    busy = world.post(f"/api/instances/{box}/hibernate", {"workspace_path": "/workspace"})
    assert busy.status_code == 409
    world.script_snapshot_success(
        world.client.get(f"/api/gpu-snapshots/{first.get_json()['job']['snapshot_id']}", headers=AUTH).get_json()
    )
    run_jobs(world.app)
    again = world.post(f"/api/instances/{box}/hibernate", {"workspace_path": "/workspace"})
    assert again.status_code == 409 and again.get_json()["error"]["code"] == "machine_hibernated"


def test_hibernate_of_a_plain_host_needs_destroy_after_false(world):
    r = world.post("/api/instances/plain-box/hibernate", {"workspace_path": "/w", "ssh_host": "127.0.0.1"})
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "no_vast_instance"
    r = world.post("/api/instances/unknown-box/hibernate", {"workspace_path": "/w"})
    assert r.status_code == 404


def test_wake_rents_restores_and_keeps_the_machine_id(world):
    box = world.hibernated_box()
    r = world.post(f"/api/instances/{box}/wake", {"gpu_type": "RTX 4090", "region": "eu"})
    assert r.status_code == 202, r.get_json()
    assert world.machine(box)["status"] == "waking"
    run_jobs(world.app)
    job = world.job(r.get_json()["job"]["id"])
    assert job["status"] == "succeeded", job
    machine = world.machine(box)
    assert machine["status"] == "running" and machine["vast_instance_id"] == job["result"]["instance_id"]
    assert world.fake.create_body(machine["vast_instance_id"])["disk"] >= 21
    assert job["result"]["offer_id"] == 1002  # the only 4090 in the EU
    restore = world.ssh.script_calls[-1]
    assert restore.name == "restore" and restore.params["workspace_path"] == "/workspace"
    assert restore.target.pinned_host_key is None  # a new instance is a new host key


def test_wake_refusals(world):
    box = world.rent_box()
    r = world.post(f"/api/instances/{box}/wake")
    assert r.status_code == 404  # never seen by gpusnap
    box = world.hibernated_box()
    r = world.post(f"/api/instances/{box}/wake", {"disk_gb": 1})
    assert r.status_code == 422 and r.get_json()["error"]["code"] == "disk_too_small"
    r = world.post(f"/api/instances/{box}/wake", {"snapshot_id": "snap_missing"})
    assert r.status_code == 404
    assert world.post(f"/api/instances/{box}/wake").status_code == 202
    assert world.post(f"/api/instances/{box}/wake").status_code == 409


def test_wake_failing_restore_destroys_the_new_instance(world):
    box = world.hibernated_box()
    world.ssh.scripts["restore"] = [{"event": "error", "code": "part_corrupt", "message": "part-00001 digest"}]
    r = world.post(f"/api/instances/{box}/wake")
    run_jobs(world.app)
    job = world.job(r.get_json()["job"]["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "part_corrupt"
    assert world.ours() == []
    assert world.machine(box)["status"] == "hibernated"


def test_cancelled_wake_destroys_what_it_rented(world):
    box = world.hibernated_box()
    world.fake.stay_loading(next_n=5)
    r = world.post(f"/api/instances/{box}/wake")
    job_id = r.get_json()["job"]["id"]
    # Cancel lands while the job waits for the instance: the flag is read at the next heartbeat.
    import threading

    timer = threading.Timer(0.3, lambda: world.post(f"/api/jobs/{job_id}/cancel"))
    timer.start()
    run_jobs(world.app)
    timer.join()
    job = world.job(job_id)
    assert job["status"] == "cancelled", job
    assert world.ours() == []
    assert world.machine(box)["status"] == "hibernated"


def test_rerun_after_a_crash_mid_wake_destroys_the_first_rental(world):
    box = world.hibernated_box()
    r = world.post(f"/api/instances/{box}/wake")
    job_id = r.get_json()["job"]["id"]
    # A worker died right after renting: the instance exists, the job row says running with a stale lease.
    orphan = world.vast.create_instance(1001, image="img", disk_gb=30, label=rental_label(str(box), job_id, 1, 0))
    with transaction(world.app.extensions["gpusnap"].session_factory) as s:
        job = s.get(Job, job_id)
        job.status, job.attempts = "running", 1
        import datetime as dt

        job.heartbeat_at = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
    world.app.extensions["gpusnap"].queue.huey.flush()
    assert world.app.extensions["gpusnap"].queue.recover_stale_jobs() == [job_id]
    run_jobs(world.app)
    job = world.job(job_id)
    assert job["status"] == "succeeded" and job["attempts"] == 2
    assert orphan not in [i["id"] for i in world.fake.live_instances()]
    assert [i["id"] for i in world.ours()] == [job["result"]["instance_id"]]


def test_pause_resume_and_gpu_taken(world):
    box = world.rent_box()
    started = world.hibernate(box, destroy_after=False)
    world.script_snapshot_success(started["snapshot"])
    run_jobs(world.app)
    assert world.machine(box)["status"] == "running"
    assert world.post(f"/api/instances/{box}/resume").status_code == 409
    r = world.post(f"/api/instances/{box}/pause")
    run_jobs(world.app)
    assert world.job(r.get_json()["job"]["id"])["status"] == "succeeded"
    assert world.machine(box)["status"] == "paused"
    world.fake.fail_next(1, status=400, method="PUT", path_prefix=f"/api/v0/instances/{box}/")
    r = world.post(f"/api/instances/{box}/resume")
    run_jobs(world.app)
    assert world.job(r.get_json()["job"]["id"])["status"] == "failed"
    assert world.machine(box)["status"] == "paused"
    r = world.post(f"/api/instances/{box}/resume")
    run_jobs(world.app)
    assert world.job(r.get_json()["job"]["id"])["status"] == "succeeded"
    assert world.machine(box)["status"] == "running"


class _CancelDuringRestore(FakeSshClient):
    """The scripted host, plus a cancel of the job posted the moment the restore script is started: the
    cancel is accepted (202) while the wake's last step runs, before the hand-over."""

    def __init__(self, on_restore, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kwargs)
        self.on_restore = on_restore

    def open(self, target, **kwargs):  # type: ignore[no-untyped-def]
        session = super().open(target, **kwargs)
        run_script = session.run_script

        def run_script_then_cancel(name, params, **kw):  # type: ignore[no-untyped-def]
            if name == "restore":
                self.on_restore()
            return run_script(name, params, **kw)

        session.run_script = run_script_then_cancel  # type: ignore[method-assign]
        return session


def test_a_cancel_accepted_before_the_wake_hand_over_destroys_the_new_instance(world):
    box = world.hibernated_box()
    answers = []
    world.app.extensions["gpusnap"].ssh_override = _CancelDuringRestore(
        lambda: answers.append(world.post(f"/api/jobs/{job_id}/cancel").status_code),
        scripts={"restore": [{"event": "result", "raw_bytes": 2048}]},
    )
    job_id = world.post(f"/api/instances/{box}/wake").get_json()["job"]["id"]
    run_jobs(world.app)
    job = world.job(job_id)
    assert answers == [202]
    assert job["status"] == "cancelled", job
    assert world.ours() == []  # the instance rented for the wake was destroyed
    machine = world.machine(box)
    assert machine["status"] == "hibernated" and machine["vast_instance_id"] is None


@pytest.mark.parametrize("machine_id", ["7", "x" * 128, "host:2222", "[2001:db8::1]:22", "ünï cødé\u200b:1"])
def test_rental_labels_fit_vast_and_name_the_attempt(machine_id):
    job_id = "job_01m8rrtfqh82npczxwagzch255"
    label = rental_label(machine_id, job_id, 12, 3)
    assert len(label) <= 64 and label.isascii() and label.endswith(f":{job_id}:12:3")
    assert label != rental_label(machine_id, job_id, 1, 3) != rental_label(machine_id + "x", job_id, 12, 3)


def test_pause_and_resume_record_their_point_of_no_return_before_calling_vast(world):
    box = world.rent_box()
    started = world.hibernate(box, destroy_after=False)
    world.script_snapshot_success(started["snapshot"])
    run_jobs(world.app)
    job_id = world.post(f"/api/instances/{box}/pause").get_json()["job"]["id"]
    run_jobs(world.app)
    with world.app.extensions["gpusnap"].session_factory() as s:
        assert s.get(Job, job_id).state["no_return"]["step"] == "stop"
    assert world.fake.instance(box)["actual_status"] in ("stopped", "exited")


def test_resume_when_gpus_are_taken_cancels_the_queued_start(world):
    """vast.ai answers a start it cannot do now with `resources_unavailable` and queues it; left alone the
    instance would start (and bill) later. The resume fails `gpu_unavailable` and the queue is emptied."""
    import time

    box = world.rent_box()
    started = world.hibernate(box, destroy_after=False)
    world.script_snapshot_success(started["snapshot"])
    run_jobs(world.app)
    r = world.post(f"/api/instances/{box}/pause")
    run_jobs(world.app)
    assert world.machine(box)["status"] == "paused"
    world.fake.take_gpus(box, free_after_s=0.5)
    r = world.post(f"/api/instances/{box}/resume")
    run_jobs(world.app)
    job = world.job(r.get_json()["job"]["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "gpu_unavailable", job
    assert world.machine(box)["status"] == "paused"
    assert world.fake.instance(box)["intended_status"] == "stopped"
    time.sleep(0.6)  # the GPUs free up: a start still queued would run now
    assert world.fake.instance(box)["actual_status"] == "stopped"
    puts = [c.json for c in world.fake.calls_to("PUT", f"/api/v0/instances/{box}/") if c.status == 200]
    assert puts[-2:] == [{"state": "running"}, {"state": "stopped"}]


def test_verify_refuses_a_manifest_larger_than_the_cap_without_reading_it(world, monkeypatch):
    """The bucket is not ours to trust: a manifest past MAX_MANIFEST_BYTES (256 MiB, as on the host) fails
    `manifest_too_large` instead of being read into the control plane's memory."""
    import src.jobs.storage_jobs as storage_jobs

    box = world.rent_box()
    started = world.hibernate(box, destroy_after=False)
    world.script_snapshot_success(started["snapshot"])
    run_jobs(world.app)
    snap = started["snapshot"]
    monkeypatch.setattr(storage_jobs, "MAX_MANIFEST_BYTES", 4096)  # 256 MiB of test data would be slow
    world.store.objects[snap["storage_prefix"] + "manifest.json"] = b" " * 4097
    r = world.post(f"/api/gpu-snapshots/{snap['id']}/verify")
    run_jobs(world.app)
    job = world.job(r.get_json()["job"]["id"])
    assert job["status"] == "failed" and job["error"]["code"] == "manifest_too_large", job
    assert world.client.get(f"/api/gpu-snapshots/{snap['id']}", headers=AUTH).get_json()["status"] == "failed"


def test_wake_moves_on_when_an_offer_is_gone_and_only_rents_hosts_with_direct_ports(world):
    box = world.hibernated_box()
    world.fake.offer_gone(1002)  # the cheapest fitting 4090: taken between search and rent (410)
    r = world.post(f"/api/instances/{box}/wake", {"gpu_type": "RTX 4090"})
    run_jobs(world.app)
    job = world.job(r.get_json()["job"]["id"])
    assert job["status"] == "succeeded" and job["result"]["offer_id"] == 1001, job
    gone = [c for c in world.fake.calls_to("PUT", "/api/v0/asks/1002/")]
    assert [c.status for c in gone if c.status != 429] == [410]
    search = [c for c in world.fake.calls_to("POST", "/api/v0/bundles/") if c.status == 200][-1]
    assert search.json["direct_port_count"] == {"gte": 1} and search.json["type"] == "on-demand"
    assert world.fake.create_body(job["result"]["instance_id"])["runtype"] == "ssh_direct"
    assert world.ours() == [world.fake.instance(job["result"]["instance_id"])]


def test_a_gpu_only_snapshot_wakes_only_on_a_host_that_can_decode_it(world):
    from tests.fakes.fake_vast_market import default_offers

    box = world.hibernated_box(codec="nvcomp-ans")
    snap = world.client.get(f"/api/gpu-snapshots/{world.machine(box)['last_snapshot_id']}", headers=AUTH).get_json()
    assert snap["codec"] == "nvcomp-ans" and snap["requires_gpu"] is True
    old_driver = [dict(o, cuda_max_good=11.8) if o["id"] == 1002 else o for o in default_offers()]
    world.fake.set_offers(old_driver)  # the cheapest 4090 runs CUDA 11.8: nvCOMP 6 cannot run there
    r = world.post(f"/api/instances/{box}/wake", {"gpu_type": "RTX 4090"})
    run_jobs(world.app)
    job = world.job(r.get_json()["job"]["id"])
    assert job["status"] == "succeeded" and job["result"]["offer_id"] == 1001, job
    search = [c for c in world.fake.calls_to("POST", "/api/v0/bundles/") if c.status == 200][-1]
    assert search.json["cuda_max_good"] == {"gte": 12.0}


def test_a_gpu_only_snapshot_rents_nothing_when_no_host_can_decode_it(world):
    from tests.fakes.fake_vast_market import default_offers

    box = world.hibernated_box(codec="nvcomp-ans")
    world.fake.set_offers([dict(o, cuda_max_good=11.8) for o in default_offers()])
    rented_before = len(world.fake.calls_to("PUT", "/api/v0/asks/"))
    assert rented_before >= 1  # the box itself was rented through the fake
    r = world.post(f"/api/instances/{box}/wake")
    run_jobs(world.app)
    job = world.job(r.get_json()["job"]["id"])
    assert (
        job["status"] == "failed" and job["error"]["code"] == "no_offer" and "min_cuda=12.0" in job["error"]["message"]
    )
    assert len(world.fake.calls_to("PUT", "/api/v0/asks/")) == rented_before and world.ours() == []
    assert world.machine(box)["status"] == "hibernated"
