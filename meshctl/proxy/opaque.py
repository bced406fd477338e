"""Opaque TCP: a bidirectional byte relay between two transports, with backpressure.

Used for services whose manifest says `protocol: tcp`, for connections that protocol
detection (proxy.detect) could not classify, after an HTTP/1.1 Upgrade (proxy.upgrade),
and for CONNECT tunnels to egress hosts (proxy.dispatch).
The relay does not read what it carries; it only

* forwards bytes unchanged both ways, and counts them (`sent_upstream`, `sent_downstream`)
  for metrics;
* applies backpressure: when one side's write buffer passes its high-water mark the
  other side stops reading until it drains, so a slow reader holds the relay at a
  bounded amount of memory (two write buffers) however much the fast side sends;
* passes half-close through: EOF from one side becomes `write_eof()` on the other when
  that transport can (plain TCP); over TLS, which has no half-close, the other side is
  closed once its buffer has drained. The relay ends when both directions have ended,
  or at once when either connection is lost;
* closes both connections after `idle_timeout` seconds without a byte either way.

A relay has two ends, `relay.downstream` and `relay.upstream`, each an asyncio.Protocol.
An end is attached either the usual way (`loop.create_connection(lambda: relay.upstream,
...)`) or, for a connection that already has a protocol (after a 101, or a CONNECT), with
`relay.adopt_downstream(transport, pending)` which swaps the transport's protocol.
Bytes for an end that is not attached yet are held, up to MAX_EARLY_BYTES, and then
the sending side is paused. An end's `announce` bytes go to the other end when it
attaches, ahead of anything it sends (a CONNECT tunnel's `200 Connection Established`).
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
from collections.abc import Callable

from meshctl.proxy.connect import create_connection

__all__ = ["MAX_EARLY_BYTES", "WRITE_HIGH_WATER", "Relay", "RelayEnd"]

log = logging.getLogger("proxy.opaque")

MAX_EARLY_BYTES = 256 * 1024
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024


class RelayEnd(asyncio.Protocol):
    """One connection of a relay; everything it sees is forwarded to the other end."""

    __slots__ = (
        "relay", "name", "transport", "peer", "announce", "early", "early_size", "eof_received_", "lost", "reading_paused",
        "writing_paused", "sent",
    )

    def __init__(self, relay: Relay, name: str) -> None:
        self.relay = relay
        self.name = name
        self.transport: asyncio.Transport | None = None
        self.peer: RelayEnd = self  # replaced by Relay.__init__
        # Written to the peer when this end attaches, so before any byte it reads (a CONNECT's 200).
        self.announce = b""
        self.early: list[bytes] = []  # bytes for this end that arrived before it was attached
        self.early_size = 0
        self.eof_received_ = False
        self.lost = False
        self.reading_paused = False  # paused because the peer's write buffer is full
        self.writing_paused = False
        self.sent = 0  # bytes written to this end's transport

    def __repr__(self) -> str:
        return "<RelayEnd %s%s>" % (self.name, " attached" if self.transport else "")

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)  # type: ignore[union-attr]
        if self.relay.closed:
            transport.close()
            return
        if self.announce:
            self.peer.write(self.announce)
        if self.early:
            self.write(b"".join(self.early))
            self.early = []
            self.early_size = 0
            self.peer.resume()
        if self.peer.eof_received_:
            self.finish_writing()
        if self.reading_paused:
            self.transport.pause_reading()  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        self.relay.touch()
        self.peer.write(data)

    def eof_received(self) -> bool:
        self.eof_received_ = True
        self.relay.touch()
        self.peer.finish_writing()
        if self.peer.eof_received_:
            self.relay.close()
            return False
        return True  # keep the connection half-open: the other direction may still flow

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if exc is not None:
            log.debug("relay %s end lost: %s", self.name, exc)
        self.relay.close()
        self.relay.end_lost()

    def pause_writing(self) -> None:
        self.writing_paused = True
        self.peer.pause()

    def resume_writing(self) -> None:
        self.writing_paused = False
        self.peer.resume()

    # -- called by the peer end ------------------------------------------------------------

    def write(self, data: bytes) -> None:
        """Send bytes to this end's connection (or hold them until it is attached)."""
        transport = self.transport
        if transport is None:
            self.early.append(data)
            self.early_size += len(data)
            if self.early_size > MAX_EARLY_BYTES:
                self.peer.pause()
            return
        if self.lost:
            return
        self.sent += len(data)
        transport.write(data)

    def finish_writing(self) -> None:
        """The peer will send no more: pass the half-close on."""
        transport = self.transport
        if transport is None or self.lost:
            return  # connection_made passes it on, or the relay is over anyway
        if transport.can_write_eof():
            transport.write_eof()
        elif not self.relay.closed:
            # TLS cannot half-close; close() still flushes what is buffered.
            self.relay.close()

    def pause(self) -> None:
        self.reading_paused = True
        if self.transport is not None and not self.lost:
            self.transport.pause_reading()

    def resume(self) -> None:
        if not self.reading_paused:
            return
        self.reading_paused = False
        if self.transport is not None and not self.lost and not self.relay.closed:
            self.transport.resume_reading()


class Relay:
    """Two RelayEnds joined together; `done` resolves once both connections are closed."""

    __slots__ = ("loop", "downstream", "upstream", "idle_timeout", "last_activity", "closed", "done", "_timer", "_on_close")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        idle_timeout: float | None = None,
        on_close: Callable[[Relay], None] | None = None,
    ) -> None:
        self.loop = loop
        self.downstream = RelayEnd(self, "downstream")
        self.upstream = RelayEnd(self, "upstream")
        self.downstream.peer = self.upstream
        self.upstream.peer = self.downstream
        self.idle_timeout = idle_timeout
        self.last_activity = loop.time()
        self.closed = False
        self.done: asyncio.Future[None] = loop.create_future()
        self._on_close = on_close
        self._timer: asyncio.TimerHandle | None = None
        if idle_timeout is not None:
            self._timer = loop.call_later(idle_timeout, self._check_idle)

    def __repr__(self) -> str:
        return "<Relay up=%d down=%d%s>" % (self.sent_upstream, self.sent_downstream, " closed" if self.closed else "")

    @property
    def sent_upstream(self) -> int:
        """Bytes relayed from the downstream (client) side to the upstream side."""
        return self.upstream.sent

    @property
    def sent_downstream(self) -> int:
        return self.downstream.sent

    def adopt_downstream(self, transport: asyncio.Transport, pending: bytes = b"") -> None:
        """Take over a connection that is already open (its protocol is replaced)."""
        self._adopt(self.downstream, transport, pending)

    def adopt_upstream(self, transport: asyncio.Transport, pending: bytes = b"") -> None:
        self._adopt(self.upstream, transport, pending)

    def _adopt(self, end: RelayEnd, transport: asyncio.Transport, pending: bytes) -> None:
        transport.set_protocol(end)
        end.connection_made(transport)
        if pending:
            end.data_received(pending)
        if not end.reading_paused:
            transport.resume_reading()

    async def connect_upstream(
        self,
        host: str,
        port: int,
        timeout: float,
        ssl: ssl_module.SSLContext | None = None,
        server_hostname: str | None = None,
    ) -> bool:
        """Open the upstream connection; on failure close the relay and return False."""
        try:
            async with asyncio.timeout(timeout):
                await create_connection(
                    self.loop, lambda: self.upstream, host, port, ssl=ssl, server_hostname=server_hostname if ssl else None
                )
        except (OSError, TimeoutError) as exc:
            log.info("relay to %s:%d: %s", host, port, exc or "connect timed out")
            self.close()
            return False
        return True

    def touch(self) -> None:
        self.last_activity = self.loop.time()

    def _check_idle(self) -> None:
        self._timer = None
        if self.closed or self.idle_timeout is None:
            return
        idle_for = self.loop.time() - self.last_activity
        if idle_for >= self.idle_timeout:
            log.debug("relay idle for %.1fs: closing", idle_for)
            self.close()
            return
        self._timer = self.loop.call_later(self.idle_timeout - idle_for, self._check_idle)

    def close(self) -> None:
        """End the relay: both connections close once their buffers have drained."""
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for end in (self.downstream, self.upstream):
            if end.transport is not None and not end.lost:
                end.transport.close()
        self.end_lost()

    def end_lost(self) -> None:
        """Resolve `done` once no end has an open connection left."""
        if self.done.done():
            return
        if all(end.lost or end.transport is None for end in (self.downstream, self.upstream)):
            self.done.set_result(None)
            if self._on_close is not None:
                self._on_close(self)
