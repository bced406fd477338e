"""CONNECT tunnels for egress: a raw TCP relay between a client and an allowed host.

On a forward listener, `CONNECT host:port` to a host listed in `egress` (as `host` or
`host:port`) opens a TCP connection to it, answers `200 Connection Established` and then
relays bytes both ways unchanged (typically TLS the proxy cannot and does not read).
Decisions live in proxy.listeners (403 egress-denied for other hosts, 400 for mesh
service names, which take plain HTTP through the proxy); this module is the driver:

* bytes the client sent right after the CONNECT head (a pipelined TLS ClientHello) are
  forwarded once the upstream is connected; while connecting, at most
  MAX_BUFFERED_BYTES are held before the client is paused;
* backpressure both ways: a full write buffer on one side pauses reading on the other;
* half-close is passed through (EOF on one side becomes write_eof on the other); the
  tunnel closes when both sides have finished, or at once when either side is lost;
* tunnels have no idle timeout: they live as long as both peers keep them open.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from meshctl.proxy.errors import error_response

if TYPE_CHECKING:
    from meshctl.proxy.server import ClientConnection

log = logging.getLogger("proxy.tunnel")

MAX_BUFFERED_BYTES = 256 * 1024
ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"


class TunnelUpstream(asyncio.Protocol):
    """The upstream side of one tunnel; every callback goes to its `Tunnel`."""

    __slots__ = ("tunnel", "transport")

    def __init__(self, tunnel: Tunnel) -> None:
        self.tunnel = tunnel
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.tunnel.client.transport.write(data)

    def eof_received(self) -> bool:
        return self.tunnel.upstream_eof()

    def connection_lost(self, exc: Exception | None) -> None:
        self.tunnel.upstream_lost()

    def pause_writing(self) -> None:
        self.tunnel.client.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.tunnel.client.closed:
            self.tunnel.client.transport.resume_reading()


class Tunnel:
    """One CONNECT tunnel; the `ClientConnection` hands its callbacks here once it is one."""

    __slots__ = ("client", "address", "upstream", "buffered", "buffered_size", "client_eof", "upstream_eof_seen", "task", "closed")

    def __init__(self, client: ClientConnection, address: tuple[str, int]) -> None:
        self.client = client
        self.address = address
        self.upstream: TunnelUpstream | None = None
        self.buffered: list[bytes] = []
        self.buffered_size = 0
        self.client_eof = False
        self.upstream_eof_seen = False
        self.task: asyncio.Task | None = None
        self.closed = False

    def __repr__(self) -> str:
        return "<Tunnel to %s:%d%s>" % (self.address[0], self.address[1], " connected" if self.upstream else "")

    def start(self, early_bytes: bytes, connect_timeout: float) -> None:
        if early_bytes:
            self.client_data(early_bytes)
        self.task = self.client.state.loop.create_task(self._connect(connect_timeout), name="tunnel-connect")

    async def _connect(self, timeout: float) -> None:
        loop = self.client.state.loop
        try:
            async with asyncio.timeout(timeout):
                _, upstream = await loop.create_connection(lambda: TunnelUpstream(self), self.address[0], self.address[1])
        except (OSError, TimeoutError) as exc:
            self.task = None
            if not self.client.closed:
                detail = "egress %s:%d: %s" % (self.address[0], self.address[1], getattr(exc, "strerror", None) or exc or "connect timed out")
                self.client.transport.write(error_response("upstream-connect-failed", detail, close=True))
                self.client.close()
            return
        self.task = None
        if self.closed:
            upstream.transport.close()  # type: ignore[union-attr]
            return
        self.upstream = upstream
        transport = upstream.transport
        self.client.transport.write(ESTABLISHED)
        if self.buffered:
            transport.writelines(self.buffered)  # type: ignore[union-attr]
            self.buffered = []
            self.buffered_size = 0
            self.client.transport.resume_reading()
        if self.client_eof and transport.can_write_eof():  # type: ignore[union-attr]
            transport.write_eof()  # type: ignore[union-attr]

    # -- client side (called by the ClientConnection) ----------------------------------

    def client_data(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None:
            upstream.transport.write(data)  # type: ignore[union-attr]
            return
        self.buffered.append(data)
        self.buffered_size += len(data)
        if self.buffered_size > MAX_BUFFERED_BYTES:
            self.client.transport.pause_reading()

    def client_eof_received(self) -> bool:
        self.client_eof = True
        if self.upstream_eof_seen:
            self.close()
            return False
        upstream = self.upstream
        if upstream is not None and upstream.transport.can_write_eof():  # type: ignore[union-attr]
            upstream.transport.write_eof()  # type: ignore[union-attr]
        return True

    def client_lost(self) -> None:
        self.close()

    def client_write_paused(self) -> None:
        if self.upstream is not None:
            self.upstream.transport.pause_reading()  # type: ignore[union-attr]

    def client_write_resumed(self) -> None:
        if self.upstream is not None and not self.closed:
            self.upstream.transport.resume_reading()  # type: ignore[union-attr]

    # -- upstream side -----------------------------------------------------------------

    def upstream_eof(self) -> bool:
        self.upstream_eof_seen = True
        if self.client_eof:
            self.close()
            return False
        transport = self.client.transport
        if not self.client.closed and transport.can_write_eof():
            transport.write_eof()
        return True

    def upstream_lost(self) -> None:
        self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self.task is not None:
            self.task.cancel()
            self.task = None
        if self.upstream is not None:
            self.upstream.transport.close()  # type: ignore[union-attr]
        self.client.close()
