"""vast.ai as the control plane sees it: find an offer, rent it, watch it come up, stop, start, destroy.
One `VastClient` over `requests` with timeouts on every call, retries with backoff for what may pass
(429, 5xx, connection errors), and vast.ai's answers turned into our records and errors. Request and
answer shapes live in `vast_models.py`; what was checked against vast.ai's documentation is in docs/vast.md."""

from __future__ import annotations

import logging
import random
import time
from email.utils import parsedate_to_datetime
from typing import Any

import requests
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from src.adapters.vast_models import (
    MAX_LABEL_CHARS,
    Instance,
    Offer,
    SshEndpoint,
    build_offer_query,
    normalize_gpu_name,
    region_country_codes,
)
from src.errors import ExternalError

logger = logging.getLogger(__name__)

__all__ = [
    "Instance",
    "Offer",
    "SshEndpoint",
    "VastAuthError",
    "VastClient",
    "VastError",
    "VastUnavailable",
    "build_offer_query",
    "normalize_gpu_name",
    "region_country_codes",
]

V1_PAGE_LIMIT = 25  # the most /api/v1/instances/ gives per page
MAX_PAGES = 400  # 10,000 instances: far past any account of ours; stops a server that loops its token
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 60.0


class VastError(ExternalError):
    """vast.ai refused or failed a call. `status` is the HTTP status (None without an answer), `vast_error`
    vast.ai's own error code ("no_such_ask", "invalid_args"...), and `instance_id` a contract the failed
    call may have left behind (a create that answered `success: false` still names it) so callers can
    destroy it."""

    code = "vast_error"

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        retryable: bool = False,
        status: int | None = None,
        vast_error: str | None = None,
        instance_id: int | None = None,
    ) -> None:
        super().__init__(message, code=code, retryable=retryable)
        self.status = status
        self.vast_error = vast_error
        self.instance_id = instance_id


class VastAuthError(VastError):
    """The API key was refused (401/403). Retrying will not help."""

    code = "vast_auth_failed"


class VastUnavailable(VastError):
    """vast.ai did not answer usefully (timeouts, connection errors, 5xx, rate limits) after all retries."""

    code = "vast_unavailable"

    def __init__(self, message: str, **kwargs: Any) -> None:
        kwargs.setdefault("retryable", True)
        super().__init__(message, **kwargs)


def _body(response: requests.Response) -> dict[str, Any]:
    # vast.ai answers errors as JSON mostly, but 429s and proxies' 5xx pages can be plain text or HTML.
    try:
        data = response.json()
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _vast_message(response: requests.Response) -> tuple[str | None, str]:
    data = _body(response)
    text = data.get("msg") or data.get("message") or data.get("error") or response.text[:200].strip()
    return data.get("error"), text or response.reason or "no message"


def _retry_after_s(response: requests.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


def _never_sent(exc: requests.RequestException) -> bool:
    """True when the request cannot have reached vast.ai (no connection was made), so even a call that
    is not idempotent may be sent again."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    if isinstance(exc, requests.ConnectionError):
        reason = getattr(exc.args[0], "reason", None) if exc.args else None
        return isinstance(reason, (NewConnectionError, ConnectTimeoutError))
    return False


class VastClient:
    """The vast.ai REST API for one account. Every method raises `VastAuthError` for a refused key,
    `VastUnavailable` when vast.ai cannot be reached or keeps failing, and `VastError` for other refusals.
    Thread-safe as far as the `requests.Session` given is (the default one is private to this client)."""

    def __init__(
        self,
        api_key: str,
        base_url: str = "https://console.vast.ai",
        *,
        timeout: tuple[float, float] = (5, 30),
        max_retries: int = 5,
        backoff_base: float = 0.5,
        session: requests.Session | None = None,
    ) -> None:
        self._api_key = api_key
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self._session = session or requests.Session()

    def __repr__(self) -> str:  # never shows the key
        return f"VastClient(base_url={self.base_url!r})"

    # -- offers ---------------------------------------------------------------------------------

    def search_offers(
        self,
        *,
        gpu_name: str | None = None,
        num_gpus: int = 1,
        region: str | None = None,
        max_price_per_hour: float | None = None,
        min_disk_gb: float | None = None,
        min_reliability: float | None = 0.95,
        min_inet_down_mbps: float | None = None,
        verified: bool = True,
        limit: int = 20,
        min_direct_ports: int | None = None,
        min_cuda: float | None = None,
    ) -> list[Offer]:
        """Rentable on-demand offers matching the filters, cheapest (`dph_total`) first. Read-only, so
        retried freely. Raises `InvalidRequest` for bad filters (an unknown region...) before any call.
        Pass `min_direct_ports=1` when renting with a `*_direct` runtype: hosts without direct ports only
        offer vast.ai's proxy."""
        query = build_offer_query(
            gpu_name=gpu_name,
            num_gpus=num_gpus,
            region=region,
            max_price_per_hour=max_price_per_hour,
            min_disk_gb=min_disk_gb,
            min_reliability=min_reliability,
            min_inet_down_mbps=min_inet_down_mbps,
            verified=verified,
            limit=limit,
            min_direct_ports=min_direct_ports,
            min_cuda=min_cuda,
        )
        response = self._call("POST", "/api/v0/bundles/", json=query)
        self._raise_for_refusal(response, what="search offers")
        offers = [Offer.from_api(o) for o in _body(response).get("offers") or []]
        # vast.ai orders by the query's `order`; sorting again costs nothing and makes "cheapest first" ours.
        return sorted(offers, key=lambda o: (o.dph_total is None, o.dph_total or 0.0))

    # -- instances ------------------------------------------------------------------------------

    def create_instance(
        self,
        offer_id: int,
        *,
        image: str,
        disk_gb: float,
        label: str,
        onstart: str | None = None,
        env: dict[str, str] | None = None,
        runtype: str = "ssh",
    ) -> int:
        """Rent offer `offer_id` and return the new instance id. NOT idempotent: every success is a new
        paid contract. So it is retried only when vast.ai cannot have acted on it (429, or no connection
        made); a timeout or 5xx after sending raises `VastUnavailable` at once, because a contract may
        exist anyway: find it with `list_instances(label_prefix=label)` before renting again. A
        `success: false` answer raises `VastError` whose `instance_id` is the contract it left, if named.
        `env` is vast.ai's JSON object form: variables, and `"-p 8000:8000": "1"` keys for ports.
        A label longer than vast.ai takes raises `VastError` (code `label_too_long`) before any call; an
        offer taken meanwhile raises `VastError` with status 404/410 and vast_error `no_such_ask`."""
        if len(label) > MAX_LABEL_CHARS:
            raise VastError(
                f"rental label is {len(label)} characters; vast.ai takes at most {MAX_LABEL_CHARS}",
                code="label_too_long",
            )
        body: dict[str, Any] = {
            "client_id": "me",
            "image": image,
            "disk": disk_gb,
            "label": label,
            "runtype": runtype,
            "env": dict(env or {}),
        }
        if onstart is not None:
            body["onstart"] = onstart
        response = self._call("PUT", f"/api/v0/asks/{int(offer_id)}/", json=body, idempotent=False)
        self._raise_for_refusal(response, what=f"rent offer {offer_id}")
        data = _body(response)
        contract = data.get("new_contract")
        contract_id = int(contract) if isinstance(contract, (int, str)) and str(contract).isdigit() else None
        if data.get("success") is not True or contract_id is None:
            error, message = _vast_message(response)
            raise VastError(
                f"vast.ai did not rent offer {offer_id}: {message}",
                status=response.status_code,
                vast_error=error,
                instance_id=contract_id,
            )
        logger.info("vast.ai rented offer %s as instance %s (label %r)", offer_id, contract_id, label)
        return contract_id

    def show_instance(self, instance_id: int) -> Instance | None:
        """The instance, or None when vast.ai has no such instance (never existed, or destroyed).
        Read-only, so retried freely."""
        response = self._call("GET", f"/api/v0/instances/{int(instance_id)}/")
        if response.status_code == 404:
            return None
        self._raise_for_refusal(response, what=f"show instance {instance_id}")
        data = _body(response).get("instances")
        # The answer names its object "instances" (plural) and gives null for an unknown id; tolerate the
        # one-element list older servers sent.
        if isinstance(data, list) and len(data) == 1:
            data = data[0]
        return Instance.from_api(data) if isinstance(data, dict) and data.get("id") is not None else None

    def list_instances(self, *, label_prefix: str | None = None) -> list[Instance]:
        """Every instance on the account (following `/api/v1/instances/` pages through `next_token`),
        keeping those whose label starts with `label_prefix` when given (the API filters labels only by
        equality, so the prefix is matched here). Read-only, so retried freely."""
        instances: list[Instance] = []
        token: str | None = None
        seen: set[str] = set()
        for _ in range(MAX_PAGES):
            params: dict[str, Any] = {"limit": V1_PAGE_LIMIT}
            if token:
                params["after_token"] = token
            response = self._call("GET", "/api/v1/instances/", params=params)
            self._raise_for_refusal(response, what="list instances")
            data = _body(response)
            instances.extend(Instance.from_api(row) for row in data.get("instances") or [] if row.get("id"))
            token = data.get("next_token") or None
            if not token:
                break
            if token in seen:
                raise VastError("vast.ai repeated a pagination token while listing instances")
            seen.add(token)
        else:
            raise VastError(f"vast.ai listed more than {MAX_PAGES} pages of instances")
        if label_prefix is not None:
            instances = [i for i in instances if (i.label or "").startswith(label_prefix)]
        return instances

    def stop_instance(self, instance_id: int) -> None:
        """Ask vast.ai to stop the instance (GPU released, disk kept and billed). Idempotent."""
        self._set_state(instance_id, "stopped")

    def start_instance(self, instance_id: int) -> None:
        """Ask vast.ai to start a stopped instance. Idempotent. Raises `VastError` (retryable, vast_error
        `resources_unavailable`) when the machine's GPUs are taken; vast.ai queues the start meanwhile."""
        self._set_state(instance_id, "running")

    def destroy_instance(self, instance_id: int) -> None:
        """Destroy the instance and its disk, ending all billing. Idempotent: an instance vast.ai does
        not know (404, `no_such_instance`) counts as destroyed. vast.ai may still list it for a short
        while; callers that must see it gone poll `show_instance` until None."""
        response = self._call("DELETE", f"/api/v0/instances/{int(instance_id)}/")
        if response.status_code == 404 or _body(response).get("error") == "no_such_instance":
            logger.info("vast.ai instance %s already gone", instance_id)
            return
        self._raise_for_refusal(response, what=f"destroy instance {instance_id}")
        logger.info("vast.ai instance %s destroyed", instance_id)

    def _set_state(self, instance_id: int, state: str) -> None:
        response = self._call("PUT", f"/api/v0/instances/{int(instance_id)}/", json={"state": state})
        self._raise_for_refusal(response, what=f"set instance {instance_id} {state}")
        data = _body(response)
        if data.get("success") is False:
            error, message = _vast_message(response)
            raise VastError(
                f"vast.ai did not set instance {instance_id} {state}: {message}",
                status=response.status_code,
                vast_error=error,
                retryable=error == "resources_unavailable",
            )

    # -- HTTP -----------------------------------------------------------------------------------

    def _raise_for_refusal(self, response: requests.Response, *, what: str) -> None:
        if response.status_code < 400:
            return
        error, message = _vast_message(response)
        # vast.ai names an over-long label only in `msg` (OpenAPI `auto_put_api_v0_instances_id_4ff617.yaml`).
        code = "label_too_long" if message == "label_too_long" else None
        raise VastError(
            f"vast.ai refused to {what} (HTTP {response.status_code}): {message}",
            code=code,
            status=response.status_code,
            vast_error=error,
        )

    def _backoff_s(self, attempt: int) -> float:
        # Exponential with jitter, so many workers retrying at once do not hit vast.ai in step.
        return min(MAX_BACKOFF_S, self.backoff_base * 2**attempt) * random.uniform(0.5, 1.0)

    def _call(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        idempotent: bool = True,
    ) -> requests.Response:
        """One API call with retries. Returns any answer that is not retryable and not an auth failure
        (callers read 2xx and 4xx bodies); raises `VastAuthError` or `VastUnavailable`."""
        url = self.base_url + path
        headers = {"Authorization": f"Bearer {self._api_key}", "Accept": "application/json"}
        last: str = "no attempt made"
        status: int | None = None
        for attempt in range(self.max_retries + 1):
            if attempt:
                logger.warning("vast.ai %s %s: %s; retry %d of %d", method, path, last, attempt, self.max_retries)
            delay: float | None = None
            try:
                response = self._session.request(
                    method, url, json=json, params=params, headers=headers, timeout=self.timeout
                )
            except requests.RequestException as exc:
                last, status = f"{type(exc).__name__}: {exc}", None
                if not (idempotent or _never_sent(exc)):
                    raise VastUnavailable(
                        f"vast.ai {method} {path} failed after sending ({last}); it may have acted on it", status=None
                    ) from exc
            else:
                status = response.status_code
                logger.debug("vast.ai %s %s -> %d", method, path, status)
                if status in (401, 403):
                    _, message = _vast_message(response)
                    raise VastAuthError(f"vast.ai refused the API key (HTTP {status}): {message}", status=status)
                if status == 429:
                    last, delay = "rate limited (HTTP 429)", _retry_after_s(response)
                elif status >= 500:
                    last = f"HTTP {status}"
                    if not idempotent:
                        raise VastUnavailable(
                            f"vast.ai {method} {path} answered HTTP {status}; it may have acted on it", status=status
                        )
                else:
                    return response
            if attempt < self.max_retries:
                time.sleep(self._backoff_s(attempt) if delay is None else delay)
        raise VastUnavailable(
            f"vast.ai {method} {path} failed {self.max_retries + 1} times; last: {last}", status=status
        )
