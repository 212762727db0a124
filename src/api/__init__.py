"""The HTTP API: blueprints per resource, auth, error rendering, request metrics."""

from __future__ import annotations

import time

from flask import Flask, Response, g, request

from src.api import dashboard, events, instances, jobs, maintenance, meta, policies, snapshots
from src.api.auth import install_auth
from src.api.cors import install_cors
from src.api.errors import register_error_handlers


def register_api(app: Flask) -> None:
    for module in (meta, snapshots, jobs, instances, maintenance, policies, events, dashboard):
        app.register_blueprint(module.bp)
    register_error_handlers(app)
    _install_request_metrics(app)  # before auth, so that refused requests are counted too
    install_cors(app)  # before auth: preflights carry no token, and a 401 needs CORS headers to be readable
    install_auth(app)


def _install_request_metrics(app: Flask) -> None:
    @app.before_request
    def _start_timer() -> None:
        g.request_started = time.perf_counter()

    @app.after_request
    def _observe(resp: Response) -> Response:
        started = g.get("request_started")
        if started is not None:
            metrics = app.extensions["gpusnap"].metrics
            route_name = request.url_rule.rule if request.url_rule else "unmatched"
            metrics.http_requests.labels(request.method, route_name, str(resp.status_code)).inc()
            metrics.http_latency.labels(request.method, route_name).observe(time.perf_counter() - started)
        return resp
