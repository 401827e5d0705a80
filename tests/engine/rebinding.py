"""A local resolver stand-in for DNS-rebinding tests, and a tripwire.

Importing this module (a worker does, when it is named in ``OUTLAST_AGENTS``) replaces
``socket.getaddrinfo`` in that process: a name ending in :data:`SUFFIX` resolves to the
public address :data:`PUBLIC` the first time the process looks it up and to 127.0.0.1
every time after. That is the rebinding attack: the check before a call sees a public
address, the connection would go to loopback. A name ending in :data:`NOWHERE` does not
resolve (without asking any DNS server). Other names resolve as usual.

The tripwire replaces ``socket.socket`` with a subclass that refuses to connect to any
non-loopback address (no packet leaves the machine, whatever the code under test does)
and records the attempt. When ``OUTLAST_TEST_REBIND_LOG`` names a file, every stand-in
answer and every tripped connect is appended to it as one JSON line.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

SUFFIX = ".rebind.test"
NOWHERE = ".nowhere.test"
PUBLIC = "93.184.216.34"  # a public address: the guard's first look-up must accept it
LOOPBACK = "127.0.0.1"

_real_getaddrinfo = socket.getaddrinfo
_real_socket = socket.socket
_lock = threading.Lock()
_lookups: dict[str, int] = {}


def _record(entry: dict[str, Any]) -> None:
    path = os.environ.get("OUTLAST_TEST_REBIND_LOG")
    if path:
        with _lock, open(path, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), **entry}) + "\n")


def getaddrinfo(
    host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
):  # noqa: A002
    name = host.decode() if isinstance(host, bytes) else host
    if isinstance(name, str) and name.rstrip(".").endswith(NOWHERE):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    if isinstance(name, str) and name.rstrip(".").endswith(SUFFIX):
        with _lock:
            n = _lookups[name] = _lookups.get(name, 0) + 1
        address = PUBLIC if n == 1 else LOOPBACK
        _record({"lookup": name, "n": n, "address": address})
        return _real_getaddrinfo(address, port, family, type, proto, flags | socket.AI_NUMERICHOST)
    return _real_getaddrinfo(host, port, family, type, proto, flags)


class TripwireSocket(_real_socket):
    """A socket that connects to loopback addresses (and unix sockets) only."""

    def _check(self, address: Any) -> None:
        if self.family in (socket.AF_INET, socket.AF_INET6):
            host = address[0]
            try:
                loopback = ipaddress.ip_address(host.split("%")[0]).is_loopback
            except ValueError:
                loopback = False
            if not loopback:
                _record({"tripwire": str(host)})
                raise ConnectionRefusedError(f"tripwire: no connection to {host} in tests")

    def connect(self, address: Any) -> None:
        self._check(address)
        super().connect(address)

    def connect_ex(self, address: Any) -> int:
        self._check(address)
        return super().connect_ex(address)


def install() -> None:
    socket.getaddrinfo = getaddrinfo
    socket.socket = TripwireSocket  # type: ignore[misc]


def uninstall() -> None:
    socket.getaddrinfo = _real_getaddrinfo
    socket.socket = _real_socket  # type: ignore[misc]


@contextmanager
def installed() -> Iterator[None]:
    """The stand-in and the tripwire in this process, for one test."""
    install()
    try:
        yield
    finally:
        uninstall()


def read_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


if os.environ.get("OUTLAST_TEST_REBIND_LOG"):  # imported by a worker: install for good
    install()
