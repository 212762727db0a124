"""gc of format-2 chunk stores against a careless operator (an outside tester's findings): real
SeaweedFS, the app's job runner, the database of the test run."""
from __future__ import annotations

import os

from src.app import create_app
from tests.integration.test_dedup_store import BLOCK, _job, app, assert_restorable, s3store  # noqa: F401
from tests.support.chunkstore import add_v2_snapshot
from tests.support.fixtures_app import AUTH, make_settings, run_jobs


def test_gc_after_snapshot_prefix_changed_leaves_older_snapshots_restorable(
        app, s3store, tmp_path, database_url, s3_prefix):  # type: ignore[no-untyped-def]  # noqa: F811
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
    moved = create_app(make_settings(tmp_path / "moved", database_url, snapshot_prefix=s3_prefix + "moved/"),
                       object_store=s3store, configure_logs=False)
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
        restore_id = job_service.add_job(s, kind="restore_snapshot", params={"snapshot_id": second["id"]},
                                         lock_key="machine:elsewhere", snapshot_id=second["id"]).id
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
