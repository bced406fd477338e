"""Fakes for driving the sidecar's HTTP/1.1 engine in-process, uvicorn's MockTransport style.

`FakeTransport` stands in for an asyncio transport: it keeps what is written and records
flow control and closing, and touches no socket. `Engine` builds a `ServerState` from a
config snapshot, with a `ScriptedPool` whose connects open fake upstream connections (or
fail, as the test says), so a test can feed a `ClientConnection` request bytes, answer on
the upstream connections it opened, and look at the bytes each side was sent.

bench/engine.py measures the engine with the same `FakeTransport`.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable

from meshctl.proxy.pool import DEFAULT_HANDSHAKE_TIMEOUT, ConnectFailed, Pool, UpstreamConnection
from meshctl.proxy.server import ClientConnection, ServerState
from meshctl.proxy.snapshot import compile_snapshot
from meshctl.proxy.tls import ClientTLS

APP = ("127.0.0.1", 9)
ENDPOINTS = (("127.0.0.1", 10), ("127.0.0.1", 11))


class FakeTransport:
    """Collects what is written; records pause/resume and close/abort; no socket behind it."""

    def __init__(self, peer: tuple[str, int] = ("127.0.0.1", 40000)) -> None:
        self.written: list[bytes] = []
        self.peer = peer
        self.reading_paused = False
        self.closed = False  # by close() or abort()
        self.aborted = False
        self.eof_written = False
        self.protocol: Any = None

    def __repr__(self) -> str:
        return "<FakeTransport %d bytes written%s>" % (sum(map(len, self.written)), " closed" if self.closed else "")

    def data(self) -> bytes:
        """Everything written so far, as one byte string."""
        return b"".join(self.written)

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def writelines(self, data: list[bytes]) -> None:
        self.written.extend(data)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default

    def pause_reading(self) -> None:
        self.reading_paused = True

    def resume_reading(self) -> None:
        self.reading_paused = False

    def is_reading(self) -> bool:
        return not self.reading_paused

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_protocol(self) -> Any:
        return self.protocol

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True


class ScriptedPool(Pool):
    """A Pool whose connects open fake connections; the next `refuse` connects are refused instead."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.opened: list[UpstreamConnection] = []
        self.refuse = 0
        self.refused: list[tuple[str, int]] = []

    async def connect(self, address: tuple[str, int], timeout: float, tls: ClientTLS | None = None, peer: str = "unknown",
                      handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT) -> UpstreamConnection:
        if self.refuse:
            self.refuse -= 1
            self.refused.append(address)
            raise ConnectFailed("refused", "connection refused")
        conn = UpstreamConnection(self, address, peer)
        conn.connection_made(FakeTransport(address))  # type: ignore[arg-type]
        conn.dial = dial = self.dial(address)
        dial.open += 1
        self.opened.append(conn)
        return conn


def service_config(**overrides: Any) -> dict[str, Any]:
    """A service `web` with one version and the endpoints ENDPOINTS, with keys overridden."""
    service: dict[str, Any] = {
        "endpoints": [{"id": "web@v1#%d" % index, "version": "v1", "address": list(address)} for index, address in enumerate(ENDPOINTS)],
        "versions": ["v1"], "split": {"v1": 100}, "routes": [], "timeout": None, "stream_idle_timeout": 300.0, "connect_timeout": 1.0,
        "retries": None, "load_balancer": {"kind": "round_robin"}, "outlier_detection": None,
        "limits": {"max_connections": 1024, "max_pending": 1024},
    }
    service.update(overrides)
    return service


def config(kind: str, service: dict[str, Any] | None = None, why: str = "errors") -> dict[str, Any]:
    """A sidecar config with one listener of `kind`: an inbound to APP, or an ingress routing / to `web`."""
    listener: dict[str, Any] = {"name": kind, "kind": kind, "fd": -1}
    listener.update({"app": list(APP)} if kind == "inbound" else {"routes": [{"path": "/", "service": "web"}]})
    return {
        "instance": "web@v1#0" if kind == "inbound" else "ingress", "service": "web" if kind == "inbound" else "None",
        "version": "v1", "drain_timeout": 5.0, "listeners": [listener], "services": {"web": service or service_config()}, "egress": [],
        "http": {"max_header_bytes": 65536, "max_body_bytes": None, "header_timeout": 10.0, "idle_timeout": 60.0},
        "tracing": {"sampling": 0.01}, "access_log": "off", "why": {"mode": why},
    }


class Engine:
    """A ServerState with a ScriptedPool on a loop of its own; `completed` records each ended exchange.

    Use it as a context manager, so the loop is closed also when a test fails.
    """

    def __init__(self, kind: str = "ingress", service: dict[str, Any] | None = None) -> None:
        self.kind = kind
        self.loop = asyncio.new_event_loop()
        self.state = ServerState(self.loop)
        self.pool = self.state.pool = ScriptedPool(self.loop)
        self.state.snapshot = compile_snapshot({"type": "config", "version": 1, "config": config(kind, service)}, None)
        self.completed: list[tuple[str, int, int]] = []  # (outcome, status, tries)
        self.state.on_exchange_done = lambda exchange, outcome: self.completed.append((outcome, exchange.status, exchange.attempt))

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.pool.close_all()
        self.run()
        self.loop.close()

    def client(self) -> tuple[ClientConnection, FakeTransport]:
        """A client connection on the listener, with its transport."""
        conn = ClientConnection(self.state, self.state.snapshot.listeners[self.kind])  # type: ignore[union-attr]
        transport = FakeTransport()
        conn.connection_made(transport)  # type: ignore[arg-type]
        return conn, transport

    def send(self, request: bytes) -> tuple[ClientConnection, FakeTransport, UpstreamConnection, FakeTransport]:
        """A new client connection sends `request`: the connection, and the upstream connection the request went out on."""
        client, client_transport = self.client()
        client.data_received(request)
        upstream, upstream_transport = self.upstream()
        return client, client_transport, upstream, upstream_transport

    def idle_upstream(self, address: tuple[str, int] = APP) -> tuple[UpstreamConnection, FakeTransport]:
        """An upstream connection put into the pool as idle (as after an earlier response)."""
        conn = UpstreamConnection(self.pool, address, "web")
        transport = FakeTransport(address)
        conn.connection_made(transport)  # type: ignore[arg-type]
        conn.dial = self.pool.dial(address)
        conn.dial.open += 1
        self.pool.add_idle(conn)
        return conn, transport

    def run(self, steps: int = 20) -> None:
        """Let the loop run what is ready (pool connects, call_soon), `steps` rounds; no timers wait."""

        async def spin() -> None:
            for _ in range(steps):
                await asyncio.sleep(0)

        self.loop.run_until_complete(spin())

    def run_until(self, predicate: Callable[[], object], what: str, timeout: float = 5.0) -> None:
        """Run the loop, timers included (a retry's backoff), until `predicate()` holds; fail after `timeout`."""

        async def poll() -> None:
            deadline = self.loop.time() + timeout
            while not predicate():
                if self.loop.time() > deadline:
                    raise AssertionError("not within %gs: %s" % (timeout, what))
                await asyncio.sleep(0.001)

        self.loop.run_until_complete(poll())

    def upstream(self, index: int = -1) -> tuple[UpstreamConnection, FakeTransport]:
        """A connection the pool opened (the latest by default), after letting connects run."""
        self.run()
        conn = self.pool.opened[index]
        return conn, conn.transport  # type: ignore[return-value]
