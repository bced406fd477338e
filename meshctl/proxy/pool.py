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

Connections are established by the pool, not by the requests that need them (Envoy's
connection pool does the same). A request that finds no idle connection `wait()`s in its
address's `Dial`, first in first out; the pool opens at most `MAX_ESTABLISHING` connections
per address at a time (fewer if fewer are waiting), and each connection that becomes free,
fresh from a handshake or released by the request before, goes to the longest waiting
request. So a burst of a thousand requests costs a few handshakes in flight, not a thousand
handshakes competing for the CPU until the connect timeout throws them all away. A request
that gives up (`cancel()`) leaves the line; the handshake it started carries on and its
connection serves the next request or waits in the pool.

Establishing a connection has two limits: the TCP connect (the service's
`connect_timeout`, 1 s by default) and, for mTLS, the TLS handshake after it
(`handshake_timeout`, 10 s by default): a handshake queued behind others on a busy peer is
slow, not failed. A failed attempt fails the oldest waiting request only while the address
has other open connections (one bad attempt to a live peer), and every waiting request when
it has none (the peer is down or unreachable); the exchange then retries elsewhere or after
a backoff (proxy.exchange).

Each connection counts the bytes it received and the bytes its users wrote
(`bytes_out`, added by the writer); when `Pool.observer` is set, a connection's opening
and, with its byte counts, its close are reported once (mesh_tcp_* metrics, direction
outbound, the peer named by `connect(peer=...)`).
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol, cast

from meshctl.proxy.connect import create_connection
from meshctl.proxy.http1 import Parser
from meshctl.proxy.metrics import OUTBOUND
from meshctl.proxy.tls import ClientTLS

log = logging.getLogger("proxy.pool")

MAX_IDLE_PER_ADDRESS = 256
MAX_ESTABLISHING = 4  # connections being opened per address at a time
DEFAULT_HANDSHAKE_TIMEOUT = 10.0


class ConnectionObserver(Protocol):
    """What the pool reports its connections to: proxy.observe's Observer, while metrics are on."""

    def tcp_opened(self, direction: str, peer_service: str) -> None: ...

    def tcp_closed(self, direction: str, peer_service: str, bytes_in: int, bytes_out: int) -> None: ...


class Waiter(Protocol):
    """A request waiting in an address's line for a connection (proxy.exchange.Exchange)."""

    def pooled(self, conn: UpstreamConnection, reused: bool) -> None:
        """The pool hands over `conn`, which it no longer owns; `reused` when it served a request before."""

    def connect_failed(self, outcome: str, detail: str) -> None:
        """Opening a connection for the line failed (`outcome` as in proxy.retry)."""


class Owner(Protocol):
    """Who gets a lent connection's callbacks: an exchange, a mirror, a shadow's response tap."""

    def upstream_data(self, data: bytes) -> None: ...

    def upstream_eof(self) -> None: ...

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None: ...

    def upstream_write_paused(self) -> None: ...

    def upstream_write_resumed(self) -> None: ...


class Dial:
    """One address's line of requests waiting for a connection, and its connects in flight."""

    __slots__ = ("waiters", "establishing", "open")

    def __init__(self) -> None:
        self.waiters: deque[Waiter] = deque()
        self.establishing = 0
        self.open = 0  # connections made and not yet lost

    def __repr__(self) -> str:
        return "<Dial %d waiting, %d establishing, %d open>" % (len(self.waiters), self.establishing, self.open)


class ConnectFailed(OSError):
    """A connection attempt failed; `outcome` is connect-failure or refused (proxy.retry)."""

    def __init__(self, outcome: str, detail: str) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail


class _Unconnected(asyncio.Transport):
    """A connection's transport until connection_made: closing or pausing it does nothing."""

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


NOT_CONNECTED = _Unconnected()


class UpstreamConnection(asyncio.Protocol):
    """One TCP connection to an upstream; `owner` is the exchange using it, or None when idle."""

    __slots__ = ("pool", "address", "transport", "parser", "owner", "closed", "reading_paused", "requests", "peer", "bytes_in", "bytes_out",
                 "reported", "idle_since", "dial")

    def __init__(self, pool: Pool, address: tuple[str, int], peer: str = "unknown") -> None:
        self.pool = pool
        self.address = address
        self.peer = peer
        self.bytes_in = 0
        self.bytes_out = 0
        self.reported = False
        self.transport: asyncio.Transport = NOT_CONNECTED  # until connection_made
        self.parser = Parser(is_request=False)
        self.owner: Owner | None = None
        self.closed = False
        self.reading_paused = False
        self.requests = 0
        self.idle_since = 0.0
        self.dial: Dial | None = None  # set once connected, to count it open

    def __repr__(self) -> str:
        state = "closed" if self.closed else ("busy" if self.owner is not None else "idle")
        return "<UpstreamConnection %s:%d %s, %d requests>" % (self.address[0], self.address[1], state, self.requests)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream transport (uvloop's do not subclass asyncio's)
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
        dial = self.dial
        if dial is not None:
            self.dial = None
            dial.open -= 1
            self.pool.drop_unused(self.address, dial)
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
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if self.reading_paused and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.owner = None
            self.pool.forget(self)
            self.transport.close()

    def abort(self) -> None:
        self.owner = None
        self.transport.abort()
        self.closed = True
        self.pool.forget(self)


class Pool:
    """Idle upstream connections by address; `take()` them, `release()` them back, `wait()` for one."""

    __slots__ = ("loop", "_idle", "_dials", "_tasks", "observer", "now", "__weakref__")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.now = loop.time()  # advanced by the server's sweeper
        self._idle: dict[tuple[str, int], list[UpstreamConnection]] = {}
        self._dials: dict[tuple[str, int], Dial] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.observer: ConnectionObserver | None = None  # set by proxy.observe while metrics are on

    def __repr__(self) -> str:
        return "<Pool %d idle over %d addresses>" % (sum(map(len, self._idle.values())), len(self._idle))

    def idle_count(self, address: tuple[str, int]) -> int:
        return len(self._idle.get(address, ()))

    def dial(self, address: tuple[str, int]) -> Dial:
        dial = self._dials.get(address)
        if dial is None:
            dial = self._dials[address] = Dial()
        return dial

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
        if conn.reading_paused:
            conn.resume_reading()
        conn.parser.start_next_cycle()
        dial = conn.dial
        if dial is not None and dial.waiters:
            dial.waiters.popleft().pooled(conn, True)
            return
        idle = self._idle.setdefault(conn.address, [])
        if len(idle) >= MAX_IDLE_PER_ADDRESS:
            conn.close()
            return
        conn.idle_since = self.now
        idle.append(conn)

    def add_idle(self, conn: UpstreamConnection) -> None:
        """A fresh, never used connection: to the longest waiting request, else kept idle."""
        conn.owner = None
        if conn.closed:
            return
        dial = conn.dial
        if dial is not None and dial.waiters:
            dial.waiters.popleft().pooled(conn, False)
            return
        conn.idle_since = self.now
        self._idle.setdefault(conn.address, []).append(conn)

    def wait(self, waiter: Waiter, address: tuple[str, int], timeout: float, tls: ClientTLS | None = None, peer: str = "unknown",
             handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT) -> None:
        """Queue `waiter` for the next free connection to `address`, opening one if the line needs it.

        The pool calls `waiter.pooled(conn, reused)` with a connection it now owns, or
        `waiter.connect_failed(outcome, detail)`; `cancel()` takes it out of the line.
        """
        dial = self.dial(address)
        dial.waiters.append(waiter)
        if dial.establishing < MAX_ESTABLISHING and dial.establishing < len(dial.waiters):
            dial.establishing += 1
            task = self.loop.create_task(self._establish(address, dial, timeout, tls, peer, handshake_timeout))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def cancel(self, waiter: Waiter, address: tuple[str, int]) -> None:
        dial = self._dials.get(address)
        if dial is not None:
            try:
                dial.waiters.remove(waiter)
            except ValueError:
                pass

    async def _establish(self, address: tuple[str, int], dial: Dial, timeout: float, tls: ClientTLS | None, peer: str,
                         handshake_timeout: float) -> None:
        """Open connections for `dial`'s line until it is served; `dial.establishing` counts this task."""
        try:
            while True:
                try:
                    conn = await self.connect(address, timeout, tls, peer, handshake_timeout)
                except ConnectFailed as exc:
                    self._failed(dial, exc)
                else:
                    self.add_idle(conn)  # to the longest waiting request, if one still waits
                # Others in flight serve establishing - 1 of those waiting; more than that: go on.
                if len(dial.waiters) < dial.establishing:
                    return
        finally:
            dial.establishing -= 1
            self.drop_unused(address, dial)

    def drop_unused(self, address: tuple[str, int], dial: Dial) -> None:
        """Forget an address's line once nothing waits, opens or is open (endpoints come and go)."""
        if not dial.waiters and not dial.establishing and not dial.open and self._dials.get(address) is dial:
            del self._dials[address]

    @staticmethod
    def _failed(dial: Dial, exc: ConnectFailed) -> None:
        if not dial.waiters:
            return
        if dial.open > 0:
            # The peer is serving other connections: this attempt failed, not the peer.
            dial.waiters.popleft().connect_failed(exc.outcome, exc.detail)
            return
        # Each may retry elsewhere and queue again; a copy, so the retries are not failed here too.
        waiters = list(dial.waiters)
        dial.waiters.clear()
        for waiter in waiters:
            waiter.connect_failed(exc.outcome, exc.detail)

    def close_idle(self, idle_before: float) -> int:
        """Close the connections idle since before `idle_before`; how many were closed.

        `take` hands out the most recently used, so each list is oldest first and the
        connections that stay idle are the ones a quieter load no longer needs.
        """
        stale: list[UpstreamConnection] = []
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

    async def connect(self, address: tuple[str, int], timeout: float, tls: ClientTLS | None = None, peer: str = "unknown",
                      handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT) -> UpstreamConnection:
        """A new connection, with mTLS when `tls` is given; raises ConnectFailed.

        `timeout` limits the TCP connect, `handshake_timeout` the TLS handshake after it. A
        peer that presents another identity than the service's is refused like a failed
        connect (PeerIdentityError).
        """
        conn = UpstreamConnection(self, address, peer)
        try:
            async with asyncio.timeout(timeout):
                transport, _ = await create_connection(self.loop, lambda: conn, address[0], address[1])
        except TimeoutError:
            raise ConnectFailed("connect-failure", "connect timed out after %gs" % timeout) from None
        except ConnectionRefusedError:
            raise ConnectFailed("refused", "connection refused") from None
        except OSError as exc:
            raise ConnectFailed("connect-failure", exc.strerror or str(exc)) from None
        if tls is not None:
            try:
                secured = await self.loop.start_tls(
                    transport, conn, tls.context, server_hostname=tls.server_name, ssl_handshake_timeout=handshake_timeout
                )
                if secured is None:
                    raise EOFError("the connection closed during the handshake")
                conn.transport = secured
                tls.verify(secured)
            except (OSError, TimeoutError, EOFError) as exc:
                transport.abort()
                conn.closed = True
                if isinstance(exc, TimeoutError):
                    raise ConnectFailed("connect-failure", "TLS handshake timed out after %gs" % handshake_timeout) from None
                raise ConnectFailed("connect-failure", "TLS handshake failed: %s" % (exc,)) from None
        conn.dial = dial = self.dial(address)
        dial.open += 1
        observer = self.observer
        if observer is not None and not conn.closed:
            conn.reported = True
            observer.tcp_opened(OUTBOUND, peer)
        return conn

    def close_all(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for idle in list(self._idle.values()):
            for conn in list(idle):
                conn.close()
        self._idle.clear()
