"""Liveness, readiness, metrics (public) and the API's own description."""

from __future__ import annotations

import importlib.util
import logging
import os
from importlib.metadata import PackageNotFoundError, version

from flask import Blueprint, Response, current_app, send_from_directory
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text

from src.api import schemas as m
from src.api.common import container, ok
from src.api.openapi import build_openapi, render_docs
from src.api.routing import route
from src.container import NotConfigured
from src.errors import NotFound

logger = logging.getLogger(__name__)
bp = Blueprint("meta", __name__)
TAG = "meta"


def app_version() -> str:
    try:
        return version("gpusnap")
    except PackageNotFoundError:
        return "0.0.0"


@route(bp, "/healthz", "GET", tag=TAG, summary="Liveness: the process answers", responses={200: m.Health}, public=True)
def healthz() -> Response:
    return ok({"status": "ok"})


@route(
    bp,
    "/readyz",
    "GET",
    tag=TAG,
    summary="Readiness: the database and the job queue answer",
    responses={200: m.Health, 503: m.Health},
    public=True,
)
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
    # `content_type`, not `mimetype`: CONTENT_TYPE_LATEST carries its charset already (one, not two).
    return Response(generate_latest(container().metrics.registry), content_type=CONTENT_TYPE_LATEST)


# The description of the API is not secret (the API is): a browser opens /api/docs without a token and
# uses Swagger UI's "Authorize" button for the calls it tries.
@route(
    bp, "/api/openapi.json", "GET", tag=TAG, summary="This API's OpenAPI 3 document", responses={200: None}, public=True
)
def openapi() -> Response:
    return ok(_document())


@route(bp, "/api/docs", "GET", tag=TAG, summary="Swagger UI: read and try this API", responses={200: None}, public=True)
def docs() -> Response:
    resp = Response(render_docs(_document()), mimetype="text/html")
    # The page may load and call this server only: a browser refuses anything else (a CDN, the validator).
    resp.headers["Content-Security-Policy"] = DOCS_CSP
    return resp


DOCS_CSP = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
)


# Swagger UI's own files, from the flask-swagger-ui package (no CDN). Only these names are served.
_DOCS_ASSETS = {
    "swagger-ui.css": "text/css",
    "index.css": "text/css",
    "swagger-ui-bundle.js": "text/javascript",
    "swagger-ui-standalone-preset.js": "text/javascript",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}
_ASSET_NAME = {"type": "string", "enum": sorted(_DOCS_ASSETS)}


@route(
    bp,
    "/api/docs/assets/<name>",
    "GET",
    tag=TAG,
    summary="A file of the Swagger UI page",
    responses={200: None},
    public=True,
    path_params={"name": _ASSET_NAME},
)
def docs_asset(name: str) -> Response:
    if name not in _DOCS_ASSETS:
        raise NotFound(f"no docs asset called {name!r}")
    resp = send_from_directory(swagger_ui_dist(), name, mimetype=_DOCS_ASSETS[name], max_age=3600)
    resp.headers["X-Content-Type-Options"] = "nosniff"
    return resp


def swagger_ui_dist() -> str:
    """The folder of Swagger UI's files inside the installed flask-swagger-ui package (located without
    importing it: its module reads its own version at import, which we do not need)."""
    spec = importlib.util.find_spec("flask_swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise NotConfigured("Swagger UI is not installed: pip install flask-swagger-ui")
    return os.path.join(list(spec.submodule_search_locations)[0], "dist")


def _document() -> dict:
    cached = current_app.extensions.get("gpusnap.openapi")
    if cached is None:
        cached = current_app.extensions["gpusnap.openapi"] = build_openapi(current_app, version=app_version())
    return cached
