"""Which URLs Tunery may fetch for a user: the SSRF rules for `data_path` URLs.

A URL must be https (plain http only where the operator allows it), carry no credentials, and
name a host that is either an operator-allowed one or resolves only to globally routable
addresses: never loopback, private, link-local (cloud metadata), CGNAT, multicast, reserved or
unspecified, nor an IPv6 form that wraps such an IPv4 address.

`check_url` is the grammar, without DNS; `resolve_allowed` is the resolution, whose answer
the caller must connect to (and nothing else), or a DNS server could answer differently the
second time. Pure standard library: the API image uses it too.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Named because their usual ranges (link-local, ULA) would only say "link-local" or "private".
_METADATA = {
    ipaddress.ip_address("169.254.169.254"): "a cloud metadata address",
    ipaddress.ip_address("fd00:ec2::254"): "a cloud metadata address",
    ipaddress.ip_address("100.100.100.200"): "a cloud metadata address",
}
# Python 3.11 counts these as global; they are not reachable on the internet.
_NOT_GLOBAL = [
    ipaddress.ip_network("192.0.0.0/24"),  # IETF protocol assignments (Oracle's metadata)
    ipaddress.ip_network("100.64.0.0/10"),  # CGNAT shared space
    ipaddress.ip_network("64:ff9b:1::/48"),  # local-use NAT64
]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")

# A DNS label as http hosts use it; `_` is tolerated because some real hosts have one.
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
# What a resolver may read as an IPv4 number: 2130706433, 0x7f000001, 0177, 127.1.
_NUMERIC_LABEL = re.compile(r"0x[0-9a-f]*|[0-9]+")


class UrlRefused(ValueError):
    """A URL or host Tunery will not fetch; the message says why and never shows the query."""


class UrlSettings(Protocol):
    @property
    def allow_http_urls(self) -> bool: ...

    @property
    def allowed_private_url_hosts(self) -> Sequence[str]: ...


@dataclass(frozen=True)
class UrlPolicy:
    """The operator's exceptions to the rules; the default allows none."""

    allow_http: bool = False
    # Hosts (names or IP literals, any port) that may resolve to non-global addresses,
    # e.g. MinIO on a private network.
    allowed_private_hosts: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: UrlSettings) -> UrlPolicy:
        hosts = frozenset(normalize_host(h) for h in settings.allowed_private_url_hosts)
        return cls(settings.allow_http_urls, hosts)

    def allows_private(self, host: str) -> bool:
        return normalize_host(host) in self.allowed_private_hosts


@dataclass(frozen=True)
class UrlTarget:
    scheme: str
    host: str
    port: int


def normalize_host(host: str) -> str:
    """Lower case, no brackets, no trailing dot: the form allow-list entries are compared in."""
    return host.strip().strip("[]").lower().rstrip(".")


def check_url(url: str, policy: UrlPolicy) -> UrlTarget:
    """The scheme, credentials and host grammar of `url`, and its host if it is an IP literal;
    no DNS. Raises `UrlRefused`."""
    _check_characters(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:  # a bad port or bracket
        raise UrlRefused(f"the URL is malformed: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme == "http" and not policy.allow_http:
        raise UrlRefused(
            "only https URLs are allowed, not http: (TUNERY_ALLOW_HTTP_URLS is off)"
        )
    if scheme not in ("https", "http"):
        raise UrlRefused(f"only https URLs are allowed, not {parts.scheme}:")
    if parts.username is not None or parts.password is not None:
        raise UrlRefused("credentials in the URL are not allowed")
    host = parts.hostname
    if not host:
        raise UrlRefused("the URL has no host")
    if "[" in parts.netloc and not isinstance(_ip_literal(host), ipaddress.IPv6Address):
        raise UrlRefused(
            f"the URL is malformed: only an IPv6 address goes in brackets, not {host!r}"
        )
    _check_host_grammar(host, policy)
    if port is None:
        port = 443 if scheme == "https" else 80
    return UrlTarget(scheme, host, port)


def _check_characters(url: str) -> None:
    # urlsplit silently drops tab, CR and LF, so the parts checked would not be the string
    # that is stored and later sent; an HTTP client refuses such a URL, or worse, a lenient
    # one writes it into the request line. A URL that means anything has them percent-encoded.
    for position, char in enumerate(url):
        if char.isspace() or ord(char) < 0x20 or ord(char) == 0x7F:
            raise UrlRefused(
                f"the URL contains a control character or whitespace ({char!r} at position "
                f"{position}); percent-encode it (a space is %20)"
            )
        # A lone surrogate (JSON's \ud800) is no character at all: it cannot be stored or sent.
        if 0xD800 <= ord(char) <= 0xDFFF:
            raise UrlRefused(f"the URL contains an unpaired surrogate at position {position}")


def _check_host_grammar(host: str, policy: UrlPolicy) -> None:
    literal = _ip_literal(host)
    if literal is not None:
        if not policy.allows_private(host):
            _refuse_address(host, literal)
        return
    name = normalize_host(host)
    if not name.isascii():
        raise UrlRefused(f"host {host!r}: write international host names in their xn-- form")
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.fullmatch(label) for label in labels):
        raise UrlRefused(f"host {host!r} is not a valid host name")
    # inet_aton, which getaddrinfo uses, reads 2130706433, 0x7f.1, 0177.0.0.1 and 127.1 as
    # 127.0.0.1; an address must be written as the four decimals everyone reads alike.
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        raise UrlRefused(
            f"host {host!r} looks like an IP address: write IPv4 addresses as four decimal "
            "numbers (a.b.c.d)"
        )


def _ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(normalize_host(host))
    except ValueError:
        return None


def refusal_reason(address: IPAddress) -> str | None:
    """Why `address` must not be fetched from (e.g. "loopback"), or None for a global one."""
    if address in _METADATA:
        return _METADATA[address]
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            inner = refusal_reason(embedded)
            return f"an IPv6 form of {embedded}, {inner}" if inner else None
    for name, hit in (
        ("unspecified", address.is_unspecified),
        ("loopback", address.is_loopback),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
    ):
        if hit:
            return name
    if not address.is_global or any(address in net for net in _NOT_GLOBAL):
        return "not globally routable"
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address that an IPv4-mapped, -compatible, NAT64 or 6to4 address leads to."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    # ::/96 also holds :: and ::1, which the IPv6 checks name better.
    if (address in _IPV4_COMPATIBLE and int(address) > 1) or address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _refuse_address(host: str, address: IPAddress) -> None:
    reason = refusal_reason(address)
    if reason:
        shown = host if normalize_host(host) == str(address) else f"{host} ({address})"
        raise UrlRefused(f"host {shown} is {reason}; Tunery does not fetch from it")


def resolve_allowed(host: str, port: int, policy: UrlPolicy) -> list[str]:
    """The addresses of `host` to connect to, or `UrlRefused` if it does not resolve or ANY of
    its addresses is refused (a name with one private answer is refused whole).

    Connect to these addresses and to nothing resolved later: that is what keeps a DNS answer
    that changes between check and connect (rebinding) from reaching an internal address.
    """
    _check_host_grammar(host, policy)
    literal = _ip_literal(host)
    if literal is not None:
        return [str(literal)]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        raise UrlRefused(f"host {host!r} does not resolve") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise UrlRefused(f"host {host!r} does not resolve")
    if not policy.allows_private(host):
        for address in addresses:
            _refuse_address(host, ipaddress.ip_address(address.split("%")[0]))
    return addresses


def check_url_resolves(url: str, policy: UrlPolicy) -> list[str]:
    """`check_url`, then `resolve_allowed` for its host: the full check at submit time."""
    target = check_url(url, policy)
    return resolve_allowed(target.host, target.port, policy)


def redact_url(url: str) -> str:
    """The URL without credentials and query string, safe for logs and error messages.

    A presigned URL's query is its signature: whoever reads a log line must not be able to
    fetch the data with it.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    query = "?…" if parts.query else ""
    return f"{parts.scheme}://{host}{parts.path}{query}"
