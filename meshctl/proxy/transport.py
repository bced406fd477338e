"""Which transport layer carries the sidecar's sockets: aiofastnet, or the loop's own.

aiofastnet (aio-libs) reimplements asyncio's transports and TLS in Cython over OpenSSL,
on top of any loop (uvloop included): every TLS record then skips `ssl.SSLObject`'s Python
wrappers. With MESHCTL_PROXY_TRANSPORT=aiofastnet (and the package installed) it carries
every connection the sidecar makes or accepts; otherwise the loop's own transports do,
with the same behaviour. The sidecar's log names the one in use.

Not the default yet: it cut the sidecar pair's CPU per request by about 14 % in
`make bench-quick`, but under a burst of a thousand silent client connections (turned
into TCP relays, each a new mTLS handshake) more of the handshakes missed their connect
timeout than with uvloop's transports (tests/test_abuse.py). The burst handling of
issue #24 comes first; the default flips when that test holds on both.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable
from typing import Any

log = logging.getLogger("proxy.transport")

ENV_NAME = "MESHCTL_PROXY_TRANSPORT"
FAST = "aiofastnet"
LOOP = "loop"


def _fast_module() -> Any | None:
    if os.environ.get(ENV_NAME, LOOP) != FAST:
        return None
    try:
        import aiofastnet  # type: ignore[import-not-found,unused-ignore]  # optional: not installed off Linux (it ships its types where it is)
    except ImportError:
        return None
    return aiofastnet


class Transports:
    """The chosen layer: `install` patches a new loop; accepted sockets go through here."""

    def __init__(self) -> None:
        self._fast = _fast_module()
        self.name = FAST if self._fast is not None else LOOP

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._fast is not None:
            self._fast.patch_loop(loop)

    async def connect_accepted_socket(
        self,
        loop: asyncio.AbstractEventLoop,
        factory: Callable[[], asyncio.BaseProtocol],
        sock: socket.socket,
        **tls: Any,
    ) -> None:
        # patch_loop leaves connect_accepted_socket alone, so the acceptor asks for it here.
        if self._fast is not None:
            await self._fast.connect_accepted_socket(loop, factory, sock, **tls)
        else:
            await loop.connect_accepted_socket(factory, sock, **tls)


TRANSPORTS = Transports()
