"""The accept side: one `ClientConnection` per client, and the process-wide `ServerState`.

A client connection parses requests with proxy.http1 and hands each one to an
`Exchange`, one at a time: pipelined requests wait in the parser's buffer until the
previous response has been written, so responses come back in order. Each connection
is isolated: a protocol error answers 400/431/413 and closes, an unexpected exception is
logged with its traceback and only that connection is aborted.

Timeouts are not timer handles per request: each connection carries one `deadline`, and
`ServerState` sweeps all connections a few times a second (idle keep-alive, slow
headers, request timeouts). `ServerState` also owns the snapshot, the upstream pool,
the listeners and graceful drain.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Callable, TypeVar, cast

from meshctl.proxy.errors import MeshError, ProtocolError, response_for
from meshctl.proxy.exchange import Exchange
from meshctl.proxy.http1 import END, NEED_DATA, PAUSED, CLOSED, Data, Head, Parser, rebuild_head
from meshctl.proxy import detect, upgrade
from meshctl.proxy.authz import Policy
from meshctl.proxy.dispatch import (
    authorize_connection, egress_tunnel, hand_over, inbound_h2, inbound_relay, ingress_h2, outbound_h2, outbound_relay,
)
from meshctl.proxy.listeners import Target, open_listeners, resolve
from meshctl.proxy.metrics import OUTBOUND
from meshctl.proxy.observe import Observer, rebuild_traced_head, service_of_identity
from meshctl.proxy.peers import PeerGate
from meshctl.proxy.tls import InboundAcceptor, TLSConfig, in_trust_domain, peer_identity
from meshctl.proxy.pool import NOT_CONNECTED, Pool, UpstreamConnection
from meshctl.proxy.snapshot import Listener, Snapshot
from meshctl.proxy.h2proxy import H2Proxy
from meshctl.proxy.opaque import Relay

log = logging.getLogger("proxy.server")

_HandedOver = TypeVar("_HandedOver", H2Proxy, Relay)

SWEEP_INTERVAL = 0.1
PIPELINE_BUFFER_LIMIT = 256 * 1024  # unparsed bytes held while a response is in progress

_PAUSE_PENDING = 1  # request bytes queued while connecting upstream
_PAUSE_UPSTREAM = 2  # the upstream's write buffer is full
_PAUSE_PIPELINE = 4  # too many pipelined bytes waiting

_HEADER_TIMEOUT = MeshError("header-timeout", "request head not received in time")
_UPSTREAM_KEEP_ALIVE = b"connection: keep-alive"


class ServerState:
    """Everything shared by the connections of one sidecar process; an exchange's `Engine` (proxy.interfaces)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # The loop's methods an exchange uses, bound once here rather than looked up per request.
        self.clock = loop.time
        self.call_later = loop.call_later
        self.call_soon = loop.call_soon
        self.pool = Pool(loop)
        self.snapshot: Snapshot | None = None
        self.connections: set[ClientConnection] = set()
        # Connections that left HTTP/1 (proxy.dispatch, upgrades): HTTP/2 proxies and relays, drained too.
        self.handed_over: set[H2Proxy | Relay] = set()
        self.servers: list[asyncio.AbstractServer | InboundAcceptor] = []
        self.gate: PeerGate | None = None  # the local-uid check, when the snapshot asks for it
        self.draining = False
        self.done: asyncio.Future[int] = loop.create_future()
        self._request_id_prefix = os.urandom(6).hex().encode("ascii")
        self._request_counter = 0
        self._sweeper: asyncio.TimerHandle | None = None
        # Metrics, traces, taps and access lines (proxy.observe), set by the control channel
        # with the first snapshot; on_exchange_done is its per-exchange hook (Exchange._completed).
        self.observer: Observer | None = None
        self.on_exchange_done: Callable[[Exchange, str], None] | None = None

    def __repr__(self) -> str:
        return "<ServerState %d connections, %d handed over%s, %r>" % (
            len(self.connections), len(self.handed_over), " draining" if self.draining else "", self.pool)

    def track(self, conn: _HandedOver) -> _HandedOver:
        """Count an HTTP/2 proxy or relay until it closes, so that drain waits for it."""
        self.handed_over.add(conn)
        if isinstance(conn, Relay):
            conn.done.add_done_callback(lambda _: self.handed_over.discard(conn))
        elif self.draining:
            conn.drain()
        return conn

    def untrack(self, conn: H2Proxy | Relay) -> None:
        self.handed_over.discard(conn)

    def next_request_id(self) -> bytes:
        self._request_counter += 1
        return b"%s%012x" % (self._request_id_prefix, self._request_counter)

    async def apply(self, snapshot: Snapshot) -> None:
        """Make `snapshot` current; the first one also opens the listeners."""
        first = self.snapshot is None
        self.snapshot = snapshot
        if first:
            if snapshot.local_uid is not None:
                self.gate = PeerGate(snapshot.local_uid, time.time, self._count_refused)
            self.servers = await open_listeners(
                self.loop, snapshot, self._factory, self._current_tls, lambda: self.snapshot.ingress_tls,  # type: ignore[union-attr]
                self.gate,
            )
            self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def _count_refused(self, listener: str, uid: int | None) -> None:
        if self.observer is not None:
            self.observer.metrics.count_refused(listener, uid)

    def _current_tls(self) -> TLSConfig | None:
        return self.snapshot.tls if self.snapshot is not None else None

    def _factory(self, listener: Listener) -> Callable[[], asyncio.Protocol]:
        if listener.kind == "outbound" and listener.protocol == "tcp":
            return lambda: outbound_relay(self, listener, "127.0.0.1").downstream
        if listener.kind == "outbound" and listener.protocol == "grpc":
            return lambda: outbound_h2(self, listener)

        def make() -> ClientConnection:
            return ClientConnection(self, listener)

        return make

    def _sweep(self) -> None:
        now = self.loop.time()
        try:
            expired = [conn for conn in self.connections if conn.deadline and conn.deadline <= now]
            for conn in expired:
                conn.on_deadline(now)
            pool = self.pool
            pool.now = now
            if self.snapshot is not None:
                pool.close_idle(now - self.snapshot.http.idle_timeout)
        except Exception:
            log.exception("sweeping connection deadlines failed")
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def drain(self) -> None:
        """SIGTERM: stop accepting, let in-flight requests finish, then exit 0."""
        if self.draining:
            return
        self.draining = True
        log.info("draining %d connections", len(self.connections))
        for server in self.servers:
            server.close()
        for conn in list(self.connections):
            if conn.exchange is None:
                conn.close()
        for handed_over in list(self.handed_over):
            if isinstance(handed_over, H2Proxy):
                handed_over.drain()
        timeout = self.snapshot.drain_timeout if self.snapshot is not None else 0.0
        self.loop.create_task(self._finish_drain(timeout), name="drain")

    async def _finish_drain(self, timeout: float) -> None:
        deadline = self.loop.time() + timeout
        while (self.connections or self.handed_over) and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self.connections):
            conn.abort()
        for handed_over in list(self.handed_over):
            handed_over.close()
        self.pool.close_all()
        self.exit(0)

    def exit(self, code: int) -> None:
        if not self.done.done():
            self.done.set_result(code)


class ClientConnection(asyncio.Protocol):
    """One client connection on one listener; see the module docstring."""

    __slots__ = (
        "state",
        "listener",
        "transport",
        "parser",
        "client_ip",
        "forwarded",
        "exchange",
        "deadline",
        "head_started",
        "paused",
        "write_paused",
        "processing",
        "closed",
        "peer_identity",
        "prefix",
        "bytes_in",
        "bytes_out",
    )

    def __init__(self, state: ServerState, listener: Listener) -> None:
        self.state = state
        self.listener = listener
        self.transport: asyncio.Transport = NOT_CONNECTED  # until connection_made
        self.parser: Parser = None  # type: ignore[assignment]
        self.client_ip = "?"
        self.forwarded = b""
        self.exchange: Exchange | None = None
        self.deadline = 0.0
        self.head_started = False
        self.paused = 0
        self.write_paused = False
        self.processing = False
        self.closed = False
        self.peer_identity: str | None = None  # the caller's SPIFFE ID, on mTLS inbound connections
        self.prefix: bytes | None = None  # first bytes while the protocol is being detected (proxy.detect)
        self.bytes_in = 0
        self.bytes_out = 0  # added by the writers (proxy.exchange)

    def __repr__(self) -> str:
        return "<ClientConnection %s from %s, %r>" % (self.listener.name, self.client_ip, self.exchange)

    # -- asyncio protocol callbacks ---------------------------------------------------------

    def connection_made(self, base_transport: asyncio.BaseTransport) -> None:
        transport = self.transport = cast(asyncio.Transport, base_transport)  # a stream transport (uvloop's do not subclass asyncio's)
        state = self.state
        http = state.snapshot.http  # type: ignore[union-attr]
        self.parser = Parser(True, http.max_header_bytes, http.max_body_bytes)
        listener = self.listener
        if listener.kind == "inbound":
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None:
                self.peer_identity = peer_identity(ssl_object)
                tls = state.snapshot.tls  # type: ignore[union-attr]
                if tls is None or not in_trust_domain(self.peer_identity, tls.identity):
                    # A certificate our CA signed but with no identity of this mesh: refuse.
                    log.info("refused inbound peer with identity %s", self.peer_identity)
                    transport.abort()
                    return
            if listener.protocol == "tcp":
                self._relay_to_app(transport)
                return
            if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                hand_over(transport, inbound_h2(state, listener, self.peer_identity))
                return
            # An h2c preface (plaintext) is HTTP/2; bytes that are not HTTP, or silence (a
            # server-first protocol relayed opaque by the caller's sidecar), go to the app as TCP.
            self.prefix = b""
        elif listener.kind == "outbound":
            self.prefix = b""
        elif listener.kind == "ingress":
            ssl_object = transport.get_extra_info("ssl_object")
            if ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2":
                hand_over(transport, ingress_h2(state, listener))
                return
            # h2c with prior knowledge, or HTTP/1.1, on the same port: the first bytes say which.
            self.prefix = b""
        peer = transport.get_extra_info("peername")
        if peer:
            self.client_ip = peer[0]
        ip = self.client_ip.encode("ascii", "replace")
        quoted = b'"[%s]"' % ip if b":" in ip else ip
        self.forwarded = b"x-forwarded-for: %s\r\nforwarded: for=%s" % (ip, quoted)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        self.deadline = state.clock() + (detect.DETECT_TIMEOUT_S if self.prefix is not None else http.idle_timeout)
        state.connections.add(self)
        if state.draining:
            self.close()

    def _relay_to_app(self, transport: asyncio.Transport, pending: bytes = b"") -> None:
        """A tcp app: authorize the caller's identity once, then relay bytes."""
        state = self.state
        refused_by = authorize_connection(state.snapshot.authz, self.peer_identity)  # type: ignore[union-attr]
        if refused_by is not None:
            log.info("refused tcp connection from %s (decided by %s)", self.peer_identity or "an unauthenticated caller", refused_by)
            observer = state.observer
            if observer is not None:
                observer.metrics.count_authz_denied(service_of_identity(self.peer_identity), state.snapshot.service)  # type: ignore[union-attr]
            transport.abort()
            return
        inbound_relay(state, self.listener, self.peer_identity).adopt_downstream(transport, pending)

    def _detect(self, data: bytes) -> bytes | None:
        """Buffer the first bytes until proxy.detect decides; the HTTP/1 bytes to parse, or None."""
        prefix = self.prefix + data  # type: ignore[operator]
        kind = detect.classify(prefix)
        if kind is detect.Kind.NEED_MORE:
            self.prefix = prefix
            return None
        return self._decided(kind, prefix)

    def _decided(self, kind: detect.Kind, prefix: bytes) -> bytes | None:
        self.prefix = None
        state = self.state
        inbound = self.listener.kind == "inbound"
        ingress = self.listener.kind == "ingress"
        # TLS on a plain listener, or anything but HTTP/2 on the ingress: parsed (and rejected) as HTTP/1.
        if kind is detect.Kind.HTTP1 or kind is detect.Kind.TLS or (ingress and kind is not detect.Kind.HTTP2):
            self.deadline = state.clock() + state.snapshot.http.idle_timeout  # type: ignore[union-attr]
            return prefix
        # From here on the connection is not HTTP/1: it leaves this server's bookkeeping.
        self.closed = True
        self.deadline = 0.0
        state.connections.discard(self)
        if kind is detect.Kind.HTTP2:
            if inbound:
                proxy = inbound_h2(state, self.listener, self.peer_identity)
            else:
                proxy = ingress_h2(state, self.listener) if ingress else outbound_h2(state, self.listener)
            hand_over(self.transport, proxy, prefix)
        elif inbound:
            self._relay_to_app(self.transport, prefix)
        else:
            outbound_relay(state, self.listener, self.client_ip).adopt_downstream(self.transport, prefix)
        return None

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self.prefix is not None:
            data = self._detect(data)  # type: ignore[assignment]
            if data is None:
                return
        self._parse(data)

    def _parse(self, data: bytes) -> None:
        self.parser.feed(data)
        if self.exchange is None and not self.head_started:
            self.head_started = True
            self.deadline = self.state.clock() + self.state.snapshot.http.header_timeout  # type: ignore[union-attr]
        self._process()

    def eof_received(self) -> bool:
        self.parser.feed_eof()
        self._process()
        # Keep the write side open while a response is still on its way (half-close).
        return self.exchange is not None and not self.closed

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.deadline = 0.0
        self.state.connections.discard(self)
        observer = self.state.observer
        if observer is not None:
            # Counted opened and closed together here: a connection handed to a relay or to
            # HTTP/2 after detection never gets here and is counted by proxy.dispatch instead.
            observer.client_closed(self.peer_identity, self.bytes_in, self.bytes_out)
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            exchange.client_lost()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.exchange is not None:
            self.exchange.client_write_paused()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.exchange is not None:
            self.exchange.client_write_resumed()

    # -- request processing ---------------------------------------------------------------

    def _process(self) -> None:
        if self.processing or self.closed:
            return
        self.processing = True
        parser = self.parser
        try:
            while True:
                event = parser.next_event_whole()
                kind = type(event)
                if kind is Data:
                    self.exchange.request_data(event.data)  # type: ignore[union-attr, attr-defined]
                elif kind is Head:
                    self._begin(event)  # type: ignore[arg-type]
                    body = event.body  # type: ignore[attr-defined]
                    if body is not None and not self.closed:
                        # The whole request came with its head: no Data or END events follow.
                        if body:
                            self.exchange.request_data(body)  # type: ignore[union-attr]
                            if self.closed:
                                break
                        self.exchange.request_end()  # type: ignore[union-attr]
                        if self.exchange is not None:
                            # Still answering it, so the parser is at PAUSED: spare asking
                            # (and the call to _hold_pipelined on this, every request's path).
                            if parser.buffered > PIPELINE_BUFFER_LIMIT:
                                self._pause(_PAUSE_PIPELINE)
                            break
                elif event is END:
                    self.exchange.request_end()  # type: ignore[union-attr]
                    if self.exchange is not None:
                        self._hold_pipelined()
                        break
                elif event is NEED_DATA:
                    break
                elif event is PAUSED:
                    self._hold_pipelined()
                    break
                elif event is CLOSED:
                    self.close()
                    break
                if self.closed:
                    break
            exchange = self.exchange
            if exchange is not None:
                exchange.flush()
        except ProtocolError as exc:
            self._protocol_error(exc)
        except Exception:
            log.exception("connection from %s on %s failed", self.client_ip, self.listener.name)
            self.abort()
        finally:
            self.processing = False

    def _hold_pipelined(self) -> None:
        """A request is in progress: bytes after it wait, up to PIPELINE_BUFFER_LIMIT."""
        if self.parser.buffered > PIPELINE_BUFFER_LIMIT:
            self._pause(_PAUSE_PIPELINE)

    def _begin(self, head: Head) -> None:
        state = self.state
        snapshot: Snapshot = state.snapshot  # type: ignore[assignment]
        self.head_started = False
        try:
            if snapshot.authz is not None and self.listener.kind == "inbound":
                self._authorize(snapshot.authz, head)
            target = resolve(self.listener, snapshot, head)
        except MeshError as exc:
            exchange = self.exchange = Exchange(self, state, Target(None, None, "-", None, False), head, b"")
            exchange.started = state.clock()
            if not head.has(b"x-request-id"):
                exchange.request_id = state.next_request_id()
            exchange.fail(exc.code, exc.detail, exc.status)
            return
        if target.tunnel:
            self._start_tunnel(target)
            return
        add: list[bytes] = []
        start_line = None
        request_id = None
        if target.rewrite:
            add.append(self.forwarded)
            if not head.has(b"x-request-id"):
                request_id = state.next_request_id()
                add.append(b"x-request-id: " + request_id)
            if target.request_target is not None:
                start_line = b"%s %s HTTP/%s" % (head.method, target.request_target, head.version)
        if head.version != b"1.1":
            # Still HTTP/1.0 upstream (body bytes pass through undecoded, so a chunked
            # answer must not be invited), but asking to keep the pooled connection.
            add.append(_UPSTREAM_KEEP_ALIVE)
        observer = state.observer
        trace_lines = observer.trace(id(head), head, self.listener.kind) if observer is not None else None
        switch_to = upgrade.requested_upgrade(head) if head.has_hop_by_hop else None
        if switch_to is not None:
            # WebSocket: Upgrade and Connection must reach the app; never retried (the
            # handshake is a GET, but a replay could open a second session upstream).
            out_head = upgrade.forward_request_head(head, switch_to, add + (trace_lines or []), start_line)
        elif trace_lines:
            out_head = rebuild_traced_head(head, add + trace_lines, start_line)
        elif add or start_line is not None or head.has_hop_by_hop:
            out_head = rebuild_head(head, add, start_line)
        else:
            out_head = head.raw
        exchange = self.exchange = Exchange(self, state, target, head, out_head)
        if request_id is not None:
            exchange.request_id = request_id
        if self.listener.kind == "ingress":
            # So that a user can copy it from curl or a browser (`meshctl why ID`).
            exchange.request_id_line = b"x-request-id: " + (request_id or head.get(b"x-request-id") or b"")
        if switch_to is not None:
            exchange.replay = None
        exchange.start(state.clock())

    def _authorize(self, policy: Policy, head: Head) -> None:
        headers = None
        if policy.needs_headers:
            headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in head.headers}
        path = head.target.decode("latin-1")
        decision = policy.check(self.peer_identity, head.method.decode("latin-1"), path, headers)
        if not decision.allowed:
            raise MeshError(
                "forbidden", "%s may not call %s %s (decided by %s)" % (
                    self.peer_identity or "an unauthenticated caller", head.method.decode("latin-1"),
                    path.split("?", 1)[0][:200], decision.rule,
                )
            )

    def _start_tunnel(self, target: Target) -> None:
        """CONNECT: from here on this connection is an opaque relay to the egress host (proxy.dispatch)."""
        self.head_started = False
        pending = self._leave_http()
        relay = egress_tunnel(self.state, target.address, lambda relay: self._relay_closed(None, relay))  # type: ignore[arg-type]
        relay.adopt_downstream(self.transport, pending)

    def _leave_http(self) -> bytes:
        """The connection is no longer HTTP: a relay owns the transport now. The bytes read past the last head."""
        self.exchange = None
        self.closed = True
        self.deadline = 0.0
        self.state.connections.discard(self)
        pending = self.parser.take_buffer()
        self.bytes_in -= len(pending)  # the relay counts them again as it forwards them
        return pending

    def switch_protocols(self, upstream: UpstreamConnection, response_head: bytes) -> None:
        """The app accepted an upgrade (101, proxy.upgrade): from here on both connections are a relay."""
        state = self.state
        client_pending = self._leave_http()
        upstream.owner = None
        upstream.closed = True  # the pool must never hand it out again
        state.pool.forget(upstream)
        self.bytes_out += len(response_head)
        self.transport.write(response_head)
        relay = upgrade.switch_to_relay(
            state.loop, self.transport, client_pending, upstream.transport, upstream.parser.take_buffer(),
            idle_timeout=state.snapshot.http.idle_timeout, on_close=lambda relay: self._relay_closed(upstream, relay),  # type: ignore[union-attr]
        )
        state.track(relay)

    def _relay_closed(self, upstream: UpstreamConnection | None, relay: Relay) -> None:
        observer = self.state.observer
        if observer is not None:
            observer.client_closed(self.peer_identity, self.bytes_in + relay.sent_upstream, self.bytes_out + relay.sent_downstream)
            if upstream is not None and upstream.reported:
                observer.tcp_closed(OUTBOUND, upstream.peer, upstream.bytes_in + relay.sent_downstream, upstream.bytes_out + relay.sent_upstream)

    def exchange_finished(self, exchange: Exchange, keep_alive: bool) -> None:
        """The response is written and the request fully read: next request, or close."""
        if self.exchange is not exchange:
            return
        self.exchange = None
        state = self.state
        if not keep_alive or state.draining or self.closed:
            self.close()
            return
        parser = self.parser
        parser.start_next_cycle()
        self.deadline = state.clock() + state.snapshot.http.idle_timeout  # type: ignore[union-attr]
        if self.paused:
            self._resume(_PAUSE_PENDING | _PAUSE_UPSTREAM | _PAUSE_PIPELINE)
        if parser.has_input():  # a pipelined request, or the client's EOF
            self._process()

    def _protocol_error(self, exc: MeshError) -> None:
        log.debug("protocol error from %s on %s: %s", self.client_ip, self.listener.name, exc)
        exchange = self.exchange
        if exchange is not None:
            self.exchange = None
            started = exchange.response_started
            exchange.client_lost()
            if started:
                self.abort()
                return
        if not self.closed:
            self.transport.write(response_for(exc, close=True, request_id=self.state.next_request_id()))
            self.close()

    def on_deadline(self, now: float) -> None:
        if self.prefix is not None:
            # Silent for DETECT_TIMEOUT_S: perhaps a server-speaks-first protocol; relay it
            # (on the ingress: a slow HTTP/1 client, whose bytes so far are parsed).
            pending = self._decided(detect.on_timeout(self.prefix), self.prefix)
            if pending:
                self._parse(pending)
            return
        exchange = self.exchange
        if exchange is not None:
            exchange.on_deadline(now)
        elif self.parser.buffered:
            self._protocol_error(_HEADER_TIMEOUT)
        else:
            self.close()

    # -- flow control ----------------------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reasons: int) -> None:
        if self.paused & reasons:
            self.paused &= ~reasons
            if not self.paused and not self.closed:
                self.transport.resume_reading()

    def pause_for_pending(self) -> None:
        self._pause(_PAUSE_PENDING)

    def resume_for_pending(self) -> None:
        if self.paused:
            self._resume(_PAUSE_PENDING)

    def pause_for_upstream(self) -> None:
        self._pause(_PAUSE_UPSTREAM)

    def resume_for_upstream(self) -> None:
        self._resume(_PAUSE_UPSTREAM)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.deadline = 0.0
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        self.deadline = 0.0
        self.transport.abort()
