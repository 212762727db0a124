"""/api/maintenance: operations on the store as a whole (garbage collection)."""

from __future__ import annotations

from flask import Blueprint, Response

from src.api import schemas as m
from src.api.common import accepted, container, idempotency
from src.api.routing import route
from src.services import maintenance as service

bp = Blueprint("maintenance", __name__, url_prefix="/api/maintenance")
TAG = "maintenance"


@route(
    bp,
    "/gc",
    "POST",
    tag=TAG,
    summary="Delete chunk-store objects no snapshot references",
    body=m.GcRequest,
    body_optional=True,
    responses={202: m.JobResponse, 409: m.ErrorResponse, 503: m.ErrorResponse},
    idempotency=True,
    description="Starts a `gc` job: per machine with no snapshot in progress, deletes format-2 chunks and packs "
    "that no snapshot references and that are older than `grace_s` (default GC_GRACE_S), and "
    "repacks packs that are mostly garbage. 409 `gc_running` while one runs.",
)
def start_gc(body: m.GcRequest, idempotency_key: str | None) -> Response:
    job = service.start_gc(container(), grace_s=body.grace_s, idem=idempotency(idempotency_key, body))
    return accepted({"job": job}, job)
