"""kill -9 of the worker at each step of gc (src/jobs/failpoints.py), then a fresh worker re-runs the job:
it finishes, nothing a snapshot references is ever lost (checked while the first worker lies dead, and
after), and what gc set out to remove is gone. Real worker processes, SQLite, SeaweedFS."""

from __future__ import annotations

import os
import time

import pytest
from sqlalchemy import select

from src.db import transaction
from src.models import Job, Snapshot, StoreObject
from src.services import jobs as job_service
from src.services.maintenance import GC_LOCK
from tests.integration.test_dedup_store import _keys, assert_restorable
from tests.support.chunkstore import add_v2_snapshot
from tests.support.test_worker import WorkerProcess, control_app, worker_env

STEPS = [
    "gc.after_mark",
    "gc.after_delete",
    "gc.after_forget",
    "gc.repack_after_upload",
    "gc.repack_after_plan",
    "gc.repack_after_manifest",
    "gc.repack_after_switch",
]


@pytest.mark.parametrize("step", STEPS)
def test_gc_killed_at_each_step_finishes_on_rerun_and_loses_nothing_referenced(tmp_path, s3_server, s3_prefix, step):
    env = worker_env(
        tmp_path,
        QUEUE_PATH=str(tmp_path / "queue.db"),
        JOB_STALE_AFTER_S="600",
        TEST_WORKER_KINDS="all",
        R2_ENDPOINT=s3_server.endpoint,
        R2_BUCKET=s3_server.bucket,
        R2_ACCESS_KEY=s3_server.access_key,
        R2_SECRET_KEY=s3_server.secret_key,
        R2_REGION=s3_server.region,
        SNAPSHOT_PREFIX=s3_prefix,
    )
    app = control_app(env)
    c = app.extensions["gpusnap"]
    store = c.object_store()
    groups = [os.urandom(20_000) for _ in range(10)]
    first = add_v2_snapshot(app, store, blocks=[os.urandom(300 << 10)], groups=groups)
    second = add_v2_snapshot(app, store, groups=[groups[2], b"kept"], previous=first["manifest"])
    with transaction(c.session_factory) as s:  # the first is deleted (its record and references go first)
        s.delete(s.get(Snapshot, first["id"]))
        from sqlalchemy import delete

        from src.models import SnapshotObject

        s.execute(delete(SnapshotObject).where(SnapshotObject.snapshot_id == first["id"]))
    store.delete_keys([first["prefix"] + "manifest.json"])
    garbage = {o.key for o in first["manifest"].objects}  # the block and the mostly-dead pack

    with transaction(c.session_factory) as s:
        job_id = job_service.add_job(s, kind="gc", params={"grace_s": 0}, lock_key=GC_LOCK).id
    c.queue.enqueue(job_id)
    doomed = WorkerProcess({**env, "GPUSNAP_FAILPOINTS": step}, tmp_path, "doomed").start()
    try:
        assert doomed.proc.wait(timeout=60) == 137, doomed.log_tail()
        assert f"failpoint {step}" in doomed.log_tail()
        assert_restorable(c, store, second["id"])  # nothing referenced lost, even mid-way

        survivor = WorkerProcess(env, tmp_path, "survivor").start()
        deadline = time.monotonic() + 60
        while True:
            with transaction(c.session_factory) as s:
                job = s.get(Job, job_id)
                status, result, error = job.status, job.result, (job.error_code, job.error_message)
            if status in job_service.FINISHED:
                break
            assert time.monotonic() < deadline, survivor.log_tail()
            time.sleep(0.1)
        survivor.stop()
        assert status == "succeeded", (error, survivor.log_tail())
        assert_restorable(c, store, second["id"])
        keys = _keys(store, first["store_prefix"])
        assert not garbage & keys, (step, result)
        with transaction(c.session_factory) as s:
            assert not s.scalars(select(StoreObject).where(StoreObject.state != "live")).all()
            row = s.get(Snapshot, second["id"])
            assert row.manifest_sha256_next is None
            indexed = set(s.scalars(select(StoreObject.key).where(StoreObject.machine_id == "m1")))
        assert indexed == {k for k in keys if not k.endswith("manifest.json")}
    finally:
        doomed.kill()
        c.engine.dispose()
