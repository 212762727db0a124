"""/api/gpu-snapshots: thin handlers over `src.services.snapshots`."""

from __future__ import annotations

from flask import Blueprint, Response

from src.api import schemas as m
from src.api.common import SNAPSHOT_ID, accepted, container, idempotency, ok
from src.api.routing import route
from src.services import snapshots as service

bp = Blueprint("snapshots", __name__, url_prefix="/api/gpu-snapshots")
TAG = "snapshots"
_ID = {"snapshot_id": SNAPSHOT_ID}


@route(
    bp,
    "",
    "GET",
    tag=TAG,
    summary="List snapshots, newest first",
    query=m.SnapshotListQuery,
    responses={200: m.SnapshotList},
)
def list_snapshots(query: m.SnapshotListQuery) -> Response:
    page = service.list_snapshots(
        container(), instance_id=query.instance_id, status=query.status, limit=query.limit, cursor=query.cursor
    )
    return ok({"items": page.items, "next_cursor": page.next_cursor})


def _create(body: m.CreateSnapshotRequest, idempotency_key: str | None) -> Response:
    snapshot, job = service.create_snapshot(
        container(),
        instance_id=body.instance_id,
        ssh_host=body.ssh_host,
        ssh_port=body.ssh_port,
        workspace_path=body.workspace_path,
        ssh_user=body.ssh_user,
        name=body.snapshot_name,
        codec=body.codec,
        excludes=body.excludes,
        idem=idempotency(idempotency_key, body),
    )
    return accepted({"snapshot": snapshot, "job": job}, job)


@route(
    bp,
    "",
    "POST",
    tag=TAG,
    summary="Snapshot a workspace over SSH",
    body=m.CreateSnapshotRequest,
    responses={202: m.SnapshotJobResponse, 503: m.ErrorResponse},
    idempotency=True,
)
def create_snapshot(body: m.CreateSnapshotRequest, idempotency_key: str | None) -> Response:
    return _create(body, idempotency_key)


@route(
    bp,
    "/create",
    "POST",
    tag=TAG,
    summary="Alias of POST /api/gpu-snapshots",
    body=m.CreateSnapshotRequest,
    responses={202: m.SnapshotJobResponse, 503: m.ErrorResponse},
    idempotency=True,
)
def create_snapshot_alias(body: m.CreateSnapshotRequest, idempotency_key: str | None) -> Response:
    return _create(body, idempotency_key)


@route(bp, "/<snapshot_id>", "GET", tag=TAG, summary="One snapshot", responses={200: m.Snapshot}, path_params=_ID)
def get_snapshot(snapshot_id: str) -> Response:
    return ok(service.get_snapshot(container(), snapshot_id))


@route(
    bp,
    "/<snapshot_id>/restore",
    "POST",
    tag=TAG,
    summary="Restore a snapshot onto a host over SSH",
    body=m.RestoreSnapshotRequest,
    responses={202: m.JobResponse, 503: m.ErrorResponse},
    idempotency=True,
    path_params=_ID,
    description="Nothing reaches the live workspace until every part is verified and extracted beside it. "
    "System directories are refused (422 `system_path`); a non-empty workspace is replaced only "
    "with `overwrite: true` (else the job fails with `workspace_exists`), and the replaced tree is "
    "kept beside it until the next successful restore of that path.",
)
def restore_snapshot(snapshot_id: str, body: m.RestoreSnapshotRequest, idempotency_key: str | None) -> Response:
    job = service.restore_snapshot(
        container(),
        snapshot_id,
        ssh_host=body.ssh_host,
        ssh_port=body.ssh_port,
        workspace_path=body.workspace_path,
        ssh_user=body.ssh_user,
        instance_id=body.instance_id,
        overwrite=body.overwrite,
        keep_setuid=body.keep_setuid,
        idem=idempotency(idempotency_key, body),
    )
    return accepted({"job": job}, job)


@route(
    bp,
    "/<snapshot_id>/verify",
    "POST",
    tag=TAG,
    summary="Check a snapshot's objects in the bucket",
    body=m.VerifySnapshotRequest,
    body_optional=True,
    responses={202: m.JobResponse, 503: m.ErrorResponse},
    idempotency=True,
    path_params=_ID,
)
def verify_snapshot(snapshot_id: str, body: m.VerifySnapshotRequest, idempotency_key: str | None) -> Response:
    job = service.verify_snapshot(container(), snapshot_id, deep=body.deep, idem=idempotency(idempotency_key, body))
    return accepted({"job": job}, job)


@route(
    bp,
    "/<snapshot_id>",
    "DELETE",
    tag=TAG,
    summary="Delete a snapshot: objects first, then the record",
    query=m.DeleteSnapshotQuery,
    responses={202: m.JobResponse, 503: m.ErrorResponse},
    idempotency=True,
    path_params=_ID,
    description="409 `snapshot_needed` for the snapshot a hibernated machine would wake from (unless "
    "`force=true`); 409 `snapshot_busy` while a job uses it.",
)
def delete_snapshot(snapshot_id: str, query: m.DeleteSnapshotQuery, idempotency_key: str | None) -> Response:
    # The key's body: {} for a plain delete (as before `force` existed), so replays keep matching.
    job = service.delete_snapshot(
        container(),
        snapshot_id,
        force=query.force,
        idem=idempotency(idempotency_key, {"force": True} if query.force else {}),
    )
    return accepted({"job": job}, job)
