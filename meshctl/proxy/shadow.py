"""Shadow traffic with a response diff: mirrored copies whose answers are kept and compared.

A route's mirror with a `compare` block (from the manifest's `mirror: {compare: true}` or
the live `meshctl shadow` override, which lays one over every route of the service) makes
the exchange a `Comparison` of up to three answers to the same request:

* `primary`: the client's own answer, read off the upstream connection by a `ResponseTap`
  that forwards every callback to the exchange unchanged and keeps a bounded copy;
* `shadow`: a `proxy.mirror.Mirror` copy to the shadow version (mirror's limits: bodies up
  to 64 KiB, MAX_MIRRORS_IN_FLIGHT copies, the client never waits for it);
* `reference`: for `reference_percent` of them, one more copy to another instance of
  the primary's version (Diffy's second primary): what differs between two primaries is
  noise, not a difference of the shadow.

Once all have ended (each after the client's answer went out, or the copy's timeout),
the answers are compared (proxy.compare) and the result joins the observer's
`shadow_results` batch (proxy.batch), which goes to the agent as access lines do. Unsafe methods are compared only with `unsafe`.
"""

from __future__ import annotations

import random
from typing import TYPE_CHECKING, Any, Callable, Protocol

from meshctl.proxy.capture import Capture
from meshctl.proxy.compare import CompareSpec, Response, differences
from meshctl.proxy.mirror import (
    MAX_MIRRORS_IN_FLIGHT,
    MIRROR_TIMEOUT_S,
    Mirror,
    shadow_head,
)

if TYPE_CHECKING:
    from meshctl.proxy.balance import Endpoint
    from meshctl.proxy.http1 import Head
    from meshctl.proxy.listeners import Target
    from meshctl.proxy.pool import Pool, UpstreamConnection
    from meshctl.proxy.routing import RouteAction
    from meshctl.proxy.snapshot import Service

RESULTS_FLUSH_INTERVAL = 0.25
RESULTS_BATCH_MAX = 128


class ComparedExchange(Protocol):
    """What a compared request reads of its exchange (proxy.exchange's Exchange, which imports this
    module), and the upstream callbacks a ResponseTap passes on to it."""

    @property
    def method(self) -> bytes: ...

    @property
    def head(self) -> Head: ...

    @property
    def action(self) -> RouteAction | None: ...

    @property
    def target(self) -> Target: ...

    @property
    def client(self) -> Any: ...  # the ClientConnection (seams.Client); Exchange types it as interfaces.Downstream

    @property
    def upstream(self) -> UpstreamConnection | None: ...

    @property
    def answered(self) -> bool: ...

    @property
    def last_endpoint(self) -> Endpoint | None: ...

    @property
    def started(self) -> float: ...

    def upstream_data(self, data: bytes) -> None: ...

    def upstream_eof(self) -> None: ...

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None: ...

    def upstream_write_paused(self) -> None: ...

    def upstream_write_resumed(self) -> None: ...


# -- one compared request ------------------------------------------------------------------


Sink = Callable[[dict], None]


class Comparison:
    """Collects the answers to one request; compares and reports once all have ended."""

    __slots__ = ("spec", "service", "primary_version", "shadow_version", "method", "path", "no_body", "sink",
                 "answers", "elapsed", "waiting", "abandoned", "tag")

    def __init__(self, spec: CompareSpec, service: str, shadow_version: str, method: bytes, path: bytes, sink: Sink,
                 tag: str | None = None) -> None:
        self.spec = spec
        self.service = service
        self.primary_version = ""
        self.shadow_version = shadow_version
        self.method = method
        self.path = path
        self.no_body = method == b"HEAD"
        self.sink = sink
        self.answers: dict[str, Response | str] = {}
        self.elapsed: dict[str, float | None] = {}
        self.waiting = {"primary", "shadow"}
        self.abandoned = False
        self.tag = tag  # a replay's id, so the agent can tell its results apart

    def __repr__(self) -> str:
        return "<Comparison %s %s %s waiting %s>" % (self.service, self.method.decode("latin-1"),
                                                    self.path[:60].decode("latin-1"), sorted(self.waiting))

    def tap(self, exchange: ComparedExchange, conn: UpstreamConnection) -> ResponseTap:
        return ResponseTap(exchange, conn, self)

    def send_copies(self, pool: Pool, service: Service, replay: list[bytes], timeout: float | None, now: float,
                    primary: Endpoint | None) -> None:
        """The shadow copy, and for a share of requests a reference copy to another primary."""
        shadow = self.mirror_to(pool, service, self.shadow_version, "shadow", replay, timeout, now, frozenset())
        if shadow is None:
            self.abandoned = True  # too many copies in flight: this request is not compared
            return
        if primary is not None:
            self.send_reference(pool, service, primary, replay, timeout, now)

    def send_reference(self, pool: Pool, service: Service, primary: Endpoint, replay: list[bytes], timeout: float | None,
                       now: float) -> None:
        """For `reference_percent` of requests, a copy to another instance of the primary's version."""
        if random.random() * 100 >= self.spec.reference_percent:
            return
        self.primary_version = primary.version
        self.waiting.add("reference")
        if self.mirror_to(pool, service, primary.version, "reference", replay, timeout, now, frozenset({primary.id})) is None:
            self.waiting.discard("reference")

    def mirror_to(self, pool: Pool, service: Service, version: str, role: str, replay: list[bytes], timeout: float | None,
                  now: float, avoid: frozenset[str]) -> Endpoint | None:
        """Send one copy to an endpoint of `version` not in `avoid`; the endpoint, or None when skipped."""
        if service.mirrors_in_flight >= MAX_MIRRORS_IN_FLIGHT:
            return None
        endpoint = service.balancer.pick(version, None, avoid, now)
        if endpoint is None or endpoint.id in avoid:
            return None
        data = [shadow_head(replay[0]), *replay[1:]]
        Mirror(pool, service, endpoint.address, data, self.no_body, self._copy_ended, role).start(
            timeout or MIRROR_TIMEOUT_S, service.connect_timeout)
        return endpoint

    def _copy_ended(self, role: str, capture: Capture, problem: str | None, seconds: float) -> None:
        answer = problem if problem is not None else capture.response(self.no_body) or "invalid or too large response"
        self.arrive(role, answer, seconds)

    def arrive(self, role: str, answer: Response | str, seconds: float | None) -> None:
        """One answer ended: a Response, or a string saying why there is none (seconds None: not timed)."""
        if self.abandoned or role not in self.waiting:
            return
        if role == "primary" and not isinstance(answer, Response):
            self.abandoned = True  # the client got an error or nothing: nothing to compare with
            if self.tag is not None:  # a replay counts every request it sent
                self.sink(self.failure("the primary answered nothing: %s" % answer))
            return
        self.waiting.discard(role)
        self.answers[role] = answer
        self.elapsed[role] = seconds
        if not self.waiting:
            self.sink(self.result())

    def failure(self, reason: str) -> dict[str, Any]:
        return {"service": self.service, "version": self.shadow_version, "method": self.method.decode("latin-1"),
                "path": self.path.decode("latin-1"), "failed": reason, "diffs": {}, "noise": None,
                "primary_ms": None, "shadow_ms": None, "tag": self.tag}

    def result(self) -> dict[str, Any]:
        primary, shadow = self.answers["primary"], self.answers["shadow"]
        assert isinstance(primary, Response)  # arrive() abandons a comparison whose primary answered nothing
        reference = self.answers.get("reference")
        failed = shadow if isinstance(shadow, str) else None
        diffs = differences(primary, shadow, self.spec.ignore) if isinstance(shadow, Response) else {}
        noise = sorted(differences(primary, reference, self.spec.ignore)) if isinstance(reference, Response) else None
        return {
            "service": self.service,
            "version": self.shadow_version,
            "method": self.method.decode("latin-1"),
            "path": self.path.decode("latin-1"),
            "failed": failed,
            "diffs": {where: list(values) for where, values in diffs.items()},
            "noise": noise,
            "primary_ms": _ms(self.elapsed["primary"]),
            "shadow_ms": _ms(self.elapsed["shadow"]),
            "tag": self.tag,
            "live": self.spec.live,
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def begin(exchange: ComparedExchange, spec: CompareSpec, shadow_version: str) -> Comparison | None:
    """A Comparison for this request, or None when it is not one to compare.

    A request the split already sends to the shadow's version is not compared: its
    answer would be compared with itself.
    """
    action, service = exchange.action, exchange.target.service
    if action is None or service is None:  # only a request routed to a mesh service has a shadow
        return None
    if not spec.wants(exchange.method, exchange.head.target) or action.version == shadow_version:
        return None
    observer = exchange.client.state.observer
    if observer is None:
        return None
    return Comparison(spec, service.name, shadow_version, exchange.method, exchange.head.target, observer.shadow_results.add)


class ResponseTap:
    """The owner of the primary's upstream connection while it answers a compared request.

    Every callback goes to the exchange first, unchanged; the copy and the end of the
    answer are noted after, so the client's bytes are never held back.
    """

    __slots__ = ("exchange", "conn", "comparison", "capture", "ended")

    def __init__(self, exchange: ComparedExchange, conn: UpstreamConnection, comparison: Comparison) -> None:
        self.exchange = exchange
        self.conn = conn
        self.comparison = comparison
        self.capture = Capture()
        self.ended = False

    def __repr__(self) -> str:
        return "<ResponseTap %r>" % (self.exchange,)

    def upstream_data(self, data: bytes) -> None:
        self.exchange.upstream_data(data)
        self.capture.add(data)
        self._maybe_ended()

    def upstream_eof(self) -> None:
        self.exchange.upstream_eof()
        self._maybe_ended()

    def upstream_lost(self, conn: UpstreamConnection, exc: Exception | None) -> None:
        self.exchange.upstream_lost(conn, exc)
        self._maybe_ended()

    def upstream_write_paused(self) -> None:
        self.exchange.upstream_write_paused()

    def upstream_write_resumed(self) -> None:
        self.exchange.upstream_write_resumed()

    def _maybe_ended(self) -> None:
        exchange = self.exchange
        if self.ended or exchange.upstream is self.conn:
            return
        self.ended = True
        if not exchange.answered:
            return  # this try's answer was discarded for a retry: the next try brings a new tap
        endpoint = exchange.last_endpoint
        comparison = self.comparison
        if endpoint is not None and not comparison.primary_version:
            comparison.primary_version = endpoint.version
        response = self.capture.response(comparison.no_body)
        elapsed = exchange.client.state.loop.time() - exchange.started
        comparison.arrive("primary", response if response is not None else "no complete answer", elapsed)
