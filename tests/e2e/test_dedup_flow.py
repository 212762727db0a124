"""Format-2 (deduplicated) snapshots end to end through the HTTP API: a real worker SSHes into the loopback
sshd, snapshot.py/restore.py move the workspace through SeaweedFS, the control plane tells the host what
the machine's chunk store holds, indexes each manifest, verifies, deletes and collects garbage."""

from __future__ import annotations

import shutil

import boto3
import pytest

from src.pack import read_toc
from tests.e2e.test_hibernate_wake import _hibernate, box  # noqa: F401  (fixture)
from tests.support.trees import describe_tree, make_tricky_tree

pytestmark = pytest.mark.slow


def _snapshot(stack, sshd, workspace, instance_id: str = "dedup-1") -> dict:  # type: ignore[no-untyped-def]
    r = stack.post(
        "/api/gpu-snapshots",
        json={
            "instance_id": instance_id,
            "ssh_host": sshd.host,
            "ssh_port": sshd.port,
            "workspace_path": str(workspace),
        },
    )
    assert r.status_code == 202, r.text
    job = stack.wait_job(r.json()["job"]["id"])
    assert job["status"] == "succeeded", job
    return stack.get(f"/api/gpu-snapshots/{r.json()['snapshot']['id']}").json()


def _restore(stack, sshd, snap: dict, target) -> dict:  # type: ignore[no-untyped-def]
    r = stack.post(
        f"/api/gpu-snapshots/{snap['id']}/restore",
        json={
            "ssh_host": sshd.host,
            "ssh_port": sshd.port,
            "workspace_path": str(target),
            "instance_id": "dedup-target",
            "overwrite": True,
        },
    )
    assert r.status_code == 202, r.text
    return stack.wait_job(r.json()["job"]["id"])


def _run(stack, path: str, body: dict) -> dict:  # type: ignore[no-untyped-def]
    r = stack.post(path, json=body)
    assert r.status_code == 202, r.text
    return stack.wait_job(r.json()["job"]["id"])


def test_second_snapshot_uploads_little_both_restore_and_gc_keeps_what_is_referenced(stack, sshd, s3_server, tmp_path):
    workspace = make_tricky_tree(tmp_path / "workspace")
    first_tree = describe_tree(workspace)
    first = _snapshot(stack, sshd, workspace)
    assert first["format"] == 2 and first["chunks_reused"] == 0 and first["chunks_new"] >= 2
    assert first["bytes_uploaded"] == first["stored_bytes"] > 0

    with open(workspace / "src" / "pkg" / "mod_3.py", "a") as f:  # an edit, an append and a new file
        f.write("# edited\n")
    (workspace / "notes.txt").write_text("a new small file\n")
    second_tree = describe_tree(workspace)
    second = _snapshot(stack, sshd, workspace)
    assert second["chunks_reused"] > 0 and second["chunks_new"] >= 1
    # the 3 MiB weights block and the unchanged groups were not uploaded again
    assert second["bytes_uploaded"] < first["bytes_uploaded"] / 4, (first, second)
    machine = stack.get("/api/instances/dedup-1").json()
    assert first["stored_bytes"] <= machine["store_bytes"] < first["stored_bytes"] + second["stored_bytes"]
    metrics = stack.get("/metrics").text
    assert 'gpusnap_machine_stored_bytes{machine="dedup-1"}' in metrics
    assert 'gpusnap_machine_dedup_ratio{machine="dedup-1"}' in metrics

    assert _restore(stack, sshd, first, tmp_path / "r1")["status"] == "succeeded"
    assert describe_tree(tmp_path / "r1") == first_tree
    assert _restore(stack, sshd, second, tmp_path / "r2")["status"] == "succeeded"
    assert describe_tree(tmp_path / "r2") == second_tree
    for snap in (first, second):
        for deep in (False, True):
            job = _run(stack, f"/api/gpu-snapshots/{snap['id']}/verify", {"deep": deep})
            assert job["status"] == "succeeded" and job["result"]["format"] == 2, job

    r = stack.delete(f"/api/gpu-snapshots/{first['id']}")
    assert stack.wait_job(r.json()["job"]["id"])["status"] == "succeeded"
    gc = _run(stack, "/api/maintenance/gc", {"grace_s": 0})
    assert gc["status"] == "succeeded" and gc["result"]["deleted_objects"] >= 1, gc
    assert _restore(stack, sshd, second, tmp_path / "r3")["status"] == "succeeded"
    assert describe_tree(tmp_path / "r3") == second_tree
    assert _run(stack, f"/api/gpu-snapshots/{second['id']}/verify", {"deep": True})["status"] == "succeeded"
    after = stack.get("/api/instances/dedup-1").json()["store_bytes"]
    assert after < machine["store_bytes"]

    # A damaged shared block: deep verify and restore both catch it; the target is left as it was.
    s3 = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint,
        aws_access_key_id=s3_server.access_key,
        aws_secret_access_key=s3_server.secret_key,
        region_name=s3_server.region,
    )
    store_prefix = second["storage_prefix"][: -len(second["id"]) - 1]
    packs = s3.list_objects_v2(Bucket=s3_server.bucket, Prefix=store_prefix + "packs/")["Contents"]
    key = max(packs, key=lambda o: o["Size"])["Key"]  # a run of blocks
    data = bytearray(s3.get_object(Bucket=s3_server.bucket, Key=key)["Body"].read())
    first_chunk = read_toc(bytes(data))[0]  # after gc every chunk left is one `second` uses
    data[first_chunk.offset + first_chunk.stored_size // 2] ^= 0xFF
    s3.put_object(Bucket=s3_server.bucket, Key=key, Body=bytes(data))
    assert _run(stack, f"/api/gpu-snapshots/{second['id']}/verify", {"deep": False})["status"] == "succeeded"
    deep = _run(stack, f"/api/gpu-snapshots/{second['id']}/verify", {"deep": True})
    assert deep["error"]["code"] == "part_corrupt", deep


def test_hibernate_wake_twice_with_format_2_reuses_chunks_and_restores_the_same_tree(stack, fake_vast, box):  # noqa: F811
    first = stack.wait_job(_hibernate(stack, box)["id"])
    assert first["status"] == "succeeded", first
    snap1 = stack.get(f"/api/gpu-snapshots/{first['result']['snapshot_id']}").json()
    assert snap1["format"] == 2 and snap1["chunks_new"] > 0
    shutil.rmtree(box["workspace"])
    woke = _run(stack, f"/api/instances/{box['id']}/wake", {"gpu_type": "RTX 4090", "region": "us"})
    assert woke["status"] == "succeeded", woke
    assert describe_tree(box["workspace"]) == box["tree"]

    (box["workspace"] / "checkpoint.txt").write_text("step 1000\n")
    tree = describe_tree(box["workspace"])
    second = stack.wait_job(_hibernate(stack, box)["id"])
    assert second["status"] == "succeeded", second
    snap2 = stack.get(f"/api/gpu-snapshots/{second['result']['snapshot_id']}").json()
    assert snap2["chunks_reused"] > 0 and snap2["bytes_uploaded"] < snap1["bytes_uploaded"]
    shutil.rmtree(box["workspace"])
    woke = _run(stack, f"/api/instances/{box['id']}/wake", {"gpu_type": "RTX 4090", "region": "us"})
    assert woke["status"] == "succeeded", woke
    assert describe_tree(box["workspace"]) == tree


def test_a_snapshot_that_starts_while_gc_is_deleting_its_chunks_waits_completes_and_restores(stack, sshd, tmp_path):
    """The interleaving gc must never win. Snapshot A is deleted, so its chunks are garbage; gc marks them
    and its worker is killed before it deletes them (`gc.after_mark`). Snapshot B of the same workspace
    starts then: its host would find those very chunks in the store listing and reuse them, and the
    recovered gc would delete them under it. B must wait until gc has removed them, upload its own, and
    restore identical; gc deletes nothing B references."""
    workspace = make_tricky_tree(tmp_path / "workspace")
    tree = describe_tree(workspace)
    first = _snapshot(stack, sshd, workspace, instance_id="race-1")
    r = stack.delete(f"/api/gpu-snapshots/{first['id']}")
    assert stack.wait_job(r.json()["job"]["id"])["status"] == "succeeded"

    stack.stop_worker()
    doomed = stack.start_worker(GPUSNAP_FAILPOINTS="gc.after_mark")
    r = stack.post("/api/maintenance/gc", json={"grace_s": 0})
    assert r.status_code == 202, r.text
    gc_id = r.json()["job"]["id"]
    assert doomed.wait(timeout=60) == 137  # killed right after marking A's chunks `deleting`
    assert stack.get(f"/api/jobs/{gc_id}").json()["status"] == "running"  # nobody finished it

    r = stack.post(
        "/api/gpu-snapshots",
        json={"instance_id": "race-1", "ssh_host": sshd.host, "ssh_port": sshd.port, "workspace_path": str(workspace)},
    )
    assert r.status_code == 202, r.text
    second_id, second_job = r.json()["snapshot"]["id"], r.json()["job"]["id"]
    stack.start_worker()  # recovers the gc job and runs both
    gc = stack.wait_job(gc_id)
    job = stack.wait_job(second_job)
    assert gc["status"] == "succeeded" and job["status"] == "succeeded", (gc, job)
    second = stack.get(f"/api/gpu-snapshots/{second_id}").json()
    assert second["chunks_reused"] == 0  # nothing of A's was reused: it was being deleted
    assert _restore(stack, sshd, second, tmp_path / "restored")["status"] == "succeeded"
    assert describe_tree(tmp_path / "restored") == tree
    assert _run(stack, f"/api/gpu-snapshots/{second_id}/verify", {"deep": True})["status"] == "succeeded"
    again = _run(stack, "/api/maintenance/gc", {"grace_s": 0})
    assert again["status"] == "succeeded" and again["result"]["deleted_objects"] == 0, again
