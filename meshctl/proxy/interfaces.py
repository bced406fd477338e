"""The narrow interfaces between the HTTP/1.1 engine's parts, as typing Protocols.

An `Exchange` (proxy.exchange) gets its collaborators through these instead of reaching
into the client connection and the server state, as uvicorn's RequestResponseCycle gets a
transport, flow control and a completion callback instead of its protocol object:

* `Downstream`: the client connection as its exchange sees it: writing, flow control, its
  deadline, and the end of the exchange (next request, abort, switch to a relay);
  proxy.server.ClientConnection implements it;
* `Engine`: what the whole process lends an exchange: the clock, timers, the upstream
  pool, drain, the completion hook (metrics, traces, `meshctl why`) and ejection counts;
  proxy.server.ServerState implements it.

They are generic in the upstream connection and the pool, so that this module imports
nothing of the engine: it is a leaf, and no import cycle can pass through it. The drivers
tests (tests/drivers.py) implement the same interfaces with fakes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, TypeVar

_Conn_contra = TypeVar("_Conn_contra", contravariant=True)
_Pool_co = TypeVar("_Pool_co", covariant=True)


class Writer(Protocol):
    """The writing half of a transport."""

    def write(self, data: bytes) -> None: ...

    def writelines(self, data: list[bytes]) -> None: ...


class ListenerInfo(Protocol):
    """What an exchange, and the observers reading it, know of the listener it came in on."""

    @property
    def name(self) -> str: ...

    @property
    def kind(self) -> str: ...


class EjectionCounter(Protocol):
    def count_ejection(self, destination: str, version: str) -> None: ...


class Downstream(Protocol[_Conn_contra]):
    """The client connection of an exchange; `_Conn_contra` is the upstream connection type."""

    deadline: float  # the connection's next deadline (0: none), swept by the server
    bytes_in: int
    bytes_out: int  # added by the exchange for what it writes

    @property
    def transport(self) -> Writer: ...

    @property
    def listener(self) -> ListenerInfo: ...

    @property
    def client_ip(self) -> str: ...

    @property
    def peer_identity(self) -> str | None: ...

    @property
    def processing(self) -> bool:
        """True while the connection is parsing: it flushes the exchange's request bytes itself afterwards."""

    @property
    def write_paused(self) -> bool:
        """The client's write buffer is full: an upstream attached now must not be read."""

    def pause_for_pending(self) -> None: ...

    def resume_for_pending(self) -> None: ...

    def pause_for_upstream(self) -> None: ...

    def resume_for_upstream(self) -> None: ...

    # `exchange` is the proxy.exchange.Exchange that calls; Any keeps this module a leaf.
    def exchange_finished(self, exchange: Any, keep_alive: bool) -> None:
        """The response is written and the request fully read: serve the next request, or close."""

    def abort(self) -> None: ...

    def switch_protocols(self, upstream: _Conn_contra, response_head: bytes) -> None:
        """The upstream accepted an upgrade (101): both connections become a relay."""


class Engine(Protocol[_Pool_co]):
    """What the sidecar process lends each exchange; `_Pool_co` is the upstream pool type."""

    clock: Callable[[], float]  # the event loop's monotonic clock

    def call_later(self, delay: float, callback: Callable[[], object]) -> object: ...

    def call_soon(self, callback: Callable[[], object]) -> object: ...

    @property
    def pool(self) -> _Pool_co: ...

    @property
    def draining(self) -> bool: ...

    # Called once per ended exchange with its outcome; Any as in Downstream.exchange_finished.
    @property
    def on_exchange_done(self) -> Callable[[Any, str], None] | None: ...

    @property
    def observer(self) -> EjectionCounter | None: ...
