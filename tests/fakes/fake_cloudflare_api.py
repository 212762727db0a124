"""A fake of the one Cloudflare API call gpusnap makes: R2 "Create Temporary Access Credentials".

A real HTTP server (werkzeug, threaded, loopback). It follows the published contract:
- POST {base}/accounts/{account_id}/r2/temp-access-credentials, `Authorization: Bearer <API token>`
  (developers.cloudflare.com/api/resources/r2/subresources/temporary_credentials/methods/create/).
- Body: `bucket`, `parentAccessKeyId`, `permission` (one of admin-read-write, admin-read-only,
  object-read-write, object-read-only) and `ttlSeconds` (a number, at most 604800) are required;
  `prefixes` and `objects` are optional arrays of strings (the TemporaryCredential model of the official
  TypeScript/Go SDKs, cloudflare-typescript src/resources/r2/temporary-credentials.ts).
- Answers use the v4 envelope `{"result", "success", "errors": [{"code", "message"}], "messages"}`; a
  missing or wrong token is 403 with error 10000 "Authentication error" (the v4 API's authentication
  failure); success wraps `{accessKeyId, secretAccessKey, sessionToken}` in `result`
  (developers.cloudflare.com/r2/examples/authenticate-r2-temp-credentials/).
Unknown account ids and buckets are refused, and a parent key other than the account's is refused, as
the real API can only sign with a key it holds. `on_mint(creds, body)` lets a test make the minted key
real on its S3 stand-in (tests/support/s3_server.py `add_identity`).
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

PERMISSIONS = ("admin-read-write", "admin-read-only", "object-read-write", "object-read-only")
MAX_TTL_S = 604_800


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        """Tests read `FakeCloudflareApi.minted`; request lines on stderr would be noise."""


@dataclass
class Minted:
    body: dict[str, Any]
    access_key: str
    secret_key: str
    session_token: str


@dataclass
class FakeCloudflareApi:
    account_id: str
    api_token: str
    bucket: str
    parent_access_key: str
    on_mint: Callable[[Minted], None] | None = None
    minted: list[Minted] = field(default_factory=list)
    refusals: list[tuple[int, str]] = field(default_factory=list)
    fail_next: int = 0  # answer this many requests with 500 (an outage), then work again

    def __post_init__(self) -> None:
        self._server = make_server("127.0.0.1", 0, self._wsgi, threaded=True, request_handler=_QuietHandler)
        self.base_url = f"http://127.0.0.1:{self._server.server_port}/client/v4"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._lock = threading.Lock()

    def start(self) -> FakeCloudflareApi:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()

    def __enter__(self) -> FakeCloudflareApi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the endpoint ---------------------------------------------------------------------------
    def _wsgi(self, environ: dict, start_response: Callable) -> Any:
        request = Request(environ)
        return self._answer(request)(environ, start_response)

    def _answer(self, request: Request) -> Response:
        path = f"/client/v4/accounts/{self.account_id}/r2/temp-access-credentials"
        if request.path != path:
            return self._error(
                404, 7003, "Could not route to %s, perhaps your object identifier is invalid?" % request.path
            )
        if request.method != "POST":
            return self._error(405, 10405, "Method not allowed")
        if request.headers.get("Authorization") != f"Bearer {self.api_token}":
            return self._error(403, 10000, "Authentication error")
        with self._lock:
            if self.fail_next > 0:
                self.fail_next -= 1
                return self._error(500, 10001, "Internal error")
        try:
            body = json.loads(request.get_data(as_text=True))
        except ValueError:
            return self._error(400, 10026, "Request body is not valid JSON")
        problem = _invalid(body)
        if problem:
            return self._error(400, 10026, problem)
        if body["bucket"] != self.bucket:
            return self._error(404, 10006, "The specified bucket does not exist.")
        if body["parentAccessKeyId"] != self.parent_access_key:
            return self._error(400, 10026, "parentAccessKeyId does not name an access key of this account")
        minted = Minted(
            body=body,
            access_key="TMP" + secrets.token_hex(10).upper(),
            secret_key=secrets.token_hex(32),
            session_token=secrets.token_urlsafe(48),
        )
        if self.on_mint is not None:
            self.on_mint(minted)
        with self._lock:
            self.minted.append(minted)
        return _json(
            200,
            {
                "result": {
                    "accessKeyId": minted.access_key,
                    "secretAccessKey": minted.secret_key,
                    "sessionToken": minted.session_token,
                },
                "success": True,
                "errors": [],
                "messages": [],
            },
        )

    def _error(self, status: int, code: int, message: str) -> Response:
        with self._lock:
            self.refusals.append((status, message))
        return _json(
            status, {"result": None, "success": False, "errors": [{"code": code, "message": message}], "messages": []}
        )


def _invalid(body: Any) -> str | None:
    """Why `body` does not match the TemporaryCredential model, or None."""
    if not isinstance(body, dict):
        return "the body must be a JSON object"
    for name in ("bucket", "parentAccessKeyId", "permission"):
        if not isinstance(body.get(name), str) or not body[name]:
            return f"{name} is required and must be a string"
    if body["permission"] not in PERMISSIONS:
        return f"permission must be one of {', '.join(PERMISSIONS)}"
    ttl = body.get("ttlSeconds")
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl <= 0 or ttl > MAX_TTL_S:
        return f"ttlSeconds is required and must be a number of seconds up to {MAX_TTL_S}"
    for name in ("prefixes", "objects"):
        if name in body and (not isinstance(body[name], list) or not all(isinstance(v, str) for v in body[name])):
            return f"{name} must be an array of strings"
    return None


def _json(status: int, payload: dict[str, Any]) -> Response:
    return Response(json.dumps(payload), status=status, mimetype="application/json")
