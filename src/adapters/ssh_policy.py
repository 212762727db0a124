"""The SSH allow-list (`SSH_ALLOWED_NETWORKS`): which hosts the service may open an SSH connection to.

A request names an SSH host; without this list anyone holding an API token could point the worker (and
the object-store credentials it sends) at any machine the worker can reach. The list holds CIDRs and
exact host names. Unset, it fails safe: only public unicast addresses are allowed (GPU hosts are
rented on the internet), never loopback, private, link-local (169.254.169.254 is the cloud metadata
service), multicast, unspecified or reserved ones; `*` allows every host, on purpose. It is checked twice: `check(host)` before any connection is tried (the API calls it
to answer 422), and `check_address(host=, address=)` on every address the SSH adapter is about to
connect to, so a name that resolves into a forbidden range is refused even if DNS changed in between.
"""

from __future__ import annotations

import ipaddress
import logging
import re
import socket
from collections.abc import Callable, Iterable

from src.errors import Unprocessable

logger = logging.getLogger(__name__)

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str], list[str]]

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$"
)
# An entry made only of digits and dots (or holding ':' or '/') was meant as an address, so a typo
# there ("10.0.0.0/33", "300.1.1.1") must fail loudly rather than become a host name nobody has.
_LOOKS_NUMERIC = re.compile(r"^[0-9.]+$|[:/]")


class TargetNotAllowed(Unprocessable):
    """The SSH host is outside `SSH_ALLOWED_NETWORKS` (or resolves outside it)."""

    code = "target_not_allowed"


def resolve_host(host: str) -> list[str]:
    """Every IP address `host` resolves to (TCP). Raises `socket.gaierror` when it does not resolve."""
    infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    return sorted({str(info[4][0]) for info in infos})


def _normalize_name(host: str) -> str:
    return host.strip().strip("[]").rstrip(".").lower()


# NAT64 (RFC 6052) forwards 64:ff9b::a.b.c.d to the IPv4 address a.b.c.d: judge it as that address.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def is_public_unicast(ip: IpAddress) -> bool:
    """True for an address on the public internet that names one host: not loopback, private
    (RFC 1918, ULA, CGNAT), link-local, multicast, unspecified, reserved or documentation space."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip in _NAT64:
            return is_public_unicast(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
        if ip.sixtofour is not None:  # 2002::/16 routes to the embedded IPv4 address
            return is_public_unicast(ip.sixtofour)
        if ip.teredo is not None or ip.is_site_local:
            return False
    return ip.is_global and not (
        ip.is_multicast or ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_reserved
    )


def _parse_ip(text: str) -> IpAddress | None:
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    # An IPv4-mapped IPv6 address (::ffff:10.0.0.1) reaches the IPv4 host; judge it as that host.
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


class SshPolicy:
    """Allowed SSH targets: CIDR networks and exact host names. Immutable after construction."""

    def __init__(
        self,
        *,
        networks: Iterable[IpNetwork] = (),
        hostnames: Iterable[str] = (),
        allow_all: bool = False,
        public_only: bool = False,
        resolver: Resolver = resolve_host,
    ) -> None:
        self._networks = tuple(networks)
        self._hostnames = frozenset(_normalize_name(h) for h in hostnames)
        self._allow_all = allow_all
        self._public_only = public_only
        self._resolver = resolver

    @classmethod
    def from_setting(cls, value: str | None, *, resolver: Resolver = resolve_host) -> SshPolicy:
        """Parse `SSH_ALLOWED_NETWORKS` ("10.0.0.0/8,gpu.example.com,127.0.0.1/32").

        Unset or blank allows public unicast addresses only (`public_only`): a name must resolve to
        such addresses alone. `*` (alone) allows every host (`allows_everything`; the app warns at
        start). A bare address is a /32 (or /128); host bits in a CIDR are ignored. Raises
        `ValueError` naming a malformed entry, so a typo stops the app at start instead of silently
        refusing (or allowing) hosts.
        """
        entries = [e.strip() for e in (value or "").split(",") if e.strip()]
        if not entries:
            return cls(public_only=True, resolver=resolver)
        if "*" in entries:
            if len(entries) > 1:
                raise ValueError("SSH_ALLOWED_NETWORKS: '*' allows every host and cannot be combined with entries")
            return cls(allow_all=True, resolver=resolver)
        networks: list[IpNetwork] = []
        hostnames: list[str] = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
                continue
            except ValueError:
                pass
            name = _normalize_name(entry)
            if _LOOKS_NUMERIC.search(name) or not _HOSTNAME.match(name):
                raise ValueError(f"SSH_ALLOWED_NETWORKS: {entry!r} is neither a CIDR nor a host name")
            hostnames.append(name)
        return cls(networks=networks, hostnames=hostnames, resolver=resolver)

    @property
    def allows_everything(self) -> bool:
        """True when the setting is `*`: every host is accepted."""
        return self._allow_all

    @property
    def public_only(self) -> bool:
        """True when no list is configured: public unicast addresses only."""
        return self._public_only

    def describe(self) -> str:
        """The list in setting form, for a log line at start (it is configuration, not a secret)."""
        if self._allow_all:
            return "*"
        if self._public_only:
            return "(public unicast addresses only)"
        return ",".join([str(n) for n in self._networks] + sorted(self._hostnames))

    def check(self, host: str) -> None:
        """Refuse `host` before any connection is tried. Idempotent; no side effects but DNS.

        An address must lie in an allowed network. A listed host name is allowed as such. Any other
        name is resolved and every address it resolves to must lie in an allowed network (one
        forbidden address is enough to refuse: the connection could land on it).
        Without a configured list, the same holds with "public unicast address" for "allowed network".
        Raises `TargetNotAllowed`, also when an unlisted name does not resolve.
        """
        if self._allow_all:
            return
        name = _normalize_name(host)
        if not name:
            raise TargetNotAllowed("SSH host is empty")
        ip = _parse_ip(name)
        if ip is not None:
            self._check_ip(host=host, ip=ip)
            return
        if name in self._hostnames:
            return
        try:
            addresses = self._resolver(name)
        except (OSError, UnicodeError) as e:
            raise TargetNotAllowed(
                f"SSH host {host!r} is not in SSH_ALLOWED_NETWORKS and could not be resolved to check it"
            ) from e
        if not addresses:
            raise TargetNotAllowed(f"SSH host {host!r} resolves to no address")
        for address in addresses:
            self.check_address(host=host, address=address)

    def check_address(self, *, host: str, address: str) -> None:
        """Refuse connecting to `address` (what `host` resolved to right now). Idempotent, no I/O.

        A host name listed in the policy is trusted wherever it resolves: listing a name is how an
        operator allows a host whose address changes. Raises `TargetNotAllowed`.
        """
        if self._allow_all or _normalize_name(host) in self._hostnames:
            return
        ip = _parse_ip(address.split("%", 1)[0])
        if ip is None:
            raise TargetNotAllowed(f"SSH host {host!r} resolved to an unparseable address {address!r}")
        self._check_ip(host=host, ip=ip)

    def _check_ip(self, *, host: str, ip: IpAddress) -> None:
        # The name only, never what it resolved to: a refusal must not answer DNS questions about
        # internal names for whoever holds a token.
        shown = host
        if self._public_only:
            if is_public_unicast(ip):
                return
            raise TargetNotAllowed(
                f"SSH host {shown} is not a public unicast address; set SSH_ALLOWED_NETWORKS "
                "to allow private, loopback or other special addresses"
            )
        if any(ip in net for net in self._networks):  # an address is never in a network of the other version
            return
        raise TargetNotAllowed(f"SSH host {shown} is not in SSH_ALLOWED_NETWORKS")
