"""The SSRF guard for customer URLs (webhooks, and agent tools with
``OUTLAST_TOOLS_DENY_PRIVATE=1``): http(s) only, and never a private address.

Checked at submission and again at send time (DNS can change in between), unless
``OUTLAST_WEBHOOK_ALLOW_PRIVATE=1``. At send time :func:`guarded_session` resolves the
name itself, checks every address, and connects only to an address it checked (then
checks the connected peer once more): a name that resolves to a public address for the
first check and to a private one for the connection (DNS rebinding) never gets a packet
sent to the private address.

Refusals never name an address (V2.md 12a): "this host is not allowed", whether the
name resolved to a private address or did not resolve at all, so that answers cannot
map the operator's network.
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
from urllib3.exceptions import ConnectTimeoutError, NameResolutionError, NewConnectionError
from urllib3.util import connection as urllib3_connection

# What every address-based refusal says: the rule, never the address.
HOST_NOT_ALLOWED = (
    "the host is not allowed: it must resolve only to public addresses (private, loopback, "
    "link-local, multicast and reserved addresses are refused)"
)
CONNECTION_NOT_ALLOWED = "the connection was not allowed (the SSRF guard refused its address)"


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
    """Every address ``host`` resolves to (an IP literal resolves to itself).

    A name that does not resolve is refused with the same words as a private one.
    """
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as exc:
        raise UnsafeUrl(HOST_NOT_ALLOWED) from exc
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
    except ValueError:
        raise UnsafeUrl("not a valid URL") from None
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
    if any(_is_forbidden(ip) for ip in addresses):
        raise UnsafeUrl(HOST_NOT_ALLOWED)
    return url


# --- send time: the connected peer -------------------------------------------------------


def check_peer_address(address: str) -> None:
    """Raise :class:`UnsafeUrl` when a connected socket's peer address is forbidden."""
    if _is_forbidden(ipaddress.ip_address(address.split("%")[0])):
        raise UnsafeUrl(CONNECTION_NOT_ALLOWED)


def _checked_addresses(host: str, port: int) -> list[tuple[int, str]]:
    """``(family, address)`` to connect to for ``host``: resolved once, here, and refused
    as a whole when any address is forbidden (the same rule as :func:`check_url`)."""
    infos = socket.getaddrinfo(
        host, port, urllib3_connection.allowed_gai_family(), socket.SOCK_STREAM
    )
    addresses = [(family, sockaddr[0]) for family, _, _, _, sockaddr in infos]
    for _, address in addresses:
        if _is_forbidden(ipaddress.ip_address(address.split("%")[0])):
            raise UnsafeUrl(CONNECTION_NOT_ALLOWED)
    return addresses


class _PeerCheckedConnection:
    """Mixin for urllib3 connections: resolve the host here, connect only to addresses
    that passed the guard, and refuse the socket if its peer is forbidden all the same."""

    def _new_conn(self) -> socket.socket:
        host, port = self._dns_host, self.port  # type: ignore[attr-defined]
        try:
            addresses = _checked_addresses(host, port)
        except (socket.gaierror, UnicodeError) as exc:
            raise NameResolutionError(self.host, self, exc) from exc  # type: ignore[attr-defined,arg-type]
        sock: socket.socket | None = None
        error: OSError | None = None
        for _family, address in addresses:
            try:
                # An address literal: create_connection resolves nothing more.
                sock = urllib3_connection.create_connection(
                    (address, port),
                    self.timeout,  # type: ignore[attr-defined]
                    source_address=self.source_address,  # type: ignore[attr-defined]
                    socket_options=self.socket_options,  # type: ignore[attr-defined]
                )
                break
            except OSError as exc:
                error = exc
        if sock is None:
            if isinstance(error, TimeoutError | socket.timeout):
                raise ConnectTimeoutError(
                    self,
                    f"Connection to {self.host} timed out. (connect timeout={self.timeout})",  # type: ignore[attr-defined]
                ) from error
            raise NewConnectionError(
                self,
                f"Failed to establish a new connection: {error}",  # type: ignore[arg-type]
            ) from error
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
