"""The SSRF guard for webhook URLs: http(s) only, and never a private address.

Checked at submission and again at send time (DNS can change in between), unless
``OUTLAST_WEBHOOK_ALLOW_PRIVATE=1``. At send time :func:`guarded_session` also checks the
address the socket actually connected to, so a name that resolves to a public address
for the check and to a private one for the connection (DNS rebinding) is still refused.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool


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


# --- send time: the connected peer -------------------------------------------------------


def check_peer_address(address: str) -> None:
    """Raise :class:`UnsafeUrl` when a connected socket's peer address is forbidden."""
    ip = ipaddress.ip_address(address.split("%")[0])
    if _is_forbidden(ip):
        raise UnsafeUrl(
            f"the connection went to {ip}, a private, loopback, link-local, multicast or "
            "reserved address (set OUTLAST_WEBHOOK_ALLOW_PRIVATE=1 to allow it)"
        )


class _PeerCheckedConnection:
    """Mixin for urllib3 connections: refuse the socket if its peer is forbidden."""

    def _new_conn(self) -> socket.socket:
        sock = super()._new_conn()  # type: ignore[misc]
        try:
            check_peer_address(sock.getpeername()[0])
        except BaseException:
            sock.close()
            raise
        return sock


class _GuardedHTTPConnection(_PeerCheckedConnection, HTTPConnection):
    pass


class _GuardedHTTPSConnection(_PeerCheckedConnection, HTTPSConnection):
    pass


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class _GuardedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _GuardedHTTPPool,
            "https": _GuardedHTTPSPool,
        }


def guarded_session(*, allow_private: bool) -> requests.Session:
    """A ``requests`` session for calling customer URLs.

    It ignores proxy and netrc settings from the environment (a proxy would hide the
    real destination) and, unless ``allow_private``, refuses any connection whose peer
    address is forbidden, whatever DNS answered. Redirects are the caller's choice
    (webhooks pass ``allow_redirects=False``).
    """
    session = requests.Session()
    session.trust_env = False
    if not allow_private:
        adapter = _GuardedAdapter(max_retries=0)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
    return session
