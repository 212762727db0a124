"""The one place errors become HTTP answers: `{"error": {"code", "message"}}`, never a stack trace."""

from __future__ import annotations

import logging

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from src.errors import GpusnapError

logger = logging.getLogger(__name__)

_HTTP_CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
}


def error_response(status: int, code: str, message: str, details: list | None = None) -> Response:
    body: dict = {"code": code, "message": message}
    if details:
        body["details"] = details
    resp = jsonify({"error": body})
    resp.status_code = status
    if status == 401:
        resp.headers["WWW-Authenticate"] = 'Bearer realm="gpusnap"'
    return resp


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(GpusnapError)
    def _domain(e: GpusnapError) -> Response:
        status = e.http_status if e.http_status < 500 or e.http_status in (502, 503) else 500
        if status >= 500:
            logger.warning("%s %s failed: %s: %s", request.method, request.path, e.code, e.message)
        return error_response(status, e.code, e.message, getattr(e, "details", None))

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException) -> Response:
        status = e.code or 500
        message = {
            413: f"the request body is larger than {app.config.get('MAX_CONTENT_LENGTH')} bytes",
            404: "no such resource",
            405: f"{request.method} is not allowed here",
        }.get(status, e.description or "")
        return error_response(status, _HTTP_CODES.get(status, "http_error"), message)

    @app.errorhandler(Exception)
    def _unexpected(e: Exception) -> Response:
        logger.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error; the server log has the details")
