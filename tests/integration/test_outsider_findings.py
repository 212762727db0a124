"""What outside testers broke, kept broken-proof: each test reproduces a reported finding against the
app in-process with the strict fake vast.ai and the fake object store (tests/integration/test_machine_jobs
has the `world` these run in)."""

from __future__ import annotations

from tests.integration.test_machine_jobs import world  # noqa: F401  (fixture)
from tests.support.fixtures_app import AUTH, make_settings, run_jobs
from tests.support.snapshots import data_keys


def test_the_only_copy_stays_protected_after_a_verify_that_failed_once(world):  # noqa: F811
    """A part briefly missing fails one verify and marks the snapshot `failed`; it is still the hibernated
    machine's workspace, so a DELETE without force stays a 409."""
    box = world.hibernated_box()
    snap = world.client.get(f"/api/gpu-snapshots?instance_id={box}", headers=AUTH).get_json()["items"][0]
    part = data_keys(world.store, snap)[1]
    saved = world.store.objects.pop(part)
    v = world.post(f"/api/gpu-snapshots/{snap['id']}/verify", {})
    run_jobs(world.app)
    assert world.job(v.get_json()["job"]["id"])["error"]["code"] == "part_missing"
    world.store.objects[part] = saved
    r = world.client.delete(f"/api/gpu-snapshots/{snap['id']}", headers=AUTH)
    assert r.status_code == 409 and r.get_json()["error"]["code"] == "snapshot_needed", r.get_json()
    assert world.store.objects.get(part) == saved


def test_a_destroyed_instance_shown_as_unloaded_counts_as_destroyed(world):  # noqa: F811
    """vast.ai may go on listing a destroyed instance with `cur_state: unloaded` ("released on destroy",
    its show-instance reference): that is a confirmed destroy, not `destroy_unconfirmed`."""
    box = world.rent_box()
    world.fake.linger_after_destroy(gets=50, unloaded=True)
    started = world.hibernate(box)
    world.script_snapshot_success(started["snapshot"])
    run_jobs(world.app)
    job = world.job(started["job"]["id"])
    assert job["status"] == "succeeded", job
    assert world.machine(box)["status"] == "hibernated"


def test_a_resume_whose_start_never_ran_takes_the_start_back(world):  # noqa: F811
    """vast.ai accepts the start but the instance sits in "scheduling" (vast-ai/docs
    cli/reference/start-instance.mdx): the resume fails, and nothing stays queued to start (and bill) later."""
    box = world.rent_box()
    started = world.hibernate(box, destroy_after=False)
    world.script_snapshot_success(started["snapshot"])
    run_jobs(world.app)
    world.post(f"/api/instances/{box}/pause")
    run_jobs(world.app)
    market = world.fake
    original = market.answer_update

    def scheduling(iid, body):  # type: ignore[no-untyped-def]
        if isinstance(body, dict) and body.get("state") == "running":
            market._instances[iid].update(intended_status="running", status_msg="scheduling")
            return 200, {"success": True}
        return original(iid, body)

    market.answer_update = scheduling  # type: ignore[method-assign]
    r = world.post(f"/api/instances/{box}/resume")
    run_jobs(world.app)
    job = world.job(r.get_json()["job"]["id"])
    assert job["status"] == "failed" and world.machine(box)["status"] == "paused", job
    assert world.fake.instance(box)["intended_status"] == "stopped"


def test_the_first_wake_of_a_machine_we_did_not_rent_keeps_its_gpus_and_image(world):  # noqa: F811
    box = world.vast.create_instance(1005, image="my/cuda-image", disk_gb=50, label="my-a100-box")
    while not world.vast.show_instance(box).is_running:
        pass
    started = world.hibernate(box)
    world.script_snapshot_success(started["snapshot"])
    run_jobs(world.app)
    assert world.machine(box)["status"] == "hibernated"
    world.post(f"/api/instances/{box}/wake")
    run_jobs(world.app)
    search = [c.json for c in world.fake.calls_to("POST", "/api/v0/bundles/") if c.status == 200][-1]
    rent = [
        c.json for c in world.fake.calls if c.method == "PUT" and c.path.startswith("/api/v0/asks/") and c.status == 200
    ][-1]
    assert (search.get("gpu_name"), search["num_gpus"], rent["image"]) == (
        {"eq": "A100 SXM4"},
        {"eq": 2},
        "my/cuda-image",
    )


def _app(tmp_path, sqlite_url):  # type: ignore[no-untyped-def]
    from src.app import create_app
    from tests.fakes.fake_object_store import FakeObjectStore

    return create_app(make_settings(tmp_path, sqlite_url), object_store=FakeObjectStore(), configure_logs=False)


def test_openapi_lists_the_503_not_configured_answers(tmp_path, sqlite_url):
    doc = _app(tmp_path, sqlite_url).test_client().get("/api/openapi.json").get_json()
    missing = [
        f"{m.upper()} {p}"
        for p, ops in doc["paths"].items()
        for m, op in ops.items()
        if (p.startswith("/api/gpu-snapshots") and m in ("post", "delete") or p.endswith("/hibernate"))
        and "503" not in op.get("responses", {})
    ]
    assert missing == []


def test_an_unknown_machine_status_filter_is_refused_like_the_other_lists(tmp_path, sqlite_url):
    c = _app(tmp_path, sqlite_url).test_client()
    for path in ("/api/jobs", "/api/gpu-snapshots", "/api/instances"):
        assert c.get(f"{path}?status=bogus", headers=AUTH).status_code == 400, path
    assert c.get("/api/instances?status=hibernated", headers=AUTH).status_code == 200


def test_a_restore_naming_the_machine_by_its_vast_id_waits_for_the_machines_own_job(world):  # noqa: F811
    """After a wake the machine answers to its new vast.ai id too; a restore or snapshot naming that id is
    the same machine, so it gets 409 while the machine's hibernate holds it (not a second machine row)."""
    box = world.hibernated_box()
    r = world.post(f"/api/instances/{box}/wake", {"gpu_type": "RTX 4090", "region": "eu"})
    run_jobs(world.app)
    new_vast = world.job(r.get_json()["job"]["id"])["result"]["instance_id"]
    machine = world.machine(box)
    assert world.post(f"/api/instances/{box}/hibernate", {"workspace_path": "/workspace"}).status_code == 202
    older = world.client.get(f"/api/gpu-snapshots?instance_id={box}&status=complete", headers=AUTH).get_json()["items"][
        0
    ]["id"]
    rest = world.post(
        f"/api/gpu-snapshots/{older}/restore",
        {
            "ssh_host": machine["ssh_host"],
            "ssh_port": machine["ssh_port"],
            "workspace_path": "/workspace",
            "instance_id": str(new_vast),
            "overwrite": True,
        },
    )
    assert rest.status_code == 409, rest.get_json()
    snap = world.post(
        "/api/gpu-snapshots",
        {
            "instance_id": str(new_vast),
            "ssh_host": machine["ssh_host"],
            "ssh_port": machine["ssh_port"],
            "workspace_path": "/workspace",
        },
    )
    assert snap.status_code == 409, snap.get_json()
    ids = {m["id"] for m in world.client.get("/api/instances", headers=AUTH).get_json()["items"]}
    assert str(new_vast) not in ids
