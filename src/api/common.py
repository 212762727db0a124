"""Small helpers the blueprints share."""

from __future__ import annotations

from typing import Any

from flask import Response, current_app, jsonify, request

from src.container import Container
from src.services.jobs import Idempotency

# Path parameters; `@route` answers 404 to a value outside these without a database query.
JOB_ID = {"type": "string", "minLength": 1, "maxLength": 64, "pattern": r"^[A-Za-z0-9_]+$"}
SNAPSHOT_ID = {"type": "string", "minLength": 1, "maxLength": 64, "pattern": r"^[A-Za-z0-9_]+$"}
# Machine ids are names given by users or `host:port` (IPv6 too): anything printable.
MACHINE_ID = {"type": "string", "minLength": 1, "maxLength": 128, "pattern": r"^[^\x00-\x1f\x7f]+$"}


def container() -> Container:
    return current_app.extensions["gpusnap"]


def idempotency(key: str | None, body: Any) -> Idempotency | None:
    return Idempotency.of(
        key,
        method=request.method,
        path=request.path,
        body=body.model_dump(mode="json") if hasattr(body, "model_dump") else body,
    )


def accepted(payload: dict[str, Any], job: dict[str, Any]) -> Response:
    """202 with the job to poll in `Location`."""
    resp = jsonify(payload)
    resp.status_code = 202
    resp.headers["Location"] = f"/api/jobs/{job['id']}"
    return resp


def ok(payload: Any, status: int = 200) -> Response:
    resp = jsonify(payload)
    resp.status_code = status
    return resp
