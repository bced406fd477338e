"""What the engine's modules see of the server and of a client connection, as `typing.Protocol`s.

proxy.server builds the `ServerState` and the `ClientConnection`s and imports the modules that
work for them (proxy.exchange, proxy.dispatch, proxy.observe, proxy.replay); those modules
take their server and client through these interfaces instead of importing proxy.server back,
so the import graph has no cycle (tests/test_import_cycles.py). This module imports nothing of
the engine at run time; the types it names come from modules below it.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    import asyncio

    from meshctl.proxy.batch import Batch
    from meshctl.proxy.h2proxy import H2Proxy
    from meshctl.proxy.metrics import Metrics
    from meshctl.proxy.opaque import Relay
    from meshctl.proxy.pool import Pool, UpstreamConnection
    from meshctl.proxy.snapshot import Listener, Snapshot

HandedOver = TypeVar("HandedOver", "H2Proxy", "Relay")


class DecisionRing(Protocol):
    """Where decision records go (proxy.decisions' Recorder): on at all, every request or only failures."""

    on: bool
    keep_all: bool

    def add(self, build: Callable[..., dict[str, Any]], *inputs: Any) -> None: ...


class ObserverHooks(Protocol):
    """What the engine reports to proxy.observe's Observer: metrics, ejections, compared requests."""

    @property
    def metrics(self) -> Metrics: ...

    @property
    def shadow_results(self) -> Batch: ...

    @property
    def why(self) -> DecisionRing: ...

    def count_ejection(self, destination: str, version: str) -> None: ...


class Server(Protocol):
    """The process-wide state shared by every connection (proxy.server's ServerState)."""

    # An exchange's completion hook, set by proxy.observe; its argument is a proxy.exchange Exchange.
    on_exchange_done: Callable[[Any, str], None] | None

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def pool(self) -> Pool: ...

    @property
    def snapshot(self) -> Snapshot | None: ...

    @property
    def observer(self) -> ObserverHooks | None: ...

    @property
    def draining(self) -> bool: ...

    @property
    def connections(self) -> Collection[Client]: ...

    def next_request_id(self) -> bytes: ...

    def track(self, conn: HandedOver) -> HandedOver: ...

    def untrack(self, conn: H2Proxy | Relay) -> None: ...


class Client(Protocol):
    """One HTTP/1 client connection as its exchange drives it (proxy.server's ClientConnection)."""

    deadline: float
    bytes_in: int
    bytes_out: int

    @property
    def state(self) -> Server: ...

    @property
    def listener(self) -> Listener: ...

    @property
    def transport(self) -> asyncio.Transport: ...

    @property
    def client_ip(self) -> str: ...

    @property
    def peer_identity(self) -> str | None: ...

    @property
    def exchange(self) -> Any: ...  # the proxy.exchange Exchange in progress, or None

    @property
    def processing(self) -> bool: ...

    @property
    def write_paused(self) -> bool: ...

    def exchange_finished(self, exchange: Any, keep_alive: bool) -> None: ...

    def pause_for_pending(self) -> None: ...

    def resume_for_pending(self) -> None: ...

    def pause_for_upstream(self) -> None: ...

    def resume_for_upstream(self) -> None: ...

    def switch_protocols(self, upstream: UpstreamConnection, response_head: bytes) -> None: ...

    def abort(self) -> None: ...
