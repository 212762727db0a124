"""Bearer-token auth, deny by default: every endpoint needs a token unless its route says `public=True`.
Unknown paths need one too, so that probing without a token learns nothing."""

from __future__ import annotations

from flask import Flask, current_app, request

from src.errors import Unauthorized
from src.services.stream_tokens import use_stream_token


def install_auth(app: Flask) -> None:
    @app.before_request
    def _require_token() -> None:
        view = current_app.view_functions.get(request.endpoint or "")
        spec = getattr(view, "gpusnap_route", None)
        if spec is not None and spec.public:
            return
        if spec is not None and spec.stream_token and "token" in request.args:
            # EventSource cannot send headers: this one route takes a short-lived stream token in the URL.
            # Nowhere else is `?token=` looked at, so a stream token opens nothing but the event stream.
            if not use_stream_token(current_app.extensions["gpusnap"].session_factory, request.args["token"]):
                raise Unauthorized(
                    "the stream token is not valid, has expired or was used; get a new one from "
                    "POST /api/stream-tokens",
                    code="invalid_stream_token",
                )
            return
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("send 'Authorization: Bearer <token>'", code="unauthorized")
        if not current_app.extensions["gpusnap.tokens"].verify(token.strip()):
            raise Unauthorized("the bearer token is not valid", code="invalid_token")
