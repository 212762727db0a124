"""/api/instances: machines, which keep their identity across hibernate and wake."""

from __future__ import annotations

from flask import Blueprint, Response

from src.api import schemas as m
from src.api.common import MACHINE_ID, accepted, container, idempotency, ok
from src.api.routing import route
from src.services import instances
from src.services import machines as service

bp = Blueprint("instances", __name__, url_prefix="/api/instances")
TAG = "instances"
_ID = {"instance_id": MACHINE_ID}


@route(bp, "", "GET", tag=TAG, summary="List machines", query=m.InstanceListQuery, responses={200: m.MachineList})
def list_instances(query: m.InstanceListQuery) -> Response:
    c = container()
    page = service.list_machines(
        c.session_factory,
        status=query.status,
        limit=query.limit,
        cursor=query.cursor,
        storage_price_gb_month=c.settings.storage_price_gb_month,
    )
    return ok({"items": page.items, "next_cursor": page.next_cursor})


@route(
    bp,
    "/<instance_id>",
    "GET",
    tag=TAG,
    summary="One machine with its current host and history",
    responses={200: m.Machine},
    path_params=_ID,
    description="Answers to the machine's original id and to the vast.ai instance id it runs on now.",
)
def get_instance(instance_id: str) -> Response:
    return ok(
        service.get_machine(
            container().session_factory, instance_id, storage_price_gb_month=container().settings.storage_price_gb_month
        )
    )


@route(
    bp,
    "/<instance_id>/hibernate",
    "POST",
    tag=TAG,
    body=m.HibernateRequest,
    responses={202: m.JobResponse, 503: m.ErrorResponse},
    idempotency=True,
    path_params=_ID,
    summary="Snapshot the workspace, verify it, then destroy the instance",
    description="The instance is destroyed only after the snapshot is complete and verified; "
    "`destroy_after: false` takes the snapshot and keeps the instance.",
)
def hibernate(instance_id: str, body: m.HibernateRequest, idempotency_key: str | None) -> Response:
    job = instances.hibernate(
        container(),
        instance_id,
        workspace_path=body.workspace_path,
        ssh_host=body.ssh_host,
        ssh_port=body.ssh_port,
        ssh_user=body.ssh_user,
        destroy_after=body.destroy_after,
        codec=body.codec,
        excludes=body.excludes,
        deep_verify=body.deep_verify,
        idem=idempotency(idempotency_key, body),
    )
    return accepted({"job": job}, job)


@route(
    bp,
    "/<instance_id>/wake",
    "POST",
    tag=TAG,
    body=m.WakeRequest,
    body_optional=True,
    responses={202: m.JobResponse, 503: m.ErrorResponse},
    idempotency=True,
    path_params=_ID,
    summary="Rent a new instance and restore the latest (or a chosen) snapshot onto it",
    description="If anything fails after an instance was rented, that instance is destroyed and the "
    "snapshot kept; the machine keeps its id.",
)
def wake(instance_id: str, body: m.WakeRequest, idempotency_key: str | None) -> Response:
    job = instances.wake(
        container(),
        instance_id,
        snapshot_id=body.snapshot_id,
        gpu_type=body.gpu_type,
        num_gpus=body.num_gpus,
        region=body.region,
        max_price=body.max_price,
        disk_gb=body.disk_gb,
        image=body.image,
        workspace_path=body.workspace_path,
        priority=body.priority,
        idem=idempotency(idempotency_key, body),
    )
    return accepted({"job": job}, job)


@route(
    bp,
    "/<instance_id>/pause",
    "POST",
    tag=TAG,
    body=m.EmptyRequest,
    body_optional=True,
    responses={202: m.JobResponse, 503: m.ErrorResponse},
    idempotency=True,
    path_params=_ID,
    summary="Stop the instance on vast.ai (disk kept and billed; no data moves)",
)
def pause(instance_id: str, body: m.EmptyRequest, idempotency_key: str | None) -> Response:
    job = instances.pause(container(), instance_id, idem=idempotency(idempotency_key, body))
    return accepted({"job": job}, job)


@route(
    bp,
    "/<instance_id>/resume",
    "POST",
    tag=TAG,
    body=m.EmptyRequest,
    body_optional=True,
    responses={202: m.JobResponse, 503: m.ErrorResponse},
    idempotency=True,
    path_params=_ID,
    summary="Start a paused instance again (fails with gpu_unavailable if its GPUs were taken)",
)
def resume(instance_id: str, body: m.EmptyRequest, idempotency_key: str | None) -> Response:
    job = instances.resume(container(), instance_id, idem=idempotency(idempotency_key, body))
    return accepted({"job": job}, job)


@route(
    bp,
    "/<instance_id>/forget-host-key",
    "POST",
    tag=TAG,
    body=m.EmptyRequest,
    body_optional=True,
    responses={200: m.Machine},
    path_params=_ID,
    summary="Clear the machine's pinned SSH host key",
    description="The next connection trusts and pins the key the host presents (trust on first use). "
    "For a machine known to be re-installed or re-keyed; recorded as a `host_key_forgotten` "
    "event. Naming the machine by another host or port never clears the pin; only this call "
    "and a wake onto a new instance do.",
)
def forget_host_key(instance_id: str, body: m.EmptyRequest) -> Response:
    return ok(service.forget_host_key(container().session_factory, instance_id))
