"""/api/instances: machines, which keep their identity across hibernate and wake."""
from __future__ import annotations

from flask import Blueprint, Response

from src.api import schemas as m
from src.api.common import MACHINE_ID, container, ok
from src.api.routing import route
from src.services import machines as service

bp = Blueprint("instances", __name__, url_prefix="/api/instances")
TAG = "instances"
_ID = {"instance_id": MACHINE_ID}


@route(bp, "", "GET", tag=TAG, summary="List machines", query=m.InstanceListQuery, responses={200: m.MachineList})
def list_instances(query: m.InstanceListQuery) -> Response:
    page = service.list_machines(container().session_factory, status=query.status, limit=query.limit,
                                 cursor=query.cursor)
    return ok({"items": page.items, "next_cursor": page.next_cursor})


@route(bp, "/<instance_id>", "GET", tag=TAG, summary="One machine with its current host and history",
       responses={200: m.Machine}, path_params=_ID,
       description="Answers to the machine's original id and to the vast.ai instance id it runs on now.")
def get_instance(instance_id: str) -> Response:
    return ok(service.get_machine(container().session_factory, instance_id))
