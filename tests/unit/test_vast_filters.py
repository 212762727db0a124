"""The vast.ai search filter and region mapping, and reading instance records: pure functions, no server."""

from __future__ import annotations

import pytest

from src.adapters.vast_models import (
    EUROPE,
    Instance,
    Offer,
    build_offer_query,
    country_code,
    normalize_gpu_name,
    region_country_codes,
)
from src.errors import InvalidRequest


def test_default_query_is_rentable_verified_reliable_cheapest_first() -> None:
    assert build_offer_query() == {
        "rentable": {"eq": True},
        "rented": {"eq": False},
        "external": {"eq": False},
        "num_gpus": {"eq": 1},
        "verified": {"eq": True},
        "reliability": {"gte": 0.95},
        "order": [["dph_total", "asc"]],
        "type": "on-demand",
        "limit": 20,
    }


def test_every_filter_uses_vast_field_and_operator() -> None:
    query = build_offer_query(
        gpu_name="RTX_4090",
        num_gpus=2,
        region="us",
        max_price_per_hour=0.5,
        min_disk_gb=100,
        min_reliability=0.99,
        min_inet_down_mbps=500,
        limit=5,
    )
    assert query["gpu_name"] == {"eq": "RTX 4090"}
    assert query["num_gpus"] == {"eq": 2}
    assert query["geolocation"] == {"in": ["US", "CA"]}
    assert query["dph_total"] == {"lte": 0.5}
    assert query["disk_space"] == {"gte": 100}
    assert query["allocated_storage"] == 100  # so dph_total is priced with our disk
    assert query["reliability"] == {"gte": 0.99}
    assert query["inet_down"] == {"gte": 500}
    assert query["limit"] == 5


def test_unverified_and_no_reliability_floor_drop_those_filters() -> None:
    query = build_offer_query(verified=False, min_reliability=None)
    assert "verified" not in query and "reliability" not in query


@pytest.mark.parametrize("bad", [{"num_gpus": 0}, {"limit": 0}, {"limit": 5000}, {"max_price_per_hour": 0}])
def test_nonsense_filters_are_refused(bad: dict) -> None:
    with pytest.raises(InvalidRequest):
        build_offer_query(**bad)


@pytest.mark.parametrize(
    "region, expected",
    [
        ("eu", list(EUROPE)),
        ("Europe", list(EUROPE)),
        ("us", ["US", "CA"]),
        ("NA", ["US", "CA"]),
        ("north_america", ["US", "CA"]),
        ("de", ["DE"]),
        ("US,ca", ["US", "CA"]),
        (" se ", ["SE"]),
    ],
)
def test_regions_map_to_country_codes(region: str, expected: list[str]) -> None:
    assert region_country_codes(region) == expected


def test_europe_means_eu_eea_uk_ch() -> None:
    assert {"DE", "FR", "SE", "GB", "CH", "NO"} <= set(EUROPE)
    assert not {"RU", "BY", "UA", "US"} & set(EUROPE)


@pytest.mark.parametrize("region", ["mars", "", "USA", "U1", "us,,x"])
def test_unknown_regions_are_refused(region: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        region_country_codes(region)
    assert info.value.code == "invalid_region"


def test_gpu_names_use_spaces_like_vast() -> None:
    assert normalize_gpu_name("RTX_4090") == "RTX 4090"
    assert normalize_gpu_name("  H100  SXM ") == "H100 SXM"


def test_country_code_from_vast_geolocation() -> None:
    assert country_code("Texas, US") == "US"
    assert country_code("SE") == "SE"
    assert country_code("Somewhere") is None
    assert country_code(None) is None


def test_offer_from_api_keeps_raw_and_types() -> None:
    offer = Offer.from_api(
        {
            "id": "12",
            "gpu_name": "RTX 4090",
            "num_gpus": 1,
            "dph_total": "0.4",
            "geolocation": "Quebec, CA",
            "reliability2": 0.97,
            "extra": 1,
        }
    )
    assert (offer.id, offer.dph_total, offer.country_code, offer.reliability) == (12, 0.4, "CA", 0.97)
    assert offer.raw["extra"] == 1


def _instance(**fields) -> Instance:
    return Instance.from_api({"id": 7, "actual_status": "running", **fields})


def test_direct_ssh_is_preferred_over_the_proxy() -> None:
    inst = _instance(
        ssh_host="ssh4.vast.ai",
        ssh_port=31000,
        public_ipaddr="203.0.113.9\n",
        ports={"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "41022"}]},
    )
    assert (inst.ssh_endpoint.host, inst.ssh_endpoint.port, inst.ssh_endpoint.kind) == ("203.0.113.9", 41022, "direct")
    assert inst.proxy_ssh_endpoint.port == 31000


def test_proxy_ssh_when_no_port_is_mapped() -> None:
    inst = _instance(ssh_host="ssh4.vast.ai", ssh_port=31000, public_ipaddr="203.0.113.9", ports={})
    assert (inst.ssh_endpoint.host, inst.ssh_endpoint.port, inst.ssh_endpoint.kind) == ("ssh4.vast.ai", 31000, "proxy")


def test_no_ssh_endpoint_while_provisioning() -> None:
    inst = Instance.from_api({"id": 7, "actual_status": None, "ports": None})
    assert inst.ssh_endpoint is None and not inst.is_running and inst.ports == {}


@pytest.mark.parametrize("runtype", ["jupyter", "jupyter_proxy", "jupyter_direct"])
def test_jupyter_runtypes_ssh_through_the_proxy_on_the_next_port(runtype: str) -> None:
    """vast-cli vastai/cli/commands/misc.py `_ssh_url`: `ssh_port + 1 if "jupyter" in image_runtype`."""
    inst = _instance(ssh_host="ssh4.vast.ai", ssh_port=31000, image_runtype=runtype, ports={})
    assert (inst.ssh_endpoint.host, inst.ssh_endpoint.port, inst.ssh_endpoint.kind) == ("ssh4.vast.ai", 31001, "proxy")


def test_ssh_runtypes_use_ssh_port_as_is() -> None:
    for runtype in ("ssh", "ssh_proxy", "ssh_direct", None):
        assert _instance(ssh_host="ssh4.vast.ai", ssh_port=31000, image_runtype=runtype).ssh_endpoint.port == 31000


@pytest.mark.parametrize(
    "fields",
    [
        {"ports": {"22/tcp": "41022"}},
        {"ports": {"22/tcp": ["41022"]}},
        {"ports": {"22/tcp": [{"HostPort": "0"}]}},
        {"ports": {"22/tcp": [{"HostPort": "70000"}]}},
        {"ports": {"22/tcp": [{"HostPort": None}]}},
        {"ports": ["22/tcp"]},
        {"ssh_port": 65535, "image_runtype": "jupyter"},
        {"image_runtype": 7},
    ],
)
def test_hostile_instance_records_give_no_endpoint_rather_than_a_crash(fields: dict) -> None:
    inst = _instance(**{"public_ipaddr": "203.0.113.9", "ssh_host": None, **fields})
    if "ssh_port" in fields:  # 65535 + 1 is no port at all
        inst = _instance(ssh_host="ssh4.vast.ai", **fields)
    assert inst.direct_ssh_endpoint is None and inst.ssh_endpoint is None


def test_direct_port_filter() -> None:
    assert build_offer_query(min_direct_ports=1)["direct_port_count"] == {"gte": 1}
    assert "direct_port_count" not in build_offer_query()
    with pytest.raises(InvalidRequest):
        build_offer_query(min_direct_ports=0)
