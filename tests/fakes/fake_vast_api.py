"""A fake vast.ai REST API: a real HTTP server (werkzeug, threaded, on a loopback port) answering the
endpoints `src/adapters/vast.py` calls. This module is the HTTP side: the server, the API key check,
routing, the call log and the transport-level switches (429s, 5xx, slow answers). The offers, the
instances and the switches that make instances misbehave are in `fake_vast_market.py`; `FakeVastApi`
is that market served over HTTP, so tests flip every switch on one object. Instances it rents point
whichever SSH endpoint their runtype makes live (direct mapping or proxy) at `ssh_endpoint` (the tests'
loopback sshd), the other at a dead port. Like vast.ai, it enforces a minimum interval between calls
to each endpoint (429 "API requests too frequent", no Retry-After), scaled by `rate_limit_scale`.
Shapes and switches are described in docs/vast.md."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from typing import Any

from werkzeug.exceptions import HTTPException, NotFound
from werkzeug.routing import Map, Rule
from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

from tests.fakes.fake_vast_market import Answer, FakeVastMarket, default_offers

__all__ = ["Call", "FakeVastApi", "default_offers"]


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:
        """Tests assert on `FakeVastApi.calls`; a line per request on stderr would only be noise."""


@dataclass(frozen=True)
class Call:
    method: str
    path: str
    query: dict[str, str]
    json: Any
    status: int


@dataclass
class _Fault:
    remaining: int
    status: int = 500
    method: str | None = None
    path_prefix: str | None = None
    seconds: float = 0.0  # for slow calls: sleep this long, then answer normally

    def matches(self, method: str, path: str) -> bool:
        return (
            self.remaining > 0
            and (self.method is None or self.method == method)
            and (self.path_prefix is None or path.startswith(self.path_prefix))
        )


# Minimum seconds between two accepted calls to an endpoint ("Rate Limits and Errors": per endpoint and
# identity, a minimum interval; 429 otherwise). The figures are each OpenAPI file's `x-rateLimit`
# (auto_post_api_v0_bundles_32b4bb.yaml threshold 2, auto_put_api_v0_asks_id_6ec785.yaml 4.5,
# auto_get_api_v0_instances_id_4ff617.yaml 2, auto_put_… 1, auto_delete_… 3, auto_get_api_v1_instances_7c2781.yaml 1)
# and "Rate Limits by Endpoint and Method" (GET /api/v0/instances/ 0.5 token/s). A refused call costs no token
# (penalty 0 in that table), so it does not push the next allowed moment back.
MIN_INTERVAL_S = {
    "search": 2.0,
    "create": 4.5,
    "show": 2.0,
    "update": 1.0,
    "destroy": 3.0,
    "list_v1": 1.0,
    "list_v0": 2.0,
}
# Tests would take minutes at vast.ai's pace; the default keeps the shape (which calls collide) at 1/100 speed.
DEFAULT_RATE_LIMIT_SCALE = 0.01

_URLS = Map(
    [
        Rule("/api/v0/bundles/", endpoint="search", methods=["POST"]),
        Rule("/api/v0/asks/<int:offer_id>/", endpoint="create", methods=["PUT"]),
        Rule("/api/v0/instances/", endpoint="list_v0", methods=["GET"]),
        Rule("/api/v0/instances/<int:iid>/", endpoint="show", methods=["GET"]),
        Rule("/api/v0/instances/<int:iid>/", endpoint="update", methods=["PUT"]),
        Rule("/api/v0/instances/<int:iid>/", endpoint="destroy", methods=["DELETE"]),
        Rule("/api/v1/instances/", endpoint="list_v1", methods=["GET"]),
    ]
)


class FakeVastApi(FakeVastMarket):
    """Start with `start()` (or use as a context manager); `base_url` and `api_key` are what a
    `VastClient` needs. The market's switches and assertions (`stay_loading`, `live_instances`...) are
    inherited; the ones here act on calls before they reach it."""

    def __init__(
        self,
        *,
        api_key: str = "fake-vast-key",
        ssh_endpoint: tuple[str, int] = ("127.0.0.1", 22),
        offers: list[dict[str, Any]] | None = None,
        polls_until_running: int = 1,
        seconds_until_running: float | None = None,
        page_size: int = 25,
        host: str = "127.0.0.1",
        rate_limit_scale: float = DEFAULT_RATE_LIMIT_SCALE,
    ) -> None:
        super().__init__(
            ssh_endpoint=ssh_endpoint,
            offers=offers,
            polls_until_running=polls_until_running,
            seconds_until_running=seconds_until_running,
            page_size=page_size,
        )
        self.api_key = api_key
        self.calls: list[Call] = []
        self._host = host
        self._rate_limited = 0
        self._retry_after: str | None = "0"
        self._faults: list[_Fault] = []
        self._slow: list[_Fault] = []
        self.rate_limit_scale = rate_limit_scale  # 0 turns the minimum intervals off
        self._last_accepted: dict[str, float] = {}
        self._server: Any = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        assert self._server is not None, "start() the fake first"
        return f"http://{self._host}:{self._server.server_port}"

    def start(self) -> FakeVastApi:
        self._server = make_server(self._host, 0, self._wsgi, threaded=True, request_handler=_QuietHandler)
        server = self._server  # a short poll interval makes stop() (and so each test's teardown) quick
        self._thread = threading.Thread(
            target=lambda: server.serve_forever(poll_interval=0.02), name="fake-vast-api", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> FakeVastApi:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- switches on calls (tests call these) ---------------------------------------------------

    def rate_limit_next(self, n: int, *, retry_after: str | None = "0") -> None:
        """Answer the next `n` calls 429 ("API requests too frequent"); `retry_after=None` sends no
        Retry-After header, which is what vast.ai itself does today."""
        with self._lock:
            self._rate_limited, self._retry_after = n, retry_after

    def fail_next(
        self, n: int, *, status: int = 500, method: str | None = None, path_prefix: str | None = None
    ) -> None:
        """Answer the next `n` matching calls with `status` and do nothing else."""
        with self._lock:
            self._faults.append(_Fault(remaining=n, status=status, method=method, path_prefix=path_prefix))

    def fail_next_destroys(self, n: int, *, status: int = 500) -> None:
        self.fail_next(n, status=status, method="DELETE", path_prefix="/api/v0/instances/")

    def slow_next(self, n: int, *, seconds: float, method: str | None = None, path_prefix: str | None = None) -> None:
        """Sleep `seconds` before answering the next `n` matching calls (to outlast a client's timeout)."""
        with self._lock:
            self._slow.append(_Fault(remaining=n, seconds=seconds, method=method, path_prefix=path_prefix))

    def calls_to(self, method: str, path_prefix: str = "") -> list[Call]:
        with self._lock:
            return [c for c in self.calls if c.method == method and c.path.startswith(path_prefix)]

    # -- HTTP -----------------------------------------------------------------------------------

    def _wsgi(self, environ: dict[str, Any], start_response: Any) -> Any:
        request = Request(environ)
        body = request.get_json(silent=True)
        with self._lock:
            slow = next((f for f in self._slow if f.matches(request.method, request.path)), None)
            if slow is not None:
                slow.remaining -= 1
        if slow is not None:
            time.sleep(slow.seconds)  # outside the lock: other calls go on meanwhile
        with self._lock:
            response = self._respond(request, body)
            self.calls.append(Call(request.method, request.path, dict(request.args), body, response.status_code))
        return response(environ, start_response)

    def _respond(self, request: Request, body: Any) -> Response:
        key = request.args.get("api_key")
        auth = request.headers.get("Authorization", "")
        if auth != f"Bearer {self.api_key}" and key != self.api_key:
            return _response(
                (401, {"success": False, "error": "auth_error", "msg": "Unauthenticated or blacklisted user."})
            )
        if self._rate_limited > 0:
            self._rate_limited -= 1
            headers = {"Retry-After": self._retry_after} if self._retry_after is not None else {}
            return Response("API requests too frequent", status=429, headers=headers, mimetype="text/plain")
        fault = next((f for f in self._faults if f.matches(request.method, request.path)), None)
        if fault is not None:
            fault.remaining -= 1
            return _response((fault.status, "Internal Server Error"))
        try:
            endpoint, args = _URLS.bind_to_environ(request.environ).match()
        except NotFound:
            return _response((404, {"success": False, "error": "not_found", "msg": "no such endpoint"}))
        except HTTPException as exc:
            return _response((exc.code or 400, {"success": False, "error": "bad_request", "msg": exc.description}))
        interval = MIN_INTERVAL_S.get(endpoint, 0.0) * self.rate_limit_scale
        now = time.monotonic()
        if interval and now - self._last_accepted.get(endpoint, -1e9) < interval:
            return Response("API requests too frequent", status=429, mimetype="text/plain")
        self._last_accepted[endpoint] = now
        answers = {
            "search": lambda: self.answer_search(body),
            "create": lambda: self.answer_create(args["offer_id"], body),
            "list_v0": self.answer_list_v0,
            "show": lambda: self.answer_show(args["iid"]),
            "update": lambda: self.answer_update(args["iid"], body),
            "destroy": lambda: self.answer_destroy(args["iid"]),
            "list_v1": lambda: self.answer_list_v1(request.args),
        }
        return _response(answers[endpoint]())


def _response(answer: Answer) -> Response:
    status, body = answer
    if isinstance(body, str):
        return Response(body, status=status, mimetype="text/plain")
    return Response(json.dumps(body), status=status, mimetype="application/json")
