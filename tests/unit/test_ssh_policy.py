"""SSH_ALLOWED_NETWORKS: parsing, CIDRs, names, IPv6, names resolving into forbidden ranges."""

from __future__ import annotations

import socket

import pytest

from src.adapters.ssh_policy import SshPolicy, TargetNotAllowed


class FakeResolver:
    """Answers from a table and records what was asked; unknown names fail like DNS does."""

    def __init__(self, table: dict[str, list[str]]) -> None:
        self.table = table
        self.asked: list[str] = []

    def __call__(self, host: str) -> list[str]:
        self.asked.append(host)
        if host not in self.table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return self.table[host]


def policy(setting: str, **table: list[str]) -> SshPolicy:
    return SshPolicy.from_setting(setting, resolver=FakeResolver({k.replace("_", "."): v for k, v in table.items()}))


# Every kind of address that is not one public host (issue 9: unset must fail safe).
NOT_PUBLIC = [
    "127.0.0.1",
    "127.8.9.10",
    "::1",
    "[::1]",
    "::ffff:127.0.0.1",  # loopback, also IPv4-mapped
    "169.254.169.254",
    "169.254.0.1",
    "fe80::1",
    "[fe80::1%eth0]",  # link-local: the metadata service
    "10.0.0.1",
    "172.16.3.4",
    "192.168.1.1",
    "fd00::1",
    "fec0::1",  # private, ULA, site-local
    "100.64.0.1",  # CGNAT shared space
    "224.0.0.1",
    "239.255.255.250",
    "ff02::1",  # multicast
    "0.0.0.0",
    "::",
    "255.255.255.255",
    "240.0.0.1",  # unspecified, broadcast, reserved
    "192.0.2.7",
    "198.51.100.7",
    "203.0.113.7",
    "2001:db8::7",  # documentation ranges
    "198.18.0.1",  # benchmarking
    "64:ff9b::a9fe:a9fe",
    "2002:7f00:1::1",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2",  # NAT64/6to4/Teredo wraps
]


@pytest.mark.parametrize("setting", [None, "", "  ", ",", " , ,"])
def test_unset_or_blank_allows_public_unicast_only(setting: str | None) -> None:
    p = SshPolicy.from_setting(
        setting,
        resolver=FakeResolver(
            {
                "gpu.example.org": ["8.8.4.4", "2606:4700::1"],
                "sneaky.example.org": ["8.8.4.4", "169.254.169.254"],
                "metadata.example.org": ["169.254.169.254"],
            }
        ),
    )
    assert p.public_only and not p.allows_everything
    for host in ("8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "gpu.example.org", "64:ff9b::808:808"):
        p.check(host)
    p.check_address(host="gpu.example.org", address="8.8.4.4")
    for host in NOT_PUBLIC + ["sneaky.example.org", "metadata.example.org", "localhost", "unknown.example.org"]:
        with pytest.raises(TargetNotAllowed) as info:
            p.check(host)
        assert info.value.code == "target_not_allowed" and info.value.http_status == 422
    for address in NOT_PUBLIC:
        with pytest.raises(TargetNotAllowed):
            p.check_address(host="gpu.example.org", address=address.strip("[]").split("%")[0])


def test_star_allows_everything_on_purpose_and_only_alone() -> None:
    p = SshPolicy.from_setting("*", resolver=FakeResolver({}))
    assert p.allows_everything and not p.public_only and p.describe() == "*"
    p.check("127.0.0.1")
    p.check("anything.example.org")
    p.check_address(host="anything.example.org", address="169.254.169.254")
    with pytest.raises(ValueError):
        SshPolicy.from_setting("*,10.0.0.0/8")


def test_a_configured_list_replaces_the_public_default() -> None:
    p = policy("127.0.0.0/8")
    p.check("127.0.0.1")
    with pytest.raises(TargetNotAllowed):
        p.check("8.8.8.8")  # public, but not listed


def test_addresses_inside_cidrs_pass_and_outside_are_refused() -> None:
    p = policy("10.0.0.0/8, 192.168.1.0/24,127.0.0.1/32")
    assert not p.allows_everything
    for host in ("10.0.0.1", "10.255.255.254", "192.168.1.77", "127.0.0.1"):
        p.check(host)
    for host in ("11.0.0.1", "192.168.2.1", "127.0.0.2", "8.8.8.8"):
        with pytest.raises(TargetNotAllowed) as info:
            p.check(host)
        assert info.value.code == "target_not_allowed"
        assert info.value.http_status == 422


def test_bare_address_is_a_single_host_and_host_bits_are_ignored() -> None:
    p = policy("172.16.5.4,10.1.2.3/8")
    p.check("172.16.5.4")
    p.check("10.200.0.1")
    with pytest.raises(TargetNotAllowed):
        p.check("172.16.5.5")


def test_listed_host_name_is_allowed_exactly_without_resolving() -> None:
    resolver = FakeResolver({})
    p = SshPolicy.from_setting("gpu.example.com", resolver=resolver)
    p.check("gpu.example.com")
    p.check("GPU.Example.COM.")  # DNS names are case-insensitive; a trailing dot is the same name
    p.check_address(host="gpu.example.com", address="203.0.113.7")  # a listed name is trusted wherever it points
    assert resolver.asked == []
    with pytest.raises(TargetNotAllowed):
        p.check("other.example.com")  # does not resolve, and is not listed
    with pytest.raises(TargetNotAllowed):
        p.check("evil-gpu.example.com.attacker.net")


def test_unlisted_name_is_judged_by_what_it_resolves_to() -> None:
    p = policy("10.0.0.0/8", inside_example=["10.1.1.1"], outside_example=["10.1.1.1", "198.51.100.4"])
    p.check("inside.example")
    with pytest.raises(TargetNotAllowed) as refused:
        p.check("outside.example")  # one forbidden address is enough: the connection could land there
    # The refusal names the host as asked, never what it resolved to (no DNS answers through 422s).
    assert "outside.example" in refused.value.message and "198.51.100.4" not in refused.value.message


def test_name_resolving_into_forbidden_range_is_refused_at_connect_time() -> None:
    p = policy("10.0.0.0/8")
    p.check_address(host="box.example", address="10.9.9.9")
    with pytest.raises(TargetNotAllowed):
        p.check_address(host="box.example", address="169.254.169.254")  # the cloud metadata service, say


def test_localhost_name_is_refused_when_loopback_is_not_listed() -> None:
    p = SshPolicy.from_setting("10.0.0.0/8")  # the real resolver: "localhost" is 127.0.0.1 / ::1
    with pytest.raises(TargetNotAllowed):
        p.check("localhost")


def test_ipv6_networks_and_literals() -> None:
    p = policy("2001:db8::/32,::1,[fd00::1]")
    p.check("2001:db8:1::5")
    p.check("[2001:db8::1]")
    p.check("::1")
    p.check("fd00::1")
    for host in ("2001:db9::1", "fd00::2", "10.0.0.1"):
        with pytest.raises(TargetNotAllowed):
            p.check(host)


def test_ipv4_mapped_ipv6_is_judged_as_the_ipv4_host() -> None:
    p = policy("10.0.0.0/8")
    p.check("::ffff:10.0.0.1")
    with pytest.raises(TargetNotAllowed):
        p.check("::ffff:192.0.2.1")
    with pytest.raises(TargetNotAllowed):
        p.check_address(host="box.example", address="::ffff:127.0.0.1")


def test_ipv4_network_does_not_match_ipv6_addresses() -> None:
    p = policy("0.0.0.0/0")
    p.check("192.0.2.1")
    with pytest.raises(TargetNotAllowed):
        p.check("2001:db8::1")


@pytest.mark.parametrize("entry", ["10.0.0.0/33", "300.1.1.1", "10.0.0.0/8/8", "bad host", "a..b", "-x.example"])
def test_malformed_entries_fail_loudly(entry: str) -> None:
    with pytest.raises(ValueError, match="SSH_ALLOWED_NETWORKS"):
        SshPolicy.from_setting(f"10.0.0.0/8,{entry}")


def test_empty_host_is_refused() -> None:
    with pytest.raises(TargetNotAllowed):
        policy("10.0.0.0/8").check("  ")


def test_describe_lists_the_setting() -> None:
    assert policy("10.0.0.0/8,GPU.example.com").describe() == "10.0.0.0/8,gpu.example.com"
    assert SshPolicy.from_setting("").describe() == "(public unicast addresses only)"
