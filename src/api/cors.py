"""CORS for an allow-list of browser origins (CORS_ORIGINS, none by default). A dashboard served from an
allowed origin may call the API with its bearer token and read the headers it needs: `Location` of a
202, `Idempotency-Key`, and the rate-limit headers. Any other origin gets no CORS headers (the browser
then hides the answer from the page), and its preflights are refused outright."""

from __future__ import annotations

from flask import Flask, Response, current_app, request

from src.api.errors import error_response

ALLOW_METHODS = "GET, POST, PUT, DELETE, OPTIONS"
ALLOW_HEADERS = "Authorization, Content-Type, Idempotency-Key, Last-Event-ID"
EXPOSE_HEADERS = (
    "Location, Idempotency-Key, Retry-After, RateLimit, RateLimit-Policy, RateLimit-Limit, "
    "RateLimit-Remaining, RateLimit-Reset, X-RateLimit-Limit, X-RateLimit-Remaining, X-RateLimit-Reset"
)
PREFLIGHT_MAX_AGE_S = 600


def _allowed(origin: str | None) -> bool:
    # Exact match only (scheme, host and port): no wildcards, no suffix matching an attacker could meet.
    return origin is not None and origin.rstrip("/") in current_app.extensions["gpusnap"].settings.cors_origins


def install_cors(app: Flask) -> None:
    """Register before auth: a preflight carries no token, so it is answered here."""

    @app.before_request
    def _preflight() -> Response | None:
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return None
        origin = request.headers.get("Origin")
        if not _allowed(origin):
            return error_response(
                403,
                "cors_origin_not_allowed",
                f"origin {origin!r} is not in CORS_ORIGINS; no cross-origin calls from it",
            )
        resp = Response(status=204)
        resp.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
        resp.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
        resp.headers["Access-Control-Max-Age"] = str(PREFLIGHT_MAX_AGE_S)
        return resp

    @app.after_request
    def _cors_headers(resp: Response) -> Response:
        origin = request.headers.get("Origin")
        if current_app.extensions["gpusnap"].settings.cors_origins:
            resp.vary.add("Origin")  # caches must not hand one origin's answer to another
        if _allowed(origin):
            resp.headers["Access-Control-Allow-Origin"] = origin.rstrip("/")  # type: ignore[union-attr]
            resp.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        return resp
