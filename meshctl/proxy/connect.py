"""Opening a connection to an address from the snapshot: a host and port, or an app's Unix socket.

An inbound listener's `app` is [host, port], or the path of the socket the app listens on
(`listen: unix`, docs/protocols.md). The path travels as the host with port 0, so every
caller keeps the one (host, port) shape and only the connect itself differs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


def is_socket_path(host: str) -> bool:
    return host.startswith("/")


def create_connection(
    loop: asyncio.AbstractEventLoop, factory: Callable[[], asyncio.Protocol], host: str, port: int, **kwargs: Any
) -> Coroutine[Any, Any, tuple[asyncio.Transport, asyncio.Protocol]]:
    """`loop.create_connection`, or `create_unix_connection` when `host` is a socket path."""
    if is_socket_path(host):
        return loop.create_unix_connection(factory, host, **kwargs)
    return loop.create_connection(factory, host, port, **kwargs)
