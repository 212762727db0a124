"""Liveness, readiness, metrics (public) and the API's own description."""
from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version

from flask import Blueprint, Response, current_app
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from src.api import schemas as m
from src.api.common import container, ok
from src.api.openapi import build_openapi, render_docs
from src.api.routing import route

logger = logging.getLogger(__name__)
bp = Blueprint("meta", __name__)
TAG = "meta"


def app_version() -> str:
    try:
        return version("gpusnap")
    except PackageNotFoundError:
        return "0.0.0"


@route(bp, "/healthz", "GET", tag=TAG, summary="Liveness: the process answers", responses={200: m.Health},
       public=True)
def healthz() -> Response:
    return ok({"status": "ok"})


@route(bp, "/readyz", "GET", tag=TAG, summary="Readiness: the database and the job queue answer",
       responses={200: m.Health, 503: m.Health}, public=True)
def readyz() -> Response:
    c = container()
    checks: dict[str, str] = {}
    try:
        with c.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as e:  # readiness reports failures instead of raising them
        logger.warning("readyz: database: %s", e)
        checks["database"] = "unavailable"
    try:
        c.queue.ping()
        checks["queue"] = "ok"
    except Exception as e:
        logger.warning("readyz: queue: %s", e)
        checks["queue"] = "unavailable"
    healthy = all(v == "ok" for v in checks.values())
    body: dict = {"status": "ok" if healthy else "unavailable", "checks": checks}
    if c.settings.object_store_configured:  # a warning, not a failure: jobs still run
        from src.adapters.host_credentials import describe

        body["details"] = {"host_credentials": describe(c.settings)}
    return ok(body, 200 if healthy else 503)


@route(bp, "/metrics", "GET", tag=TAG, summary="Prometheus metrics", responses={200: None}, public=True)
def metrics() -> Response:
    return Response(generate_latest(container().metrics.registry), mimetype=CONTENT_TYPE_LATEST)


@route(bp, "/api/openapi.json", "GET", tag=TAG, summary="This API's OpenAPI 3 document", responses={200: None})
def openapi() -> Response:
    return ok(_document())


@route(bp, "/api/docs", "GET", tag=TAG, summary="A page describing this API", responses={200: None})
def docs() -> Response:
    return Response(render_docs(_document()), mimetype="text/html")


def _document() -> dict:
    cached = current_app.extensions.get("gpusnap.openapi")
    if cached is None:
        cached = current_app.extensions["gpusnap.openapi"] = build_openapi(current_app, version=app_version())
    return cached
