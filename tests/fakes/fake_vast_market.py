"""The state behind the fake vast.ai API (`fake_vast_api.py` serves it over HTTP): offers, rented
instances and their life cycle, the switches that make instances misbehave the ways vast.ai's do, and
each endpoint's answer as a (status, body) pair in vast.ai's shapes. No HTTP here.

Sources for each behaviour (see docs/vast.md for the full table): the OpenAPI files in vast-ai/docs
`api-reference/openapi/yaml/` (named below by their endpoint), "Creating Instances with the API"
(vast-ai/docs `api-reference/creating-instances-with-api.mdx`) and the official CLI (vast-ai/vast-cli
`vastai/api/offers.py`, `vastai/api/query.py`, `vastai/cli/commands/misc.py`)."""

from __future__ import annotations

import base64
import collections
import json
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tests.support.services import free_port

# (HTTP status, body): a str body is sent as text/plain, anything else as JSON.
Answer = tuple[int, Any]

_SPECIAL_KEYS = {"order", "type", "limit", "allocated_storage", "disable_bundling"}
# The schema's enum is ondemand/bid/reserved; the CLI (offers.py) and the schema's own example send "on-demand".
_OFFER_TYPES = {"ondemand", "on-demand", "bid", "reserved"}
# Filterable offer fields: the properties of POST /api/v0/bundles/ (auto_post_api_v0_bundles_32b4bb.yaml)
# plus the CLI's `offers_fields` (vastai/api/query.py). The schema lets other names through as filter objects,
# where the CLI only warns; the fake refuses them (400) so that a misspelt filter, which vast.ai would apply
# to a column that does not exist, fails a test instead of silently matching everything or nothing.
_SEARCH_FIELDS = {
    "bw_nvlink",
    "cluster_id",
    "compute_cap",
    "cpu_arch",
    "cpu_cores",
    "cpu_cores_effective",
    "cpu_ghz",
    "cpu_ram",
    "cuda_max_good",
    "datacenter",
    "direct_port_count",
    "disk_bw",
    "disk_space",
    "dlperf",
    "dlperf_per_dphtotal",
    "dph_total",
    "driver_version",
    "duration",
    "external",
    "flops_per_dphtotal",
    "geolocation",
    "gpu_arch",
    "gpu_display_active",
    "gpu_frac",
    "gpu_max_power",
    "gpu_max_temp",
    "gpu_mem_bw",
    "gpu_name",
    "gpu_ram",
    "gpu_total_ram",
    "has_avx",
    "host_id",
    "id",
    "inet_down",
    "inet_down_cost",
    "inet_up",
    "inet_up_cost",
    "machine_id",
    "min_bid",
    "mobo_name",
    "num_gpus",
    "os_version",
    "pci_gen",
    "pcie_bw",
    "reliability",
    "rentable",
    "rented",
    "static_ip",
    "storage_cost",
    "total_flops",
    "ubuntu_version",
    "verification",
    "verified",
    "vms_enabled",
}
# A filter object's operators: the schema's `additionalProperties: false` over exactly these.
_OPERATORS = {"eq", "neq", "gt", "gte", "lt", "lte", "in", "notin"}
# PUT /api/v0/asks/{id}/ `runtype` enum (auto_put_api_v0_asks_id_6ec785.yaml); omitted means "ssh".
_RUNTYPES = {"ssh", "jupyter", "args", "ssh_proxy", "ssh_direct", "jupyter_proxy", "jupyter_direct"}
# Only the _direct runtypes map the container's port 22 on the host ("Runtype and Connection Options").
_DIRECT_RUNTYPES = {"ssh_direct", "jupyter_direct"}
# vast.ai answers {"error": "invalid_args", "msg": "label_too_long"} (auto_put_api_v0_instances_id_4ff617.yaml);
# the limit is not published: 64 characters is an ASSUMPTION (the figure issue 8 asks our labels to stay under).
MAX_LABEL_CHARS = 64


def default_offers() -> list[dict[str, Any]]:
    """A small market: two rentable RTX 4090s at different prices and places, one unreliable and one
    unverified 4090 (cheaper, so filters must drop them), a 3090 in Canada whose host has no direct ports
    (proxy SSH only), a 2x A100, a taken H100."""

    def offer(id_: int, gpu: str, n: int, dph: float, geo: str, **extra: Any) -> dict[str, Any]:
        base = {
            "id": id_,
            "direct_port_count": 32,
            "machine_id": id_ + 9000,
            "host_id": 77,
            "gpu_name": gpu,
            "num_gpus": n,
            "gpu_ram": 24564,
            "dph_total": dph,
            "dph_base": round(dph * 0.9, 4),
            "disk_space": 200.0,
            "reliability": 0.99,
            "inet_down": 800.0,
            "inet_up": 400.0,
            "geolocation": geo,
            "verification": "verified",
            "verified": True,
            "rentable": True,
            "rented": False,
            "external": False,
            "cpu_cores": 16,
            "cpu_ram": 64000,
            "cuda_max_good": 12.4,
            # USD per GB, as the bundles answer and the CLI's `offers_fields` name them.
            "inet_up_cost": 0.002,
            "inet_down_cost": 0.001,
        }
        base.update(extra)
        return base

    return [
        offer(1001, "RTX 4090", 1, 0.40, "Texas, US"),
        offer(1002, "RTX 4090", 1, 0.35, "Sweden, SE", disk_space=100.0, inet_down=500.0),
        offer(1003, "RTX 4090", 1, 0.30, "Taiwan, TW", reliability=0.90),
        offer(1004, "RTX 3090", 1, 0.20, "Quebec, CA", disk_space=50.0, direct_port_count=0),
        offer(1005, "A100 SXM4", 2, 2.10, "Germany, DE", gpu_ram=81920, disk_space=500.0),
        offer(1006, "RTX 4090", 1, 0.25, "US", verification="unverified", verified=False),
        offer(1007, "H100 SXM", 1, 2.50, "Oregon, US", rentable=False),
    ]


@dataclass
class _Meta:
    offer_id: int
    created_at: float
    body: dict[str, Any]
    stuck: str | None = None  # "loading" forever, or "exited"/"unknown" and never running
    polls: int = 0
    destroyed: bool = False
    linger_gets: int = 0
    runtype: str = "ssh"
    direct: bool = False  # the container's 22/tcp is mapped on the host (a _direct runtype, host with ports)
    gpus_free_at: float | None = None  # while in the future, starts are refused and queued


@dataclass
class _Switches:
    stay_loading_offers: set[int] = field(default_factory=set)
    stay_loading_next: int = 0
    fail_start_offers: dict[int, str] = field(default_factory=dict)
    fail_start_next: collections.deque = field(default_factory=collections.deque)
    linger_next_destroys: int = 0
    linger_gets: int = 0
    linger_unloaded: bool = False
    create_failures: collections.deque = field(default_factory=collections.deque)
    gone_offers: set[int] = field(default_factory=set)


class FakeVastMarket:
    """Offers and instances in memory. Instances start with `actual_status` null, are `loading` from the
    first read of them (a show, or a list page that includes them), then `running` after
    `polls_until_running` more reads, or after `seconds_until_running` when set. Switches and assertions take `_lock`; the `answer_*` methods
    expect the caller (the HTTP server) to hold it."""

    def __init__(
        self,
        *,
        ssh_endpoint: tuple[str, int] = ("127.0.0.1", 22),
        offers: list[dict[str, Any]] | None = None,
        polls_until_running: int = 1,
        seconds_until_running: float | None = None,
        page_size: int = 25,
    ) -> None:
        self.ssh_endpoint = ssh_endpoint
        # Where the endpoint an instance does NOT use points: a loopback port nothing listens on, so a client
        # that picks the wrong one (proxy for a direct rental, ssh_port without Jupyter's +1...) fails fast.
        self.dead_port = free_port(ssh_endpoint[0])
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

    def linger_after_destroy(self, gets: int, *, next_n: int = 1, unloaded: bool = False) -> None:
        """The next `next_n` destroys succeed (billing stops) but the instance is still shown by the next
        `gets` reads of it: unchanged, or with `unloaded` as vast.ai shows a released one (`cur_state`
        "unloaded (released on destroy)", vast.ai's show-instance reference)."""
        with self._lock:
            self._sw.linger_next_destroys, self._sw.linger_gets = next_n, gets
            self._sw.linger_unloaded = unloaded

    def fail_next_creates(self, n: int = 1, *, mode: str = "http_500") -> None:
        """The next `n` creates fail but leave a contract behind. `mode`: "http_500" (a 500 that does not
        name it) or "success_false" (200 `{"success": false, "new_contract": id, ...}`, the instance
        created stopped). A create that times out after acting is `slow_next(path_prefix="/api/v0/asks/")`."""
        assert mode in ("http_500", "success_false"), mode
        with self._lock:
            self._sw.create_failures.extend([mode] * n)

    def offer_gone(self, offer_id: int) -> None:
        """Renting `offer_id` answers 410 `no_such_ask` ("Instance type {id} is no longer available."), as
        vast.ai does when the offer existed but its resources went meanwhile (auto_put_api_v0_asks_id_6ec785.yaml)."""
        with self._lock:
            self._sw.gone_offers.add(offer_id)

    def take_gpus(self, instance_id: int, *, free_after_s: float) -> None:
        """Someone else rents the instance's GPUs for `free_after_s` seconds. A start meanwhile answers 200
        `{"success": false, "error": "resources_unavailable", msg: "... state change queued."}`
        (auto_put_api_v0_instances_id_4ff617.yaml) and is queued: once the GPUs free, the instance starts by
        itself (and bills) unless a later `state: stopped` cancelled it."""
        with self._lock:
            self._meta[instance_id].gpus_free_at = time.monotonic() + free_after_s

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
            if meta is None or meta.destroyed:
                return None
            self._start_if_queued(instance_id)
            return self._render(instance_id)

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
        unknown = sorted(set(conditions) - _SEARCH_FIELDS)
        if unknown:
            return 400, {"success": False, "error": "invalid_args", "msg": f"Invalid query: unknown field {unknown[0]}"}
        bad_ops = sorted({op for ops in conditions.values() for op in ops} - _OPERATORS)
        if bad_ops:
            return 400, {
                "success": False,
                "error": "invalid_args",
                "msg": f"Invalid query: unknown operator {bad_ops[0]}",
            }
        offers = [o for o in self.offers if _matches(o, conditions)]
        for column, direction in reversed(body.get("order") or []):
            offers.sort(key=lambda o: (o.get(column) is None, o.get(column)), reverse=direction == "desc")
        return 200, {"offers": offers[: int(body.get("limit") or 64)]}

    def answer_create(self, offer_id: int, body: Any) -> Answer:
        offer = next((o for o in self.offers if o["id"] == offer_id and o.get("rentable")), None)
        if offer is None:
            return 404, {"success": False, "error": "no_such_ask", "msg": f"No ask by id {offer_id} is available."}
        if offer_id in self._sw.gone_offers:
            return 410, {
                "success": False,
                "error": "no_such_ask",
                "msg": f"Instance type {offer_id} is no longer available.",
            }
        if not isinstance(body, dict) or not body.get("image"):
            return 400, {"success": False, "error": "invalid_args", "msg": "'image' is required"}
        runtype = body.get("runtype", "ssh")
        if runtype not in _RUNTYPES:
            return 400, {"success": False, "error": "invalid_args", "msg": f"invalid runtype {runtype!r}"}
        if len(str(body.get("label") or "")) > MAX_LABEL_CHARS:
            return 400, {"success": False, "error": "invalid_args", "msg": "label_too_long"}
        iid = self._next_id
        self._next_id += 1
        meta = _Meta(
            offer_id=offer_id,
            created_at=time.monotonic(),
            body=body,
            runtype=runtype,
            direct=runtype in _DIRECT_RUNTYPES and int(offer.get("direct_port_count") or 0) >= 1,
        )
        if offer_id in self._sw.stay_loading_offers or self._sw.stay_loading_next > 0:
            self._sw.stay_loading_next = max(0, self._sw.stay_loading_next - 1)
            meta.stuck = "loading"
        elif offer_id in self._sw.fail_start_offers:
            meta.stuck = self._sw.fail_start_offers[offer_id]
        elif self._sw.fail_start_next:
            meta.stuck = self._sw.fail_start_next.popleft()
        env = body.get("env") if isinstance(body.get("env"), dict) else {}
        self._instances[iid] = {
            "id": iid,
            "machine_id": offer["machine_id"],
            "host_id": offer.get("host_id"),
            "label": body.get("label"),
            "image_uuid": body["image"],
            "disk_space": float(body.get("disk") or 8),
            "gpu_name": offer["gpu_name"],
            "num_gpus": offer["num_gpus"],
            "dph_total": offer["dph_total"],
            "inet_up_cost": offer.get("inet_up_cost"),
            "inet_down_cost": offer.get("inet_down_cost"),
            "geolocation": offer["geolocation"],
            "onstart": body.get("onstart"),
            "extra_env": [[k, v] for k, v in env.items()],
            "start_date": time.time(),
            "image_runtype": runtype,
            # Null until the host reports the container (Statuses: "null while provisioning"), then loading.
            "actual_status": None,
            "intended_status": "running",
            "cur_state": "running",
            "status_msg": None,
            "template_name": None,
        }
        self._meta[iid] = meta
        failure = self._sw.create_failures.popleft() if self._sw.create_failures else None
        if failure == "http_500":
            return 500, "Internal Server Error"
        if failure == "success_false":
            self._instances[iid].update(
                actual_status="stopped",
                intended_status="stopped",
                cur_state="stopped",
                status_msg="Required resources are currently unavailable",
            )
            meta.stuck = "stopped"
            return 200, {
                "success": False,
                "new_contract": iid,
                "error": "resources_unavailable",
                "msg": "Required resources are currently unavailable, instance created stopped.",
            }
        return 200, {"success": True, "new_contract": iid, "instance_api_key": f"fake-instance-key-{iid}"}

    def answer_list_v0(self) -> Answer:
        return 410, {
            "success": False,
            "error": "deprecated",
            "msg": "Endpoint deprecated: /api/v0/instances/ is deprecated. Use /api/v1/instances/ instead.",
        }

    def answer_show(self, iid: int) -> Answer:
        return 200, {"instances": self._observe(iid) if self._visible(iid) else None}

    def answer_update(self, iid: int, body: Any) -> Answer:
        if iid not in self._meta or self._meta[iid].destroyed:
            return 404, {"success": False, "error": "no_such_instance", "msg": f"Instance {iid} not found."}
        body = body if isinstance(body, dict) else {}
        record, meta = self._instances[iid], self._meta[iid]
        if "label" in body:
            if len(str(body["label"] or "")) > MAX_LABEL_CHARS:
                return 400, {"error": "invalid_args", "msg": "label_too_long"}
            record["label"] = body["label"]
        state = body.get("state")
        if state == "stopped":
            # Also cancels a start queued for want of GPUs: the intended state is what vast.ai acts on.
            record.update(actual_status="stopped", intended_status="stopped", cur_state="stopped", status_msg=None)
            meta.stuck = "stopped"
        elif state == "running":
            record["intended_status"] = "running"
            if meta.gpus_free_at is not None and time.monotonic() < meta.gpus_free_at and meta.stuck == "stopped":
                record["status_msg"] = "Required resources are currently unavailable, state change queued."
                return 200, {
                    "success": False,
                    "error": "resources_unavailable",
                    "msg": "Required resources are currently unavailable, state change queued.",
                }
            record["cur_state"] = "running"
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
            if self._sw.linger_unloaded:
                self._instances[iid]["cur_state"] = "unloaded"
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
        ids = [
            i for i in sorted(self._meta) if self._visible(i, consume=False) and _matches(self._instances[i], filters)
        ]
        page = [i for i in ids if i > after_id][:limit]
        rows = [self._observe(i) for i in page if self._visible(i)]  # a listing is a read too
        more = bool(page) and any(i > page[-1] for i in ids)
        token = base64.b64encode(json.dumps({"values": {"id": page[-1]}}).encode()).decode() if more else None
        labels = collections.Counter(self._instances[i].get("label") or "" for i in ids)
        return 200, {
            "success": True,
            "total_instances": len(ids),
            "label_counts": dict(labels),
            "instances_found": len(rows),
            "instances": rows,
            "next_token": token,
        }

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
        self._start_if_queued(iid)
        if record["actual_status"] is None and meta.stuck in (None, "loading"):
            record.update(actual_status="loading", status_msg="Pulling image")  # the first sign of life
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

    def _start_if_queued(self, iid: int) -> None:
        """A start queued while the GPUs were taken happens by itself once they are free, unless cancelled."""
        record, meta = self._instances[iid], self._meta[iid]
        if meta.gpus_free_at is None or time.monotonic() < meta.gpus_free_at:
            return
        meta.gpus_free_at = None
        if meta.stuck == "stopped" and record["intended_status"] == "running":
            meta.stuck = None
            record.update(actual_status="loading", cur_state="running", status_msg="Pulling image")

    def _render(self, iid: int) -> dict[str, Any]:
        """The instance as vast.ai shows it. The proxy fields (`ssh_host`/`ssh_port`) exist from the start,
        loading included; the direct mapping once the container exists. Only the endpoint the runtype makes
        live reaches `ssh_endpoint`; the other names `dead_port`. Jupyter runtypes give Jupyter's proxy port
        as `ssh_port`, SSH being the next one (vast-cli misc.py `_ssh_url`)."""
        row = dict(self._instances[iid])
        meta = self._meta[iid]
        host, port = self.ssh_endpoint
        live_proxy = not meta.direct and meta.runtype != "args"
        proxy_ssh = port if live_proxy else self.dead_port
        row.update(
            ssh_host=host,
            ssh_port=proxy_ssh - 1 if "jupyter" in meta.runtype else proxy_ssh,
            public_ipaddr=host,
            ports={},
        )
        if meta.direct and row["actual_status"] is not None:
            row["ports"] = {"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": str(port)}]}
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
                    "eq": lambda: value == expected,
                    "neq": lambda: value != expected,
                    "gt": lambda: value is not None and value > expected,
                    "gte": lambda: value is not None and value >= expected,
                    "lt": lambda: value is not None and value < expected,
                    "lte": lambda: value is not None and value <= expected,
                    "in": lambda: value in expected,
                    "notin": lambda: value not in expected,
                }[op]()
            except (KeyError, TypeError):
                return False
            if not ok:
                return False
    return True
