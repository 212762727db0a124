"""The status page at `/` and the totals behind it (`GET /api/summary`).

The page is one server-rendered template with its script and styles inline (no build step, nothing from
a CDN; a Content-Security-Policy with a per-response nonce lets only them run). It holds no data: the
script asks the API with the token the user typed once, kept in the tab's sessionStorage, and follows
running jobs over `GET /api/events` with a stream token."""

from __future__ import annotations

import secrets

from flask import Blueprint, Response, render_template

from src.api import schemas_events as ev
from src.api.common import container, ok
from src.api.routing import route
from src.services import costs

bp = Blueprint("dashboard", __name__, template_folder="templates")
TAG = "dashboard"


@route(
    bp,
    "/api/summary",
    "GET",
    tag=TAG,
    summary="Totals across machines: status, costs and savings, jobs",
    responses={200: ev.Summary},
    description="Machines by status (live ones bill their hourly price), the hourly spend of the live ones, "
    "USD spent and saved (hibernated hours at the price of the instance destroyed), stored bytes "
    "and their monthly price at STORAGE_PRICE_GB_MONTH, jobs by status. Per machine: "
    "`costs` in GET /api/instances.",
)
def summary() -> Response:
    c = container()
    return ok(costs.summary(c.session_factory, storage_price_gb_month=c.settings.storage_price_gb_month))


@route(
    bp,
    "/",
    "GET",
    tag=TAG,
    summary="Status page: machines, costs and savings, snapshots, live jobs",
    responses={200: None},
    public=True,
    content_type="text/html",
    description="Readable without a token (it holds no data); it asks for one and keeps it in the browser "
    "tab's sessionStorage.",
)
def status_page() -> Response:
    nonce = secrets.token_urlsafe(16)
    resp = Response(render_template("gpusnap_status.html", nonce=nonce), mimetype="text/html")
    resp.headers["Content-Security-Policy"] = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; connect-src 'self'; "
        "img-src 'self' data:; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["Referrer-Policy"] = "no-referrer"
    resp.headers["Cache-Control"] = "no-store"
    return resp
