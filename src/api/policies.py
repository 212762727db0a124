"""/api/instances/<id>/policy: what the worker does to a machine by itself."""

from __future__ import annotations

from flask import Blueprint, Response, request

from src.api import schemas as m
from src.api.common import MACHINE_ID, container, ok
from src.api.routing import route
from src.errors import InvalidRequest, NotFound
from src.services import policies as service

bp = Blueprint("policies", __name__, url_prefix="/api/instances")
TAG = "instances"
_ID = {"instance_id": MACHINE_ID}


@route(
    bp,
    "/<instance_id>/policy",
    "PUT",
    tag=TAG,
    body=m.PolicyRequest,
    responses={200: m.Policy},
    path_params=_ID,
    summary="Set the machine's policy: scheduled snapshots, retention, idle auto-hibernate",
    description="Replaces the whole policy; every part is optional. `schedule` is a 5-field cron expression "
    "in UTC. Scheduled snapshots and idle actions run as ordinary jobs started by the worker.",
)
def put_policy(instance_id: str, body: m.PolicyRequest) -> Response:
    if not request.get_data(cache=True).strip():  # a PUT states the whole policy; `{}` is the empty one
        raise InvalidRequest("send the policy as a JSON object (`{}` for an empty policy)", code="invalid_json")
    return ok(service.put_policy(container(), instance_id, body.model_dump(mode="json")))


@route(
    bp,
    "/<instance_id>/policy",
    "GET",
    tag=TAG,
    responses={200: m.Policy},
    path_params=_ID,
    summary="The machine's policy (404 `no_policy` when it has none)",
)
def get_policy(instance_id: str) -> Response:
    policy = service.get_policy(container(), instance_id)
    if policy is None:
        raise NotFound(f"machine {instance_id} has no policy", code="no_policy")
    return ok(policy)


@route(
    bp,
    "/<instance_id>/policy",
    "DELETE",
    tag=TAG,
    responses={204: None},
    path_params=_ID,
    summary="Remove the machine's policy (idempotent); jobs it started go on",
)
def delete_policy(instance_id: str) -> Response:
    service.delete_policy(container(), instance_id)
    return Response(status=204)
