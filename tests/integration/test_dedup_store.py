"""Format-2 snapshots on the control plane, against SeaweedFS and a real database (SQLite and PostgreSQL):
verify (light and deep) of shared objects, DELETE (manifest, record and references; shared objects
stay), gc (only what no snapshot references, past the grace period, never while a snapshot of the
machine is in progress) and known_chunks. The snapshots are hand-built (tests/support/chunkstore.py),
with the layout the host writes (docs/data-plane.md)."""

from __future__ import annotations

import os
import threading
import time

import pytest
from sqlalchemy import select

from src.adapters.object_store import ObjectStore
from src.app import create_app
from src.db import transaction
from src.jobs.chunk_index import known_chunks
from src.models import Job, Snapshot, SnapshotObject, StoreChunk, StoreObject
from tests.support.chunkstore import add_v2_snapshot
from tests.support.fixtures_app import AUTH, make_settings, run_jobs

BLOCK = 300 << 10


@pytest.fixture
def s3store(s3_server) -> ObjectStore:  # type: ignore[no-untyped-def]
    return ObjectStore(
        endpoint=s3_server.endpoint,
        bucket=s3_server.bucket,
        access_key=s3_server.access_key,
        secret_key=s3_server.secret_key,
        region=s3_server.region,
    )


@pytest.fixture
def app(tmp_path, database_url, s3store, s3_prefix):  # type: ignore[no-untyped-def]
    settings = make_settings(tmp_path, database_url, snapshot_prefix=s3_prefix)
    application = create_app(settings, object_store=s3store, configure_logs=False)
    yield application
    application.extensions["gpusnap"].engine.dispose()


def _job(client, path: str, body: dict | None = None) -> dict:  # type: ignore[no-untyped-def]
    r = client.post(path, json=body or {}, headers=AUTH)
    assert r.status_code == 202, r.get_json()
    run_jobs(client.application)
    return client.get(f"/api/jobs/{r.get_json()['job']['id']}", headers=AUTH).get_json()


def _keys(store: ObjectStore, prefix: str) -> set[str]:
    return {o.key[len(prefix) :] for o in store.list(prefix)}


def test_verify_light_and_deep_check_every_shared_object(app, s3store):
    client = app.test_client()
    a, b = os.urandom(BLOCK), os.urandom(BLOCK)
    first = add_v2_snapshot(app, s3store, blocks=[a, b], groups=[b"hdr1", b"small-file"])
    job = _job(client, f"/api/gpu-snapshots/{first['id']}/verify", {"deep": True})
    assert job["status"] == "succeeded", job
    assert job["result"]["format"] == 2 and job["result"]["objects"] == 3 and job["result"]["deep"] is True
    # one stored byte of a chunk inside the shared pack flipped: same size, so light passes, deep does not
    pack = next(o for o in first["manifest"].objects if o.kind == "pack")
    key = first["store_prefix"] + pack.key
    data = bytearray(s3store.get_bytes(key))
    data[1] ^= 0xFF
    s3store.put_bytes(key, bytes(data))
    assert _job(client, f"/api/gpu-snapshots/{first['id']}/verify")["status"] == "succeeded"
    deep = _job(client, f"/api/gpu-snapshots/{first['id']}/verify", {"deep": True})
    assert deep["status"] == "failed" and deep["error"]["code"] == "part_corrupt", deep
    assert pack.key in deep["error"]["message"]


def test_light_verify_finds_a_missing_or_short_block(app, s3store):
    client = app.test_client()
    a, b = os.urandom(BLOCK), os.urandom(BLOCK)
    snap = add_v2_snapshot(app, s3store, blocks=[a, b])
    blocks = [o.key for o in snap["manifest"].objects]
    s3store.put_bytes(snap["store_prefix"] + blocks[0], a[:-1])
    job = _job(client, f"/api/gpu-snapshots/{snap['id']}/verify")
    assert job["error"]["code"] == "part_truncated", job
    s3store.delete_keys([snap["store_prefix"] + blocks[1]])
    snap2 = add_v2_snapshot(app, s3store, blocks=[b], previous=snap["manifest"])
    job = _job(client, f"/api/gpu-snapshots/{snap2['id']}/verify")
    assert job["error"]["code"] == "part_missing", job


def test_delete_keeps_shared_objects_and_gc_removes_only_unreferenced_ones(app, s3store):
    client = app.test_client()
    shared, only_first, only_second = (os.urandom(BLOCK) for _ in range(3))
    first = add_v2_snapshot(app, s3store, blocks=[shared, only_first], groups=[b"g-first"])
    second = add_v2_snapshot(
        app, s3store, blocks=[shared, only_second], groups=[b"g-first"], previous=first["manifest"]
    )
    assert second["manifest"].totals["chunks_reused"] == 2
    store_prefix = first["store_prefix"]
    before = _keys(s3store, store_prefix)

    r = client.delete(f"/api/gpu-snapshots/{first['id']}", headers=AUTH)
    assert r.status_code == 202, r.get_json()
    run_jobs(app)
    after_delete = _keys(s3store, store_prefix)
    assert after_delete == before - {f"{first['id']}/manifest.json"}  # shared objects are gc's to judge
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        assert s.get(Snapshot, first["id"]) is None
        assert not s.scalars(select(SnapshotObject).where(SnapshotObject.snapshot_id == first["id"])).all()

    job = _job(client, "/api/maintenance/gc", {"grace_s": 0})
    assert job["status"] == "succeeded", job
    only_first_key = f"chunks/{first['manifest'].chunks[1].raw_sha256}"
    assert job["result"]["deleted_objects"] == 1
    assert _keys(s3store, store_prefix) == after_delete - {only_first_key}
    with transaction(app.extensions["gpusnap"].session_factory) as s:
        assert s.get(StoreObject, ("m1", only_first_key)) is None
        assert not s.scalars(select(StoreChunk).where(StoreChunk.object_key == only_first_key)).all()
    assert _job(client, f"/api/gpu-snapshots/{second['id']}/verify", {"deep": True})["status"] == "succeeded"


def test_gc_waits_out_the_grace_period_and_skips_a_machine_with_a_snapshot_in_progress(app, s3store):
    client = app.test_client()
    snap = add_v2_snapshot(app, s3store, blocks=[os.urandom(BLOCK)])
    orphan = f"chunks/{'ab' * 32}"
    s3store.put_bytes(snap["store_prefix"] + orphan, b"left by a snapshot that never completed")
    job = _job(client, "/api/maintenance/gc", {})  # GC_GRACE_S: an hour
    assert job["result"]["deleted_objects"] == 0 and orphan in _keys(s3store, snap["store_prefix"])
    add_v2_snapshot(app, s3store, machine_id="m1", blocks=[b"uploading"], status="running")
    job = _job(client, "/api/maintenance/gc", {"grace_s": 0})
    assert job["result"]["skipped_busy"] == ["m1"] and orphan in _keys(s3store, snap["store_prefix"])


def test_gc_never_touches_the_snapshot_a_hibernated_machine_wakes_from(app, s3store):
    client = app.test_client()
    snap = add_v2_snapshot(
        app, s3store, machine_id="sleepy", blocks=[os.urandom(BLOCK)], groups=[b"g"], machine_status="hibernated"
    )
    before = _keys(s3store, snap["store_prefix"])
    assert _job(client, "/api/maintenance/gc", {"grace_s": 0})["result"]["deleted_objects"] == 0
    assert _keys(s3store, snap["store_prefix"]) == before
    assert client.delete(f"/api/gpu-snapshots/{snap['id']}", headers=AUTH).status_code == 409


def test_one_gc_at_a_time(app, s3store):
    client = app.test_client()
    first = client.post("/api/maintenance/gc", json={}, headers=AUTH)
    assert first.status_code == 202
    second = client.post("/api/maintenance/gc", json={}, headers=AUTH)
    assert second.status_code == 409 and second.get_json()["error"]["code"] == "gc_running"
    assert client.post("/api/maintenance/gc", json={"grace_s": -1}, headers=AUTH).status_code == 422
    run_jobs(app)


def _running_job(c, kind: str, lock_key: str) -> Job:  # type: ignore[no-untyped-def]
    from src.services import jobs as job_service

    with transaction(c.session_factory) as s:
        job_id = job_service.add_job(s, kind=kind, params={}, lock_key=lock_key).id
    job = job_service.claim(c.session_factory, job_id, worker="test")
    assert job is not None
    return job


def test_known_chunks_are_live_objects_of_complete_snapshots_and_wait_for_a_running_gc(app, s3store):
    """The interleaving that must never lose a chunk: objects gc marked `deleting` are never handed out as
    known, and a snapshot waits until gc has removed them before its host lists or writes the store (a
    block's key is its digest: uploaded again, it must not be deleted afterwards by that gc)."""
    from src.jobs.context import JobContext
    from src.services import jobs as job_service

    c = app.extensions["gpusnap"]
    x, y = os.urandom(BLOCK), os.urandom(BLOCK)
    done = add_v2_snapshot(app, s3store, blocks=[x, y], groups=[b"g"])
    add_v2_snapshot(app, s3store, blocks=[os.urandom(BLOCK)], status="failed")  # not indexed: not known
    x_key, y_key = (f"chunks/{o.key.split('/')[1]}" for o in done["manifest"].objects[:2])
    gc_job = _running_job(c, "gc", "maintenance:gc")
    with transaction(c.session_factory) as s:  # as gc leaves it after its mark step
        s.get(StoreObject, ("m1", y_key)).state = "deleting"
        s.get(StoreObject, ("m1", y_key)).gc_job_id = gc_job.id
    snap_job = _running_job(c, "create_snapshot", "machine:m1")
    ctx = JobContext(container=c, job=snap_job, min_write_interval_s=0)
    out: dict = {}
    waiter = threading.Thread(target=lambda: out.update(known=known_chunks(ctx, "m1", done["store_prefix"])))
    waiter.start()
    deadline = time.monotonic() + 30
    while True:
        with transaction(c.session_factory) as s:
            if s.get(Job, snap_job.id).phase == "wait_gc":
                break
        assert time.monotonic() < deadline, "known_chunks did not wait for gc"
        time.sleep(0.05)
    assert waiter.is_alive() and "known" not in out
    s3store.delete_keys([done["store_prefix"] + y_key])  # gc's delete and forget steps
    with transaction(c.session_factory) as s:
        from src.jobs.chunk_index import drop_objects

        drop_objects(s, "m1", [y_key])
    assert job_service.finish(c.session_factory, gc_job.id, attempt=1, status="succeeded", result={})
    waiter.join(30)
    assert not waiter.is_alive()
    known = {row[0]: row for row in out["known"]}
    assert y_key.split("/")[1] not in known and x_key.split("/")[1] in known
    assert len(known) == 2  # x and the group; not y, not the failed snapshot's block
    assert known[x_key.split("/")[1]][1:5] == [x_key, 0, BLOCK, BLOCK]


def test_objects_a_dead_gc_left_deleting_are_removed_by_the_next_snapshot(app, s3store):
    from src.jobs.context import JobContext
    from src.services import jobs as job_service

    c = app.extensions["gpusnap"]
    done = add_v2_snapshot(app, s3store, blocks=[os.urandom(BLOCK)])
    stray = f"chunks/{'cd' * 32}"
    s3store.put_bytes(done["store_prefix"] + stray, b"orphan")
    gc_job = _running_job(c, "gc", "maintenance:gc")
    with transaction(c.session_factory) as s:
        s.add(StoreObject(machine_id="m1", key=stray, kind="block", size=6, state="deleting", gc_job_id=gc_job.id))
    assert job_service.finish(c.session_factory, gc_job.id, attempt=1, status="failed", error=("x", "died"))
    ctx = JobContext(container=c, job=_running_job(c, "create_snapshot", "machine:m1"), min_write_interval_s=0)
    known = known_chunks(ctx, "m1", done["store_prefix"])
    assert [row[1] for row in known] == [done["manifest"].objects[0].key]
    assert stray not in _keys(s3store, done["store_prefix"])
    with transaction(c.session_factory) as s:
        assert s.get(StoreObject, ("m1", stray)) is None


def assert_restorable(c, store: ObjectStore, snapshot_id: str) -> None:  # type: ignore[no-untyped-def]
    """Everything a restore of the snapshot reads is there and intact: the manifest is one the row
    accepts, and every object and every chunk in it has its digest."""
    import hashlib

    from src.manifest import parse_manifest

    with transaction(c.session_factory) as s:
        row = s.get(Snapshot, snapshot_id)
        accepted = {row.manifest_sha256, row.manifest_sha256_next} - {None}
        prefix = row.storage_prefix
    manifest = parse_manifest(store.get_bytes(prefix + "manifest.json"))
    assert manifest.sha256 in accepted
    store_prefix = prefix.rstrip("/").rsplit("/", 1)[0] + "/"
    for i, obj in enumerate(manifest.objects):
        data = store.get_bytes(store_prefix + obj.key)
        assert data is not None, f"{obj.key} of {snapshot_id} is gone"
        assert hashlib.sha256(data).hexdigest() == obj.sha256
        for chunk in (c for c in manifest.chunks if c.object == i):
            assert hashlib.sha256(data[chunk.offset : chunk.offset + chunk.stored_size]).hexdigest() == chunk.sha256


def _delete_then_gc_repacks_one_pack(app, s3store, snapshot: dict) -> set:  # type: ignore[no-untyped-def]
    """Delete `snapshot`, run gc with no grace: it succeeds and repacks one pack. The store's keys after."""
    client = app.test_client()
    assert client.delete(f"/api/gpu-snapshots/{snapshot['id']}", headers=AUTH).status_code == 202
    run_jobs(app)
    job = _job(client, "/api/maintenance/gc", {"grace_s": 0})
    assert job["status"] == "succeeded", job
    assert job["result"]["repacked_packs"] == 1, job["result"]
    return _keys(s3store, snapshot["store_prefix"])


def test_gc_repacks_a_mostly_garbage_pack_and_the_survivor_still_verifies(app, s3store):
    client = app.test_client()
    c = app.extensions["gpusnap"]
    groups = [os.urandom(20_000) for _ in range(10)]
    first = add_v2_snapshot(app, s3store, blocks=[os.urandom(BLOCK)], groups=groups)
    # the second keeps one group of the first's pack and adds its own (a second pack)
    second = add_v2_snapshot(app, s3store, groups=[groups[3], b"new-group"], previous=first["manifest"])
    old_pack = next(o.key for o in first["manifest"].objects if o.kind == "pack")
    keys = _delete_then_gc_repacks_one_pack(app, s3store, first)
    assert old_pack not in keys
    assert_restorable(c, s3store, second["id"])
    with transaction(c.session_factory) as s:
        row = s.get(Snapshot, second["id"])
        assert row.manifest_sha256_next is None and row.manifest_sha256 != second["manifest"].sha256
        refs = set(s.scalars(select(SnapshotObject.object_key).where(SnapshotObject.snapshot_id == second["id"])))
        assert old_pack not in refs and refs <= keys
    assert _job(client, f"/api/gpu-snapshots/{second['id']}/verify", {"deep": True})["status"] == "succeeded"
    again = _job(client, "/api/maintenance/gc", {"grace_s": 0})["result"]  # nothing left to do
    assert again["deleted_objects"] == 0 and again["repacked_packs"] == 0


def test_gc_repacks_a_run_with_one_dead_block_and_the_survivors_still_verify(app, s3store):  # type: ignore[no-untyped-def]
    """A run (the blocks of a file, one pack) whose middle block changed: once the older snapshot is
    deleted, the dead block is garbage like a dead block object was, and gc repacks the run."""
    client = app.test_client()
    c = app.extensions["gpusnap"]
    blocks = [os.urandom(BLOCK) for _ in range(3)]
    first = add_v2_snapshot(app, s3store, blocks=blocks, groups=[b"g"], run=True)
    old_run = next(o.key for o in first["manifest"].objects if o.kind == "pack" and o.size > 2 * BLOCK)
    changed = [blocks[0], os.urandom(BLOCK), blocks[2]]
    second = add_v2_snapshot(app, s3store, blocks=changed, groups=[b"g"], previous=first["manifest"], run=True)
    assert old_run in {o.key for o in second["manifest"].objects}  # the unchanged blocks are reused
    keys = _delete_then_gc_repacks_one_pack(app, s3store, first)
    assert old_run not in keys
    assert_restorable(c, s3store, second["id"])
    assert _job(client, f"/api/gpu-snapshots/{second['id']}/verify", {"deep": True})["status"] == "succeeded"
    again = _job(client, "/api/maintenance/gc", {"grace_s": 0})["result"]  # the new run is all live
    assert again["deleted_objects"] == 0 and again["repacked_packs"] == 0
