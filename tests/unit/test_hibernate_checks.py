"""The pure parts of hibernate's safety checks: which endpoints are an instance's own (as vast.ai reports
them), how endpoints compare, and when a snapshot is too hollow to destroy its source for."""

from __future__ import annotations

import pytest

from src.adapters.vast_models import Instance
from src.jobs.hibernate import HOLLOW_RATIO, endpoint_text, hollow_reason, own_endpoints


def _instance(**fields):  # type: ignore[no-untyped-def]
    # Shapes from GET /api/v0/instances/<id>/ (docs/vast.md): proxy ssh_host/ssh_port, direct
    # public_ipaddr + ports["22/tcp"][].HostPort (a string).
    return Instance.from_api({"id": 5001, "actual_status": "running", **fields})


def test_own_endpoints_are_the_proxy_and_the_direct_mapping() -> None:
    inst = _instance(
        ssh_host="ssh5.vast.ai",
        ssh_port=31234,
        public_ipaddr=" 203.0.113.7 ",
        ports={"22/tcp": [{"HostIp": "0.0.0.0", "HostPort": "40022"}]},
    )
    assert own_endpoints(inst) == {"ssh5.vast.ai:31234", "203.0.113.7:40022"}
    assert endpoint_text("SSH5.vast.ai.", 31234) in own_endpoints(inst)
    assert endpoint_text("203.0.113.7", 22) not in own_endpoints(inst)  # the host's own sshd, not the instance
    assert endpoint_text("ssh5.vast.ai", 40022) not in own_endpoints(inst)  # host of one, port of the other


def test_an_instance_that_is_not_running_has_no_endpoint() -> None:
    assert own_endpoints(_instance(actual_status="loading", ssh_host=None, ssh_port=None, ports=None)) == set()
    assert own_endpoints(_instance(public_ipaddr="203.0.113.7", ports={"22/tcp": []})) == set()


@pytest.mark.parametrize(
    "a,b",
    [
        (("::1", 22), ("0:0:0:0:0:0:0:1", "22")),
        (("10.0.0.1", 22), ("10.0.0.1", 22)),
        (("Host.Example.", 2222), ("host.example", 2222)),
    ],
)
def test_endpoints_compare_as_normalised_text(a, b) -> None:  # type: ignore[no-untyped-def]
    assert endpoint_text(*a) == endpoint_text(*b)


def test_ipv6_endpoints_are_bracketed() -> None:
    assert endpoint_text("::1", 22) == "[::1]:22" != endpoint_text("::1:22", 22)


@pytest.mark.parametrize(
    "files,raw,scan",
    [
        (0, 65536, {"entries": 0, "bytes": 512}),  # an empty (or unmounted) workspace
        (None, None, None),  # nothing reported at all
        (3, 10 << 30, {"entries": 1000, "bytes": 10 << 30}),  # tar saw almost nothing of what the scan saw
        (1000, 1 << 20, {"entries": 1000, "bytes": 10 << 30}),  # or only a sliver of its bytes
    ],
)
def test_hollow_snapshots(files, raw, scan) -> None:  # type: ignore[no-untyped-def]
    assert hollow_reason(files=files, raw_bytes=raw, scan=scan) is not None


@pytest.mark.parametrize(
    "files,raw,scan",
    [
        (1, 65536, {"entries": 1, "bytes": 1536}),
        (1000, 10 << 30, {"entries": 1000, "bytes": 10 << 30}),
        (600, 6 << 30, {"entries": 1000, "bytes": 10 << 30}),  # shrank while read, but over half is there
        (5, 1 << 20, None),  # no scan reported (an older snapshot): files only
    ],
)
def test_honest_snapshots(files, raw, scan) -> None:  # type: ignore[no-untyped-def]
    assert hollow_reason(files=files, raw_bytes=raw, scan=scan) is None


def test_the_threshold_is_half() -> None:
    assert HOLLOW_RATIO == 0.5
    assert hollow_reason(files=499, raw_bytes=1 << 30, scan={"entries": 1000, "bytes": 1 << 30}) is not None
    assert hollow_reason(files=500, raw_bytes=1 << 30, scan={"entries": 1000, "bytes": 1 << 30}) is None
