"""The SSRF guard for webhook URLs: http(s) only, and never a private address.

Checked at submission and again at send time (DNS can change in between), unless
``OUTLAST_WEBHOOK_ALLOW_PRIVATE=1``.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


class UnsafeUrl(ValueError):
    """The URL may not be called; the message says why."""


def _is_forbidden(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return _is_forbidden(ip.ipv4_mapped)
        if ip.sixtofour is not None and _is_forbidden(ip.sixtofour):
            return True
        teredo = ip.teredo
        if teredo is not None and any(_is_forbidden(t) for t in teredo):
            return True
    return (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or not ip.is_global
    )


def resolve(host: str) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """Every address ``host`` resolves to (an IP literal resolves to itself)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeUrl(f"the host {host!r} does not resolve") from exc
    return [ipaddress.ip_address(info[4][0].split("%")[0]) for info in infos]


def check_url(url: str, *, allow_private: bool, resolve_host: bool = True) -> str:
    """Return ``url`` if it may be called, else raise :class:`UnsafeUrl`.

    Refuses non-http(s) schemes, missing hosts, credentials in the URL, and hosts that are
    or resolve to private, loopback, link-local, multicast, reserved or unspecified
    addresses (IPv4-mapped, 6to4 and Teredo IPv6 forms included).
    """
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a bad port
    except ValueError as exc:
        raise UnsafeUrl(f"not a valid URL: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise UnsafeUrl("must be an http or https URL")
    host = parts.hostname
    if not host:
        raise UnsafeUrl("must have a host")
    if parts.username or parts.password:
        raise UnsafeUrl("must not contain credentials")
    del port
    if allow_private:
        return url
    if not resolve_host:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return url
        addresses = [ip]
    else:
        addresses = resolve(host)
    for ip in addresses:
        if _is_forbidden(ip):
            raise UnsafeUrl(
                f"the host resolves to {ip}, a private, loopback, link-local, multicast or "
                "reserved address (set OUTLAST_WEBHOOK_ALLOW_PRIVATE=1 to allow it)"
            )
    return url
