"""The shapes the vast.ai REST API speaks, kept apart from the HTTP client in `vast.py`: the search filter
we send to `POST /api/v0/bundles/`, friendly region names, and the offer and instance records we read
back. Pure functions and dataclasses only, so they are unit-tested without a server. Where each field
was checked against vast.ai's published documentation is recorded in docs/vast.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from src.errors import InvalidRequest

# EU/EEA members plus the UK and Switzerland: where "eu" customers usually mean their data may live.
# vast.ai's own SDK "Europe" list is wider (it includes RU, BY, UA...); we deliberately keep to this set.
EUROPE = (
    "AT",
    "BE",
    "BG",
    "HR",
    "CY",
    "CZ",
    "DK",
    "EE",
    "FI",
    "FR",
    "DE",
    "GR",
    "HU",
    "IE",
    "IT",
    "LV",
    "LT",
    "LU",
    "MT",
    "NL",
    "PL",
    "PT",
    "RO",
    "SK",
    "SI",
    "ES",
    "SE",
    "GB",
    "CH",
    "NO",
    "IS",
)
NORTH_AMERICA = ("US", "CA")

REGIONS: dict[str, tuple[str, ...]] = {
    "eu": EUROPE,
    "europe": EUROPE,
    # "us" includes Canada on purpose: same latency zone for us, and far more supply to choose from.
    "us": NORTH_AMERICA,
    "na": NORTH_AMERICA,
    "north_america": NORTH_AMERICA,
    "north-america": NORTH_AMERICA,
}

# What vast.ai's own CLI/SDK sends as the search `type` for on-demand rentals (vast-cli
# `vastai/api/offers.py` `search_offers(offer_type="on-demand")` and `launch_instance`; the OpenAPI
# example for POST /api/v0/bundles/ sends it too, while the schema's enum spells it "ondemand").
OFFER_TYPE = "on-demand"
# vast.ai refuses over-long labels (`{"error": "invalid_args", "msg": "label_too_long"}`, OpenAPI
# `auto_put_api_v0_instances_id_4ff617.yaml`); the limit itself is not published, 64 is our assumption.
MAX_LABEL_CHARS = 64
SEARCH_ORDER = [["dph_total", "asc"]]


def region_country_codes(region: str) -> list[str]:
    """Country codes for a friendly region ("eu", "europe", "us", "na"), an ISO 3166 alpha-2 code ("de"),
    or a comma-separated list of codes ("US,CA"). Raises `InvalidRequest` (code `invalid_region`)."""
    key = region.strip().lower()
    if key in REGIONS:
        return list(REGIONS[key])
    codes = [part.strip().upper() for part in key.split(",") if part.strip()]
    if not codes or any(len(c) != 2 or not c.isalpha() for c in codes):
        known = ", ".join(sorted(REGIONS))
        raise InvalidRequest(
            f"unknown region {region!r}: use one of {known} or two-letter country codes", code="invalid_region"
        )
    return codes


def normalize_gpu_name(gpu_name: str) -> str:
    """vast.ai names GPUs with spaces ("RTX 4090"); its CLI lets users type underscores and swaps them."""
    return " ".join(gpu_name.replace("_", " ").split())


def build_offer_query(
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
) -> dict[str, Any]:
    """The JSON body for `POST /api/v0/bundles/`: each filter is `{field: {operator: value}}`, plus the
    special keys `order`, `type`, `limit` and `allocated_storage`. Cheapest first. `min_direct_ports`
    keeps hosts that can map that many ports straight to the instance (`direct_port_count`, needed for
    the `*_direct` runtypes). `min_cuda` keeps hosts whose driver runs at least that CUDA version
    (`cuda_max_good`): a snapshot with nvCOMP parts needs CUDA 12+ to be decoded. Raises `InvalidRequest`."""
    if num_gpus < 1:
        raise InvalidRequest("num_gpus must be at least 1", code="invalid_offer_filter")
    if not 1 <= limit <= 1000:
        raise InvalidRequest("limit must be between 1 and 1000", code="invalid_offer_filter")
    if max_price_per_hour is not None and max_price_per_hour <= 0:
        raise InvalidRequest("max_price_per_hour must be positive", code="invalid_offer_filter")
    query: dict[str, Any] = {
        "rentable": {"eq": True},
        # Same defaults as vast.ai's CLI: no machines we already rent on, no unlisted external offers.
        "rented": {"eq": False},
        "external": {"eq": False},
        "num_gpus": {"eq": num_gpus},
    }
    if verified:
        query["verified"] = {"eq": True}
    if gpu_name:
        query["gpu_name"] = {"eq": normalize_gpu_name(gpu_name)}
    if region:
        query["geolocation"] = {"in": region_country_codes(region)}
    if max_price_per_hour is not None:
        query["dph_total"] = {"lte": max_price_per_hour}
    if min_disk_gb is not None:
        query["disk_space"] = {"gte": min_disk_gb}
        # Priced with the disk we will ask for, so `dph_total` (and the max price) includes storage.
        query["allocated_storage"] = min_disk_gb
    if min_reliability is not None:
        query["reliability"] = {"gte": min_reliability}
    if min_inet_down_mbps is not None:
        query["inet_down"] = {"gte": min_inet_down_mbps}
    if min_direct_ports is not None:
        if min_direct_ports < 1:
            raise InvalidRequest("min_direct_ports must be at least 1", code="invalid_offer_filter")
        # Field and operator: OpenAPI `auto_post_api_v0_bundles_32b4bb.yaml` (`direct_port_count`), vast-cli
        # `vastai/api/query.py` `offers_fields`.
        query["direct_port_count"] = {"gte": min_direct_ports}
    if min_cuda is not None:
        query["cuda_max_good"] = {"gte": min_cuda}
    query["order"] = [list(pair) for pair in SEARCH_ORDER]
    query["type"] = OFFER_TYPE
    query["limit"] = limit
    return query


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


def _float_or_none(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _is_port(value: int) -> bool:
    return 0 < value < 65536


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def country_code(geolocation: str | None) -> str | None:
    """vast.ai reports locations as "Texas, US" or just "US"; the country code is the last part."""
    if not geolocation:
        return None
    last = geolocation.rsplit(",", 1)[-1].strip()
    return last.upper() if len(last) == 2 and last.isalpha() else None


@dataclass(frozen=True)
class Offer:
    """One rentable machine slot from the search. `id` is what `create_instance` takes."""

    id: int
    machine_id: int | None
    gpu_name: str | None
    num_gpus: int | None
    gpu_ram: float | None  # MB per card
    dph_total: float | None  # USD per hour, storage included when the search gave a disk size
    disk_space: float | None  # GB available
    reliability: float | None  # 0..1
    inet_down: float | None  # Mbit/s
    inet_up: float | None
    geolocation: str | None
    verification: str | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def country_code(self) -> str | None:
        return country_code(self.geolocation)

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Offer:
        return cls(
            id=int(data["id"]),
            machine_id=_int_or_none(data.get("machine_id")),
            gpu_name=data.get("gpu_name"),
            num_gpus=_int_or_none(data.get("num_gpus")),
            gpu_ram=_float_or_none(data.get("gpu_ram")),
            dph_total=_float_or_none(data.get("dph_total")),
            disk_space=_float_or_none(data.get("disk_space")),
            reliability=_float_or_none(data.get("reliability", data.get("reliability2"))),
            inet_down=_float_or_none(data.get("inet_down")),
            inet_up=_float_or_none(data.get("inet_up")),
            geolocation=data.get("geolocation"),
            verification=data.get("verification"),
            raw=dict(data),
        )


@dataclass(frozen=True)
class SshEndpoint:
    host: str
    port: int
    kind: str  # "direct" (the host's public address) or "proxy" (vast.ai's SSH proxy)


@dataclass(frozen=True)
class Instance:
    """A rented instance (vast.ai calls it a contract). `actual_status` is the container's state (None while
    provisioning, then loading, running, stopped, exited, unknown, offline...), `intended_status` the state
    asked for, `cur_state` the hardware allocation (running, stopped, unloaded once released)."""

    id: int
    actual_status: str | None
    intended_status: str | None
    cur_state: str | None
    ssh_host: str | None
    ssh_port: int | None
    public_ipaddr: str | None
    ports: dict[str, list[dict[str, str]]]
    status_msg: str | None
    label: str | None
    image_runtype: str | None  # "ssh", "ssh_direct", "jupyter_proxy"...: how SSH reaches the container
    gpu_name: str | None
    num_gpus: int | None
    dph_total: float | None
    disk_space: float | None
    geolocation: str | None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_running(self) -> bool:
        return self.actual_status == "running"

    @property
    def is_released(self) -> bool:
        """Destroyed: vast.ai may go on showing a destroyed instance for a while, with `cur_state`
        `unloaded` ("released on destroy", vast.ai's show-instance reference); it bills nothing more."""
        return self.cur_state == "unloaded"

    @property
    def direct_ssh_endpoint(self) -> SshEndpoint | None:
        """The host's public address and the host port Docker mapped to the container's 22/tcp."""
        bindings = self.ports.get("22/tcp")
        if not self.public_ipaddr or not isinstance(bindings, list):
            return None
        for binding in bindings:
            port = _int_or_none(binding.get("HostPort")) if isinstance(binding, dict) else None
            if port is not None and _is_port(port):
                return SshEndpoint(host=self.public_ipaddr, port=port, kind="direct")
        return None

    @property
    def proxy_ssh_endpoint(self) -> SshEndpoint | None:
        """vast.ai's SSH proxy. For Jupyter runtypes `ssh_port` is Jupyter's proxy port and SSH is the next
        one: vast-cli `vastai/cli/commands/misc.py` `_ssh_url` connects to `int(ssh_port) + 1 if "jupyter"
        in instance["image_runtype"]`, else `ssh_port`."""
        if not (self.ssh_host and self.ssh_port):
            return None
        port = self.ssh_port + 1 if "jupyter" in (self.image_runtype or "") else self.ssh_port
        return SshEndpoint(host=self.ssh_host, port=port, kind="proxy") if _is_port(port) else None

    @property
    def ssh_endpoint(self) -> SshEndpoint | None:
        """Where to SSH: the direct mapping when the host has one, else vast.ai's proxy. Direct is preferred
        because the session reaches the instance's own sshd with no shared relay in between, so a long
        snapshot session is neither slowed nor cut by the proxy (vast.ai's docs recommend the `_direct`
        runtypes too). Proxy-only runtypes (`ssh`, `ssh_proxy`) and hosts without open ports have no
        direct mapping, hence the fallback; the proxy's port is only meaningful with its host."""
        return self.direct_ssh_endpoint or self.proxy_ssh_endpoint

    @classmethod
    def from_api(cls, data: dict[str, Any]) -> Instance:
        ports = data.get("ports")
        return cls(
            id=int(data["id"]),
            actual_status=data.get("actual_status"),
            intended_status=data.get("intended_status"),
            cur_state=data.get("cur_state"),
            ssh_host=data.get("ssh_host") or None,
            ssh_port=_int_or_none(data.get("ssh_port")),
            public_ipaddr=(data.get("public_ipaddr") or "").strip() or None,
            ports=ports if isinstance(ports, dict) else {},
            status_msg=data.get("status_msg"),
            label=data.get("label"),
            image_runtype=_str_or_none(data.get("image_runtype")),
            gpu_name=data.get("gpu_name"),
            num_gpus=_int_or_none(data.get("num_gpus")),
            dph_total=_float_or_none(data.get("dph_total")),
            disk_space=_float_or_none(data.get("disk_space")),
            geolocation=data.get("geolocation"),
            raw=dict(data),
        )
