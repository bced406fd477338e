"""A config snapshot compiled into the immutable objects the hot path reads.

`compile_snapshot(raw, previous)` validates one `config` message (docs/protocols.md,
part 1) and returns a `Snapshot`, or raises `SnapshotError` whose message becomes the
NACK. Requests hold on to the snapshot they started with, so applying a new one is a
single assignment. Endpoint objects (with their in-flight counts and ejection state) and
retry budgets, circuit-breaking counts and queues carry over from the previous snapshot
by endpoint id and service name.
"""

from __future__ import annotations

from typing import Any

from meshctl.proxy.connect import is_socket_path
from meshctl.proxy.balance import Balancer, BalancerConfigError, Endpoint, make_balancer
from meshctl.proxy.limits import CircuitLimits, LimitsConfigError
from meshctl.proxy.outlier import OutlierConfigError, OutlierDetector
from meshctl.proxy.pool import DEFAULT_HANDSHAKE_TIMEOUT
from meshctl.proxy.retry import RetryBudget, RetryPolicy
from meshctl.proxy.routing import Router, RouterError
from meshctl.proxy.authz import Policy, PolicyError
from meshctl.proxy.tls import ClientTLS, IngressTLS, TLSConfig, TLSConfigError, compile_security

LISTENER_KINDS = ("inbound", "outbound", "ingress", "forward")
PROTOCOLS = ("http", "grpc", "tcp")
DEFAULT_CONNECT_TIMEOUT = 1.0


class SnapshotError(ValueError):
    """The snapshot cannot be applied; the message names the offending key."""


class IngressRoute:
    __slots__ = ("prefix", "service")

    def __init__(self, prefix: str, service: str) -> None:
        self.prefix = prefix.encode("ascii")
        self.service = service

    def matches(self, path: bytes) -> bool:
        prefix = self.prefix
        if not path.startswith(prefix):
            return False
        return len(path) == len(prefix) or prefix.endswith(b"/") or path[len(prefix)] in b"/?"


class Listener:
    """One listener entry; fixed for the life of the process."""

    __slots__ = ("name", "kind", "fd", "app", "service", "routes", "raw", "protocol")

    def __init__(self, raw: dict[str, Any], where: str) -> None:
        self.raw = raw
        self.name = _require(raw, "name", str, where)
        self.kind = _require(raw, "kind", str, where)
        if self.kind not in LISTENER_KINDS:
            raise SnapshotError("%s.kind: unknown kind %r" % (where, self.kind))
        self.fd = _require(raw, "fd", int, where)
        # inbound: what the app speaks; outbound: what the service speaks (docs/protocols-l7.md)
        self.protocol = _protocol(raw, where)
        self.app: tuple[str, int] | None = None
        self.service: str | None = None
        self.routes: tuple[IngressRoute, ...] = ()
        if self.kind == "inbound":
            self.app = _address(raw.get("app"), where + ".app")
        elif self.kind == "outbound":
            self.service = _require(raw, "service", str, where)
        elif self.kind == "ingress":
            routes = raw.get("routes")
            if not isinstance(routes, list):
                raise SnapshotError("%s.routes: expected a list" % where)
            compiled = []
            for index, route in enumerate(routes):
                if not isinstance(route, dict) or not isinstance(route.get("path"), str) or not isinstance(route.get("service"), str):
                    raise SnapshotError("%s.routes[%d]: expected {path, service}" % (where, index))
                compiled.append(IngressRoute(route["path"], route["service"]))
            # Longest prefix first, so the first match is the longest match.
            self.routes = tuple(sorted(compiled, key=lambda r: len(r.prefix), reverse=True))


class Service:
    """Everything the engine needs to send a request to one upstream service."""

    __slots__ = (
        "name",
        "router",
        "balancer",
        "endpoints",
        "connect_timeout",
        "handshake_timeout",
        "limits",
        "mirrors_in_flight",
        "budget",
        "outlier",
        "needs_headers",
        "raw",
        "tls",
        "protocol",
    )

    def __init__(
        self,
        name: str,
        router: Router,
        balancer: Balancer,
        endpoints: list[Endpoint],
        connect_timeout: float,
        limits: CircuitLimits,
        budget: RetryBudget,
        outlier: OutlierDetector,
    ) -> None:
        self.name = name
        self.router = router
        self.balancer = balancer
        self.endpoints = endpoints
        self.connect_timeout = connect_timeout  # the TCP connect
        self.handshake_timeout = DEFAULT_HANDSHAKE_TIMEOUT  # the mTLS handshake after it
        self.limits = limits
        self.mirrors_in_flight = 0
        self.budget = budget
        self.outlier = outlier
        self.raw: dict[str, Any] = {}
        self.tls: ClientTLS | None = None  # when calls to this service use mTLS
        self.protocol = "http"  # http | grpc | tcp
        self.needs_headers = router.needs_request_details or balancer.needs_headers

    def __repr__(self) -> str:
        return "<Service %s %d endpoints, %r>" % (self.name, len(self.endpoints), self.limits)


class HttpLimits:
    __slots__ = ("max_header_bytes", "max_body_bytes", "header_timeout", "idle_timeout")

    def __init__(self, raw: dict[str, Any]) -> None:
        self.max_header_bytes = int(raw.get("max_header_bytes") or 65536)
        body = raw.get("max_body_bytes")
        self.max_body_bytes = None if body is None else int(body)
        self.header_timeout = float(raw.get("header_timeout") or 10.0)
        self.idle_timeout = float(raw.get("idle_timeout") or 60.0)


class Snapshot:
    __slots__ = (
        "version",
        "instance",
        "service",
        "service_version",
        "drain_timeout",
        "listeners",
        "services",
        "egress",
        "http",
        "raw_listeners",
        "fixed_targets",
        "tls",
        "authz",
        "ingress_tls",
        "local_uid",
    )
    version: int | None  # the agent's config version, echoed in the ACK
    instance: str
    service: str
    service_version: str
    drain_timeout: float
    listeners: dict[str, Listener]
    services: dict[str, Service]
    egress: frozenset[str]
    http: HttpLimits
    raw_listeners: list[Any]
    tls: TLSConfig | None
    authz: Policy | None
    ingress_tls: IngressTLS | None
    local_uid: int | None

    def __init__(self) -> None:
        self.fixed_targets: dict[Any, Any] = {}  # listener name or ingress route -> Target, filled by proxy.listeners

    def __repr__(self) -> str:
        return "<Snapshot v%s %s: %d listeners, %d services>" % (self.version, self.instance, len(self.listeners), len(self.services))


def _require(raw: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = raw.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise SnapshotError("%s.%s: expected %s, got %r" % (where, key, kind.__name__, value))
    return value


def _protocol(raw: dict[str, Any], where: str) -> str:
    protocol = raw.get("protocol", "http")
    if not isinstance(protocol, str) or protocol not in PROTOCOLS:
        raise SnapshotError("%s.protocol: expected one of %s, got %r" % (where, ", ".join(PROTOCOLS), protocol))
    return protocol


def _address(value: Any, where: str) -> tuple[str, int]:
    if isinstance(value, str) and is_socket_path(value):
        return (value, 0)  # an app's Unix socket (proxy.connect)
    if not isinstance(value, (list, tuple)) or len(value) != 2 or not isinstance(value[0], str) or not isinstance(value[1], int):
        raise SnapshotError("%s: expected [host, port] or a socket path, got %r" % (where, value))
    return (value[0], value[1])


def _compile_service(name: str, cfg: Any, previous: Service | None, known: dict[str, Endpoint]) -> Service:
    where = "services.%s" % name
    if not isinstance(cfg, dict):
        raise SnapshotError("%s: expected a mapping" % where)
    try:
        router = Router(name, cfg)
        endpoints = []
        for index, entry in enumerate(cfg.get("endpoints") or []):
            fresh = Endpoint.from_config(entry)
            old = known.get(fresh.id)
            endpoints.append(old if old is not None and old.address == fresh.address and old.version == fresh.version else fresh)
        balancer = make_balancer(cfg.get("load_balancer"), endpoints)
        outlier = OutlierDetector(cfg.get("outlier_detection"))
        limits = CircuitLimits.from_config(cfg.get("limits"))
    except (RouterError, BalancerConfigError, OutlierConfigError) as exc:
        raise SnapshotError(str(exc)) from None
    except LimitsConfigError as exc:
        raise SnapshotError("%s.%s" % (where, exc)) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError("%s.endpoints: %s" % (where, exc)) from None
    connect_timeout = cfg.get("connect_timeout") or DEFAULT_CONNECT_TIMEOUT
    policy = RetryPolicy.from_config(cfg.get("retries")) if cfg.get("retries") else None
    if previous is not None:
        limits = previous.limits.reconfigure(limits)
        budget = previous.budget
    elif policy is not None:
        budget = policy.make_budget()
    else:
        budget = RetryBudget()
    if previous is not None and previous.raw.get("outlier_detection") == cfg.get("outlier_detection"):
        outlier = previous.outlier  # same settings: keep the failure counts and ejections
    outlier.apply(endpoints)
    service = Service(name, router, balancer, endpoints, float(connect_timeout), limits, budget, outlier)
    service.raw = cfg
    handshake_timeout = cfg.get("handshake_timeout", DEFAULT_HANDSHAKE_TIMEOUT)
    if isinstance(handshake_timeout, bool) or not isinstance(handshake_timeout, (int, float)) or not handshake_timeout > 0:
        raise SnapshotError("%s.handshake_timeout: expected a number of seconds > 0, got %r" % (where, handshake_timeout))
    service.handshake_timeout = float(handshake_timeout)
    service.protocol = _protocol(cfg, where)
    return service


def compile_snapshot(message: dict[str, Any], previous: Snapshot | None) -> Snapshot:
    """Validate and compile one config message; raise SnapshotError to NACK it."""
    raw = message.get("config")
    if not isinstance(raw, dict):
        raise SnapshotError("config: expected a mapping")
    snapshot = Snapshot()
    snapshot.version = message.get("version")
    snapshot.instance = str(raw.get("instance", "?"))
    snapshot.service = str(raw.get("service", "?"))
    snapshot.service_version = str(raw.get("version", "?"))
    snapshot.drain_timeout = float(raw.get("drain_timeout", 5.0))
    listeners = raw.get("listeners")
    if not isinstance(listeners, list):
        raise SnapshotError("listeners: expected a list")
    if previous is not None and listeners != previous.raw_listeners:
        raise SnapshotError("listeners: cannot change after the first snapshot")
    snapshot.raw_listeners = listeners
    snapshot.local_uid = raw.get("local_uid")
    if snapshot.local_uid is not None and (not isinstance(snapshot.local_uid, int) or isinstance(snapshot.local_uid, bool) or snapshot.local_uid < 0):
        raise SnapshotError("local_uid: expected a uid (a whole number >= 0) or null, got %r" % (snapshot.local_uid,))
    if previous is not None and snapshot.local_uid != previous.local_uid:
        raise SnapshotError("local_uid: cannot change after the first snapshot")
    snapshot.listeners = {}
    for index, entry in enumerate(listeners):
        if not isinstance(entry, dict):
            raise SnapshotError("listeners[%d]: expected a mapping" % index)
        listener = Listener(entry, "listeners[%d]" % index)
        snapshot.listeners[listener.name] = listener
    services = raw.get("services") or {}
    if not isinstance(services, dict):
        raise SnapshotError("services: expected a mapping")
    known: dict[str, Endpoint] = {}
    old_services = previous.services if previous is not None else {}
    for old in old_services.values():
        for endpoint in old.endpoints:
            known[endpoint.id] = endpoint
    snapshot.services = {name: _compile_service(name, cfg, old_services.get(name), known) for name, cfg in services.items()}
    for listener in snapshot.listeners.values():
        wanted = [listener.service] if listener.service else [route.service for route in listener.routes]
        for name in wanted:
            if name not in snapshot.services:
                raise SnapshotError("listeners.%s: service %r is not in services" % (listener.name, name))
    egress = raw.get("egress") or []
    if not isinstance(egress, list) or not all(isinstance(host, str) for host in egress):
        raise SnapshotError("egress: expected a list of host names")
    snapshot.egress = frozenset(host.lower() for host in egress)
    http = raw.get("http") or {}
    if not isinstance(http, dict):
        raise SnapshotError("http: expected a mapping")
    try:
        snapshot.http = HttpLimits(http)
    except (TypeError, ValueError) as exc:
        raise SnapshotError("http: %s" % exc) from None
    try:
        compile_security(raw, snapshot, previous)
    except (TLSConfigError, PolicyError) as exc:
        raise SnapshotError(str(exc)) from None
    return snapshot
