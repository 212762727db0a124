"""The state behind the fake vast.ai API (`fake_vast_api.py` serves it over HTTP): offers, rented
instances and their life cycle, the switches that make instances misbehave the ways vast.ai's do, and
each endpoint's answer as a (status, body) pair in vast.ai's shapes. No HTTP here."""
from __future__ import annotations

import base64
import collections
import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# (HTTP status, body): a str body is sent as text/plain, anything else as JSON.
Answer = tuple[int, Any]

_SPECIAL_KEYS = {"order", "type", "limit", "allocated_storage", "disable_bundling"}
_OFFER_TYPES = {"ondemand", "on-demand", "bid", "reserved"}


def default_offers() -> list[dict[str, Any]]:
    """A small market: two rentable RTX 4090s at different prices and places, one unreliable and one
    unverified 4090 (cheaper, so filters must drop them), a 3090 in Canada, a 2x A100, a taken H100."""
    def offer(id_: int, gpu: str, n: int, dph: float, geo: str, **extra: Any) -> dict[str, Any]:
        base = {"id": id_, "machine_id": id_ + 9000, "host_id": 77, "gpu_name": gpu, "num_gpus": n,
                "gpu_ram": 24564, "dph_total": dph, "dph_base": round(dph * 0.9, 4), "disk_space": 200.0,
                "reliability": 0.99, "inet_down": 800.0, "inet_up": 400.0, "geolocation": geo,
                "verification": "verified", "verified": True, "rentable": True, "rented": False,
                "external": False, "cpu_cores": 16, "cpu_ram": 64000, "cuda_max_good": 12.4}
        base.update(extra)
        return base
    return [
        offer(1001, "RTX 4090", 1, 0.40, "Texas, US"),
        offer(1002, "RTX 4090", 1, 0.35, "Sweden, SE", disk_space=100.0, inet_down=500.0),
        offer(1003, "RTX 4090", 1, 0.30, "Taiwan, TW", reliability=0.90),
        offer(1004, "RTX 3090", 1, 0.20, "Quebec, CA", disk_space=50.0),
        offer(1005, "A100 SXM4", 2, 2.10, "Germany, DE", gpu_ram=81920, disk_space=500.0),
        offer(1006, "RTX 4090", 1, 0.25, "US", verification="unverified", verified=False),
        offer(1007, "H100 SXM", 1, 2.50, "Oregon, US", rentable=False),
    ]


@dataclass
class _Meta:
    offer_id: int
    created_at: float
    body: dict[str, Any]
    stuck: str | None = None      # "loading" forever, or "exited"/"unknown" and never running
    polls: int = 0
    destroyed: bool = False
    linger_gets: int = 0


@dataclass
class _Switches:
    stay_loading_offers: set[int] = field(default_factory=set)
    stay_loading_next: int = 0
    fail_start_offers: dict[int, str] = field(default_factory=dict)
    fail_start_next: collections.deque = field(default_factory=collections.deque)
    linger_next_destroys: int = 0
    linger_gets: int = 0
    create_failures: collections.deque = field(default_factory=collections.deque)


class FakeVastMarket:
    """Offers and instances in memory. Instances progress `loading` -> `running` after
    `polls_until_running` reads of them (a show, or a list page that includes them), or after
    `seconds_until_running` when set. Switches and assertions take `_lock`; the `answer_*` methods
    expect the caller (the HTTP server) to hold it."""

    def __init__(self, *, ssh_endpoint: tuple[str, int] = ("127.0.0.1", 22),
                 offers: list[dict[str, Any]] | None = None, polls_until_running: int = 1,
                 seconds_until_running: float | None = None, page_size: int = 25) -> None:
        self.ssh_endpoint = ssh_endpoint
        self.offers: list[dict[str, Any]] = offers if offers is not None else default_offers()
        self.polls_until_running = polls_until_running
        self.seconds_until_running = seconds_until_running
        self.page_size = page_size
        self._instances: dict[int, dict[str, Any]] = {}
        self._meta: dict[int, _Meta] = {}
        self._next_id = 5001
        self._sw = _Switches()
        self._lock = threading.RLock()

    # -- switches (tests call these) ------------------------------------------------------------

    def set_ssh_endpoint(self, host: str, port: int) -> None:
        with self._lock:
            self.ssh_endpoint = (host, port)

    def set_offers(self, offers: list[dict[str, Any]]) -> None:
        with self._lock:
            self.offers = list(offers)

    def stay_loading(self, *, offer_id: int | None = None, next_n: int = 0) -> None:
        """Instances rented from `offer_id`, or the next `next_n` rented, stay `loading` forever."""
        with self._lock:
            if offer_id is not None:
                self._sw.stay_loading_offers.add(offer_id)
            self._sw.stay_loading_next += next_n

    def fail_start(self, status: str = "exited", *, offer_id: int | None = None, next_n: int = 0) -> None:
        """Instances go to `status` ("exited", "unknown"...) when first read and never become running."""
        with self._lock:
            if offer_id is not None:
                self._sw.fail_start_offers[offer_id] = status
            self._sw.fail_start_next.extend([status] * next_n)

    def linger_after_destroy(self, gets: int, *, next_n: int = 1) -> None:
        """The next `next_n` destroys succeed (billing stops) but the instance is still shown, unchanged,
        by the next `gets` reads of it."""
        with self._lock:
            self._sw.linger_next_destroys, self._sw.linger_gets = next_n, gets

    def fail_next_creates(self, n: int = 1, *, mode: str = "http_500") -> None:
        """The next `n` creates fail but leave a contract behind. `mode`: "http_500" (a 500 that does not
        name it) or "success_false" (200 `{"success": false, "new_contract": id, ...}`, the instance
        created stopped). A create that times out after acting is `slow_next(path_prefix="/api/v0/asks/")`."""
        assert mode in ("http_500", "success_false"), mode
        with self._lock:
            self._sw.create_failures.extend([mode] * n)

    def set_status(self, instance_id: int, actual_status: str, *, status_msg: str | None = None) -> None:
        """Force an instance's `actual_status` (a host going "offline", say); it sticks."""
        with self._lock:
            self._instances[instance_id].update(actual_status=actual_status, status_msg=status_msg)
            self._meta[instance_id].stuck = actual_status if actual_status != "running" else None

    # -- assertions -----------------------------------------------------------------------------

    def instance(self, instance_id: int) -> dict[str, Any] | None:
        """The instance as vast.ai would show it, without counting as a poll; None once destroyed."""
        with self._lock:
            meta = self._meta.get(instance_id)
            return None if meta is None or meta.destroyed else self._render(instance_id)

    def create_body(self, instance_id: int) -> dict[str, Any]:
        return self._meta[instance_id].body

    def live_instances(self) -> list[dict[str, Any]]:
        """Every instance not destroyed, whatever its state: these still cost money."""
        with self._lock:
            return [self._render(i) for i, m in sorted(self._meta.items()) if not m.destroyed]

    def running_instances(self) -> list[dict[str, Any]]:
        return [i for i in self.live_instances() if i["actual_status"] == "running"]

    # -- endpoints: (status, body) in vast.ai's shapes ------------------------------------------

    def answer_search(self, body: Any) -> Answer:
        if not isinstance(body, dict):
            return 400, {"success": False, "error": "invalid_args", "msg": "Invalid json body"}
        if body.get("type", "ondemand") not in _OFFER_TYPES:
            return 400, {"success": False, "error": "invalid_args", "msg": "Invalid offer type"}
        conditions = {k: v for k, v in body.items() if k not in _SPECIAL_KEYS}
        if any(not isinstance(v, dict) for v in conditions.values()):
            return 400, {"success": False, "error": "invalid_args", "msg": "Invalid query: must be dict of conditions"}
        offers = [o for o in self.offers if _matches(o, conditions)]
        for column, direction in reversed(body.get("order") or []):
            offers.sort(key=lambda o: (o.get(column) is None, o.get(column)), reverse=direction == "desc")
        return 200, {"offers": offers[: int(body.get("limit") or 64)]}

    def answer_create(self, offer_id: int, body: Any) -> Answer:
        offer = next((o for o in self.offers if o["id"] == offer_id and o.get("rentable")), None)
        if offer is None:
            return 404, {"success": False, "error": "no_such_ask", "msg": f"No ask by id {offer_id} is available."}
        if not isinstance(body, dict) or not body.get("image"):
            return 400, {"success": False, "error": "invalid_args", "msg": "'image' is required"}
        iid = self._next_id
        self._next_id += 1
        meta = _Meta(offer_id=offer_id, created_at=time.monotonic(), body=body)
        if offer_id in self._sw.stay_loading_offers or self._sw.stay_loading_next > 0:
            self._sw.stay_loading_next = max(0, self._sw.stay_loading_next - 1)
            meta.stuck = "loading"
        elif offer_id in self._sw.fail_start_offers:
            meta.stuck = self._sw.fail_start_offers[offer_id]
        elif self._sw.fail_start_next:
            meta.stuck = self._sw.fail_start_next.popleft()
        env = body.get("env") if isinstance(body.get("env"), dict) else {}
        self._instances[iid] = {
            "id": iid, "machine_id": offer["machine_id"], "host_id": offer.get("host_id"),
            "label": body.get("label"), "image_uuid": body["image"], "disk_space": float(body.get("disk") or 8),
            "gpu_name": offer["gpu_name"], "num_gpus": offer["num_gpus"], "dph_total": offer["dph_total"],
            "geolocation": offer["geolocation"], "onstart": body.get("onstart"),
            "extra_env": [[k, v] for k, v in env.items()], "start_date": time.time(),
            "actual_status": "loading", "intended_status": "running", "cur_state": "running",
            "status_msg": "Pulling image", "template_name": None,
        }
        self._meta[iid] = meta
        failure = self._sw.create_failures.popleft() if self._sw.create_failures else None
        if failure == "http_500":
            return 500, "Internal Server Error"
        if failure == "success_false":
            self._instances[iid].update(actual_status="stopped", intended_status="stopped", cur_state="stopped",
                                        status_msg="Required resources are currently unavailable")
            meta.stuck = "stopped"
            return 200, {"success": False, "new_contract": iid, "error": "resources_unavailable",
                         "msg": "Required resources are currently unavailable, instance created stopped."}
        return 200, {"success": True, "new_contract": iid, "instance_api_key": f"fake-instance-key-{iid}"}

    def answer_list_v0(self) -> Answer:
        return 410, {"success": False, "error": "deprecated",
                     "msg": "Endpoint deprecated: /api/v0/instances/ is deprecated. Use /api/v1/instances/ instead."}

    def answer_show(self, iid: int) -> Answer:
        return 200, {"instances": self._observe(iid) if self._visible(iid) else None}

    def answer_update(self, iid: int, body: Any) -> Answer:
        if iid not in self._meta or self._meta[iid].destroyed:
            return 404, {"success": False, "error": "no_such_instance", "msg": f"Instance {iid} not found."}
        body = body if isinstance(body, dict) else {}
        record, meta = self._instances[iid], self._meta[iid]
        if "label" in body:
            record["label"] = body["label"]
        state = body.get("state")
        if state == "stopped":
            record.update(actual_status="stopped", intended_status="stopped", cur_state="stopped", status_msg=None)
            meta.stuck = "stopped"
        elif state == "running":
            record.update(intended_status="running", cur_state="running")
            if meta.stuck == "stopped":
                meta.stuck = None
                record.update(actual_status="running", status_msg=None)
        elif state is not None:
            return 400, {"success": False, "msg": "Invalid target state"}
        return 200, {"success": True}

    def answer_destroy(self, iid: int) -> Answer:
        meta = self._meta.get(iid)
        if meta is None or meta.destroyed:
            return 404, {"success": False, "error": "no_such_instance", "msg": f"Instance {iid} not found."}
        meta.destroyed = True
        if self._sw.linger_next_destroys > 0:
            self._sw.linger_next_destroys -= 1
            meta.linger_gets = self._sw.linger_gets
        return 200, {"success": True}

    def answer_list_v1(self, query: Mapping[str, str]) -> Answer:
        try:
            limit = int(query.get("limit", 25))
            filters = json.loads(query.get("select_filters") or "{}")
            after = query.get("after_token")
            after_id = int(json.loads(base64.b64decode(after))["values"]["id"]) if after else 0
        except (ValueError, KeyError, TypeError):
            return 400, {"success": False, "error": "invalid_args", "msg": "invalid query parameters"}
        limit = 5 if limit <= 0 else min(limit, 25, self.page_size)
        ids = [i for i in sorted(self._meta) if self._visible(i, consume=False) and _matches(self._instances[i], filters)]
        page = [i for i in ids if i > after_id][:limit]
        rows = [self._observe(i) for i in page if self._visible(i)]  # a listing is a read too
        more = bool(page) and any(i > page[-1] for i in ids)
        token = base64.b64encode(json.dumps({"values": {"id": page[-1]}}).encode()).decode() if more else None
        labels = collections.Counter(self._instances[i].get("label") or "" for i in ids)
        return 200, {"success": True, "total_instances": len(ids), "label_counts": dict(labels),
                     "instances_found": len(rows), "instances": rows, "next_token": token}

    # -- state ----------------------------------------------------------------------------------

    def _visible(self, iid: int, *, consume: bool = True) -> bool:
        meta = self._meta.get(iid)
        if meta is None:
            return False
        if not meta.destroyed:
            return True
        if meta.linger_gets > 0:
            if consume:
                meta.linger_gets -= 1
            return True
        return False

    def _observe(self, iid: int) -> dict[str, Any]:
        """One read of an instance by the client: it moves the loading -> running clock on."""
        record, meta = self._instances[iid], self._meta[iid]
        if meta.destroyed:  # lingering after a destroy: shown as it was
            return self._render(iid)
        if record["actual_status"] == "loading" and meta.stuck in (None, "loading"):
            meta.polls += 1
        if meta.stuck not in (None, "loading", "stopped") and record["actual_status"] != meta.stuck:
            record.update(actual_status=meta.stuck, status_msg=f"container {meta.stuck}")
        elif meta.stuck is None and record["actual_status"] == "loading":
            if self.seconds_until_running is not None:
                ready = time.monotonic() - meta.created_at >= self.seconds_until_running
            else:
                ready = meta.polls > self.polls_until_running
            if ready:
                record.update(actual_status="running", status_msg="success, running")
        return self._render(iid)

    def _render(self, iid: int) -> dict[str, Any]:
        row = dict(self._instances[iid])
        host, port = self.ssh_endpoint
        if row["actual_status"] == "running":
            row.update(ssh_host=host, ssh_port=port, public_ipaddr=host,
                       ports={"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(port)}]})
        else:
            row.update(ssh_host=None, ssh_port=None, public_ipaddr=None, ports={})
        return row


def _matches(row: dict[str, Any], conditions: dict[str, Any]) -> bool:
    """vast.ai's filter operators over one record. Locations are compared by their country code."""
    for column, ops in conditions.items():
        if not isinstance(ops, dict):
            return False
        value = row.get(column)
        if column == "geolocation" and isinstance(value, str):
            value = value.rsplit(",", 1)[-1].strip()
        for op, expected in ops.items():
            try:
                ok = {
                    "eq": lambda: value == expected, "neq": lambda: value != expected,
                    "gt": lambda: value is not None and value > expected,
                    "gte": lambda: value is not None and value >= expected,
                    "lt": lambda: value is not None and value < expected,
                    "lte": lambda: value is not None and value <= expected,
                    "in": lambda: value in expected, "notin": lambda: value not in expected,
                }[op]()
            except (KeyError, TypeError):
                return False
            if not ok:
                return False
    return True
