"""Bearer-token auth, deny by default: every endpoint needs a token unless its route says `public=True`.
Unknown paths need one too, so that probing without a token learns nothing."""
from __future__ import annotations

from flask import Flask, current_app, request

from src.errors import Unauthorized


def install_auth(app: Flask) -> None:
    @app.before_request
    def _require_token() -> None:
        view = current_app.view_functions.get(request.endpoint or "")
        spec = getattr(view, "gpusnap_route", None)
        if spec is not None and spec.public:
            return
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("send 'Authorization: Bearer <token>'", code="unauthorized")
        if not current_app.extensions["gpusnap.tokens"].verify(token.strip()):
            raise Unauthorized("the bearer token is not valid", code="invalid_token")
