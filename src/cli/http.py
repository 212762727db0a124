"""A small client of the gpusnap REST API for the CLI: bearer auth, timeouts, and the API's error body
turned into one exception type. It knows paths and JSON, nothing about commands or output."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote, urlsplit

import requests

DEFAULT_URL = "http://127.0.0.1:5000"
# (connect, read): connecting to a healthy API is instant; a read may wait on a busy database.
DEFAULT_TIMEOUT = (5.0, 30.0)
USER_AGENT = "gpusnap-cli"


class ClientError(Exception):
    """Anything that stops a command from getting an answer. `code` and `message` are for the user."""

    def __init__(self, code: str, message: str, *, status: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status

    @property
    def transient(self) -> bool:
        """Worth retrying while polling: the API was unreachable, overloaded or restarting."""
        return self.status is None or self.status in (429, 502, 503, 504)


class ApiError(ClientError):
    """The API answered with an error (`{"error": {"code", "message"}}`, or something else on a proxy error)."""


class Unreachable(ClientError):
    """No HTTP answer at all: connection refused, DNS failure, timeout."""


def normalise_url(url: str) -> str:
    """`host:port` and trailing slashes are accepted; anything but http(s) is refused."""
    url = url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ClientError("invalid_url", f"{url!r} is not an http:// or https:// URL (set --url or GPUSNAP_URL)")
    return url


def seg(value: str) -> str:
    """One path segment, quoted so that an id can never reach another endpoint."""
    return quote(value, safe="")


class ApiClient:
    """`get`/`post`/`delete` return the decoded JSON body of a 2xx answer or raise `ClientError`."""

    def __init__(self, base_url: str, token: str | None, *, timeout: tuple[float, float] = DEFAULT_TIMEOUT) -> None:
        self.base_url = normalise_url(base_url)
        self.timeout = timeout
        self._session = requests.Session()
        self._session.headers["User-Agent"] = USER_AGENT
        self._session.headers["Accept"] = "application/json"
        if token:
            self._session.headers["Authorization"] = f"Bearer {token}"

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        clean = {k: v for k, v in (params or {}).items() if v is not None}
        return self._request("GET", path, params=clean)

    def post(self, path: str, body: dict[str, Any] | None = None, *, idempotency_key: str | None = None) -> Any:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", path, json=body if body is not None else {}, headers=headers)

    def put(self, path: str, body: dict[str, Any]) -> Any:
        return self._request("PUT", path, json=body)

    def delete(self, path: str, *, idempotency_key: str | None = None) -> Any:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("DELETE", path, headers=headers)

    def open_events(
        self, params: dict[str, Any], *, last_event_id: str | None = None, read_timeout: float = 45.0
    ) -> requests.Response:
        """`GET /api/events` as an open streaming response (the caller reads and closes it); resumes after
        `last_event_id`. Raises ClientError when the server refuses or lacks the stream."""
        headers = {"Accept": "text/event-stream"}
        if last_event_id is not None:
            headers["Last-Event-ID"] = last_event_id
        return self._request(
            "GET",
            "/api/events",
            params=params,
            headers=headers,
            stream=True,
            timeout=(self.timeout[0], read_timeout),
            raw=True,
        )

    def close(self) -> None:
        self._session.close()

    def _request(self, method: str, path: str, *, raw: bool = False, **kwargs: Any) -> Any:
        url = self.base_url + path
        kwargs.setdefault("timeout", self.timeout)
        try:
            resp = self._session.request(method, url, **kwargs)
        except requests.ConnectionError as e:
            raise Unreachable(
                "unreachable",
                f"cannot connect to the gpusnap API at {self.base_url} "
                f"({_reason(e)}); is it running? set --url or GPUSNAP_URL",
            ) from None
        except requests.Timeout:
            raise Unreachable(
                "timeout",
                f"the gpusnap API at {self.base_url} did not answer {method} {path} within {kwargs['timeout'][1]:g}s",
            ) from None
        except requests.RequestException as e:
            raise Unreachable("request_failed", f"{method} {url}: {e}") from None
        if resp.status_code >= 400:
            raise _api_error(resp)
        if raw:
            return resp
        if resp.status_code == 204 or not resp.content:
            return None
        try:
            return resp.json()
        except ValueError:
            raise ApiError(
                "bad_response",
                f"{method} {path} answered {resp.status_code} with a body that is not JSON: {resp.text[:200]!r}",
                status=resp.status_code,
            ) from None


def _api_error(resp: requests.Response) -> ApiError:
    try:
        error = resp.json()["error"]
        code, message = str(error["code"]), str(error.get("message", ""))
    except (ValueError, KeyError, TypeError):
        # Not our error body: a proxy or load balancer answered. Show what it said, briefly.
        code, message = f"http_{resp.status_code}", (resp.text.strip()[:200] or resp.reason or "")
    if resp.status_code == 401:
        message += " (set GPUSNAP_TOKEN or pass --token)"
    return ApiError(code, message, status=resp.status_code)


def _reason(error: requests.ConnectionError) -> str:
    # requests nests the socket error several levels deep; the innermost text is the useful one.
    text = str(error)
    for marker in (
        "Connection refused",
        "Name or service not known",
        "No route to host",
        "Temporary failure in name resolution",
        "Network is unreachable",
        "timed out",
    ):
        if marker in text:
            return marker.lower()
    return "connection failed"
