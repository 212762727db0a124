"""gc of format-2 chunk stores against a careless operator (an outside tester's findings): real
SeaweedFS, the app's job runner, the database of the test run."""

from __future__ import annotations

import os

from src.app import create_app
from tests.integration.test_dedup_store import BLOCK, _job, app, assert_restorable, s3store  # noqa: F401
from tests.support.chunkstore import add_v2_snapshot
from tests.support.fixtures_app import AUTH, make_settings, run_jobs


def test_gc_after_snapshot_prefix_changed_leaves_older_snapshots_restorable(
    app,  # noqa: F811 - the fixtures of test_dedup_store, imported for pytest to find
    s3store,  # noqa: F811
    tmp_path,
    database_url,
    s3_prefix,
):  # type: ignore[no-untyped-def]
    """SNAPSHOT_PREFIX changed (and the control plane restarted) after a machine's format-2 snapshots
    were taken: they keep their storage_prefix and their chunk store under the old prefix. A gc must
    not repack them into the new prefix and switch their manifest digest to a manifest written there
    (the restore then reads the old prefix's manifest, which the row no longer accepts)."""
    client = app.test_client()
    groups = [os.urandom(20_000) for _ in range(10)]
    first = add_v2_snapshot(app, s3store, blocks=[os.urandom(BLOCK)], groups=groups)
    second = add_v2_snapshot(app, s3store, groups=[groups[3], b"new-group"], previous=first["manifest"])
    assert client.delete(f"/api/gpu-snapshots/{first['id']}", headers=AUTH).status_code == 202
    run_jobs(app)
    moved = create_app(
        make_settings(tmp_path / "moved", database_url, snapshot_prefix=s3_prefix + "moved/"),
        object_store=s3store,
        configure_logs=False,
    )
    try:
        job = _job(moved.test_client(), "/api/maintenance/gc", {"grace_s": 0})
        assert job["status"] == "succeeded", job
        assert_restorable(moved.extensions["gpusnap"], s3store, second["id"])
        verify = _job(moved.test_client(), f"/api/gpu-snapshots/{second['id']}/verify", {"deep": True})
        assert verify["status"] == "succeeded", verify
    finally:
        moved.extensions["gpusnap"].engine.dispose()


def test_repack_leaves_the_manifest_of_a_snapshot_being_restored_alone(app, s3store):  # type: ignore[no-untyped-def]  # noqa: F811
    """A restore (or wake) passes the recorded manifest digest to its host, which reads manifest.json
    seconds later (SSH, script upload, bootstrap). A repack that rewrites that manifest meanwhile makes
    the host refuse it (`manifest_changed`): a failed wake of a destroyed machine. Repack must leave the
    packs of a snapshot another job is using for a later gc, as reconcile already leaves its references."""
    from sqlalchemy import select

    from src.db import transaction
    from src.models import Snapshot
    from src.services import jobs as job_service

    client = app.test_client()
    c = app.extensions["gpusnap"]
    groups = [os.urandom(20_000) for _ in range(10)]
    first = add_v2_snapshot(app, s3store, blocks=[os.urandom(BLOCK)], groups=groups)
    second = add_v2_snapshot(app, s3store, groups=[groups[3], b"new-group"], previous=first["manifest"])
    assert client.delete(f"/api/gpu-snapshots/{first['id']}", headers=AUTH).status_code == 202
    run_jobs(app)
    with transaction(c.session_factory) as s:
        restore_id = job_service.add_job(
            s,
            kind="restore_snapshot",
            params={"snapshot_id": second["id"]},
            lock_key="machine:elsewhere",
            snapshot_id=second["id"],
        ).id
    assert job_service.claim(c.session_factory, restore_id, worker="test") is not None  # its host is starting
    job = _job(client, "/api/maintenance/gc", {"grace_s": 0})
    assert job["status"] == "succeeded", job
    assert job["result"]["repacked_packs"] == 0, job["result"]
    body = s3store.get_bytes(second["prefix"] + "manifest.json")
    import hashlib

    assert hashlib.sha256(body).hexdigest() == second["manifest"].sha256
    with transaction(c.session_factory) as s:
        row = s.scalar(select(Snapshot).where(Snapshot.id == second["id"]))
        assert row.manifest_sha256 == second["manifest"].sha256 and row.manifest_sha256_next is None
    assert_restorable(c, s3store, second["id"])


def test_deep_verify_names_a_chunk_whose_bytes_decode_to_another_digest(app, s3store):  # type: ignore[no-untyped-def]  # noqa: F811
    """A zstd chunk whose stored bytes are intact (stored SHA-256 matches) but decode to other bytes
    than its raw_sha256 (a previous host's lying manifest or pack, reused through known_chunks): the
    restore fails on it (part_corrupt); deep verify, run before a machine is destroyed, must too."""
    import hashlib
    import json

    import zstandard

    from src.db import transaction
    from src.jobs.chunk_index import record_manifest
    from src.manifest import parse_manifest
    from src.models import Snapshot
    from src.pack import PackEntry, build_pack

    client = app.test_client()
    c = app.extensions["gpusnap"]
    real = b"real file bytes " * 200
    snap = add_v2_snapshot(app, s3store, groups=[real])
    doc = dict(snap["manifest"].doc)
    evil = zstandard.ZstdCompressor(write_checksum=True).compress(os.urandom(len(real)))
    pack, entries = build_pack(
        [
            (
                PackEntry(
                    hashlib.sha256(real).hexdigest(), 0, len(evil), len(real), "zstd", hashlib.sha256(evil).hexdigest()
                ),
                evil,
            )
        ]
    )
    key = "packs/" + hashlib.sha256(pack).hexdigest()
    s3store.put_bytes(snap["store_prefix"] + key, pack)
    doc["objects"] = [{"key": key, "size": len(pack), "sha256": hashlib.sha256(pack).hexdigest()}]
    doc["chunks"] = [
        dict(doc["chunks"][0], object=0, offset=0, stored_size=len(evil), codec="zstd", sha256=entries[0].sha256)
    ]
    doc["totals"] = dict(doc["totals"], stored_bytes=len(pack), objects=1)
    raw = json.dumps(doc).encode()
    manifest = parse_manifest(raw)
    s3store.put_bytes(snap["prefix"] + "manifest.json", raw)
    with transaction(c.session_factory) as s:
        s.get(Snapshot, snap["id"]).manifest_sha256 = manifest.sha256
        record_manifest(s, snap["id"], "m1", manifest)
    deep = _job(client, f"/api/gpu-snapshots/{snap['id']}/verify", {"deep": True})
    assert deep["status"] == "failed" and deep["error"]["code"] == "part_corrupt", deep
    assert key in deep["error"]["message"]
