"""Keep-alive connections to upstreams (other sidecars, the app, egress hosts).

`Pool` keeps idle `UpstreamConnection`s per address, most recently used first, and
opens new ones. An idle connection that the peer closes (or that receives bytes nobody
asked for) is dropped at once, so it is never handed out; the race where the peer
closes just as a request is written is left to the exchange, which replays the request
on a fresh connection (see proxy.exchange).

While a connection is lent to an exchange, its protocol callbacks go to that exchange.
Idle connections are closed after the sidecar's idle timeout (`close_idle`, called by the
server's sweeper), so the connections kept follow recent concurrency, not the peak ever
seen; `Pool.now` is the sweeper's clock, read instead of calling loop.time() per request.

Each connection counts the bytes it received and the bytes its users wrote
(`bytes_out`, added by the writer); when `Pool.observer` is set, a connection's opening
and, with its byte counts, its close are reported once (mesh_tcp_* metrics, direction
outbound, the peer named by `connect(peer=...)`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import TYPE_CHECKING

from meshctl.proxy.connect import create_connection
from meshctl.proxy.http1 import Parser
from meshctl.proxy.metrics import OUTBOUND
from meshctl.proxy.tls import ClientTLS

if TYPE_CHECKING:
    from meshctl.proxy.observe import Observer

log = logging.getLogger("proxy.pool")

MAX_IDLE_PER_ADDRESS = 256


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to an upstream; `owner` is the exchange using it, or None when idle."""

    __slots__ = ("pool", "address", "transport", "parser", "owner", "closed", "reading_paused", "requests", "peer", "bytes_in", "bytes_out",
                 "reported", "idle_since")

    def __init__(self, pool: Pool, address: tuple[str, int], peer: str = "unknown") -> None:
        self.pool = pool
        self.address = address
        self.peer = peer
        self.bytes_in = 0
        self.bytes_out = 0
        self.reported = False
        self.transport: asyncio.Transport | None = None
        self.parser = Parser(is_request=False)
        self.owner = None
        self.closed = False
        self.reading_paused = False
        self.requests = 0
        self.idle_since = 0.0

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("busy" if self.owner is not None else "idle")
        return "<UpstreamConnection %s:%d %s, %d requests>" % (self.address[0], self.address[1], state, self.requests)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        owner = self.owner
        if owner is not None:
            owner.upstream_data(data)
        else:
            log.debug("unexpected %d bytes on idle upstream connection %r", len(data), self)
            self.close()

    def eof_received(self) -> bool:
        owner = self.owner
        if owner is not None:
            owner.upstream_eof()
        else:
            self.close()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        owner = self.owner
        self.owner = None
        self.pool.forget(self)
        if self.reported:
            self.reported = False
            observer = self.pool.observer
            if observer is not None:
                observer.tcp_closed(OUTBOUND, self.peer, self.bytes_in, self.bytes_out)
        if owner is not None:
            owner.upstream_lost(self, exc)

    def pause_writing(self) -> None:
        owner = self.owner
        if owner is not None:
            owner.upstream_write_paused()

    def resume_writing(self) -> None:
        owner = self.owner
        if owner is not None:
            owner.upstream_write_resumed()

    def pause_reading(self) -> None:
        if not self.reading_paused and not self.closed:
            self.reading_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def resume_reading(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.owner = None
            self.pool.forget(self)
            if self.transport is not None:
                self.transport.close()

    def abort(self) -> None:
        self.owner = None
        if self.transport is not None:
            self.transport.abort()
        self.closed = True
        self.pool.forget(self)


class Pool:
    """Idle upstream connections by address; `take()` them, `release()` them back."""

    __slots__ = ("loop", "_idle", "observer", "now", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.now = loop.time()  # advanced by the server's sweeper
        self._idle: dict[tuple[str, int], list[UpstreamConnection]] = {}
        self.observer: Observer | None = None  # set by proxy.observe while metrics are on

    def __repr__(self) -> str:
        return "<Pool %d idle over %d addresses>" % (sum(map(len, self._idle.values())), len(self._idle))

    def idle_count(self, address: tuple[str, int]) -> int:
        return len(self._idle.get(address, ()))

    def take(self, address: tuple[str, int]) -> UpstreamConnection | None:
        idle = self._idle.get(address)
        while idle:
            conn = idle.pop()
            if not conn.closed:
                return conn
        return None

    def release(self, conn: UpstreamConnection) -> None:
        """Put a connection whose last response ended cleanly back into the pool."""
        conn.owner = None
        if conn.closed:
            return
        conn.resume_reading()
        conn.parser.start_next_cycle()
        idle = self._idle.setdefault(conn.address, [])
        if len(idle) >= MAX_IDLE_PER_ADDRESS:
            conn.close()
            return
        conn.idle_since = self.now
        idle.append(conn)

    def add_idle(self, conn: UpstreamConnection) -> None:
        """Keep a fresh, never used connection (its exchange no longer needed it)."""
        conn.owner = None
        if not conn.closed:
            conn.idle_since = self.now
            self._idle.setdefault(conn.address, []).append(conn)

    def close_idle(self, idle_before: float) -> int:
        """Close the connections idle since before `idle_before`; how many were closed.

        `take` hands out the most recently used, so each list is oldest first and the
        connections that stay idle are the ones a quieter load no longer needs.
        """
        stale = []
        for idle in self._idle.values():
            for conn in idle:
                if conn.idle_since >= idle_before:
                    break
                stale.append(conn)
        for conn in stale:
            conn.close()
        return len(stale)

    def forget(self, conn: UpstreamConnection) -> None:
        idle = self._idle.get(conn.address)
        if idle and conn in idle:
            idle.remove(conn)

    async def connect(self, address: tuple[str, int], timeout: float, tls: ClientTLS | None = None, peer: str = "unknown") -> UpstreamConnection:
        """A new connection, with mTLS when `tls` is given; raises OSError or asyncio.TimeoutError.

        The handshake counts against the connect timeout, and a peer that presents another
        identity than the service's is refused like a failed connect (PeerIdentityError).
        """
        async with asyncio.timeout(timeout):
            if tls is None:
                _, conn = await create_connection(self.loop, lambda: UpstreamConnection(self, address, peer), address[0], address[1])
            else:
                transport, conn = await self.loop.create_connection(
                    lambda: UpstreamConnection(self, address, peer), address[0], address[1],
                    ssl=tls.context, server_hostname=tls.server_name,
                )
                tls.verify(transport)
        observer = self.observer
        if observer is not None and not conn.closed:
            conn.reported = True
            observer.tcp_opened(OUTBOUND, peer)
        return conn

    def close_all(self) -> None:
        for idle in list(self._idle.values()):
            for conn in list(idle):
                conn.close()
        self._idle.clear()
