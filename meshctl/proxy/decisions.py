"""Decision records: every decision this sidecar made for one request, for `meshctl why`.

Collecting must cost next to nothing on the hot path, so an exchange keeps only what it
already has (its route action, endpoints, timings) plus a `trail` list that stays None
until something rare happens: a try that failed or is retried, a queue wait, an injected
delay, a mirror, a timeout that fired. The record itself, its dicts and strings, is built
by `Recorder.keep()` only for a request that is kept:

* mode `errors` (the default): requests that ended in 5xx or a mesh error (`x-mesh-error`,
  resets included), requests that succeeded only after a failed try, a timeout, a queue
  wait or an injected delay (`eventful`), and requests carrying `x-mesh-debug: 1`;
* mode `all`: every request; mode `off`: none.

Routing, authorization and balancing are explained at that moment by re-running the same
pure code the request ran (`Router.explain`, `Policy.check`, `RetryPolicy.explain`): they
are deterministic given the request, except the split's draw and the balancer's pick,
which the exchange remembers. Records live in a bounded ring (oldest dropped) and leave the
process only when the agent asks (`why?` on the config channel, proxy.observe).
`plan()` answers `meshctl why --from --to`: what would happen to a request not sent.

HTTP/2 and gRPC streams and TCP relays get records of the same shape from
proxy.stream_decisions, kept in the same ring (`Recorder.add`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from meshctl.proxy.retry import IDEMPOTENT_METHODS

if TYPE_CHECKING:
    from meshctl.proxy.balance import Endpoint
    from meshctl.proxy.http1 import Head
    from meshctl.proxy.listeners import Target
    from meshctl.proxy.routing import RouteAction
    from meshctl.proxy.snapshot import Service, Snapshot

log = logging.getLogger("proxy.decisions")

MODES = ("off", "errors", "all")
DEFAULT_RING = 2000
MAX_RECENT = 500
_OK_OUTCOMES = ("ok", "client-lost")
_DIRECTIONS = {"forward": "outbound"}

# Trail entries: (kind, ...) tuples, in the order things happened.
TRY = "try"  # (TRY, endpoint, started, ended, outcome, status, detail, retry)
QUEUED = "queued"  # (QUEUED, queued_at)
DELAY = "delay"  # (DELAY, seconds)
MIRROR = "mirror"  # (MIRROR, version)
FIRED = "fired"  # (FIRED, "request" | "per_try" | "stream_idle", seconds)


class DecidedExchange(Protocol):
    """What a decision trail and its record read of an exchange (proxy.exchange's Exchange,
    which imports this module to write its trail)."""

    trail: list[Any] | None

    @property
    def client(self) -> Any: ...  # the ClientConnection (seams.Client); Exchange types it as interfaces.Downstream

    @property
    def target(self) -> Target: ...

    @property
    def head(self) -> Head: ...

    @property
    def method(self) -> bytes: ...

    @property
    def action(self) -> RouteAction | None: ...

    @property
    def request_id(self) -> bytes | None: ...

    @property
    def started(self) -> float: ...

    @property
    def try_started(self) -> float: ...

    @property
    def endpoint(self) -> Endpoint | None: ...

    @property
    def last_endpoint(self) -> Endpoint | None: ...

    @property
    def replay(self) -> list[bytes] | None: ...

    @property
    def replay_size(self) -> int: ...

    @property
    def request_done(self) -> bool: ...

    @property
    def response_started(self) -> bool: ...


def note(exchange: DecidedExchange, *entry: Any) -> None:
    """Remember a rare event of `exchange` (failure paths and opt-in features only)."""
    trail = exchange.trail
    if trail is None:
        trail = exchange.trail = []
    trail.append(list(entry))


def try_ended(exchange: DecidedExchange, outcome: str, status: int | None, detail: str | None) -> None:
    """A try failed or is about to be retried; `retrying()` marks it when a retry follows."""
    if not exchange.try_started:
        return  # nothing was tried yet (queued, delayed by a fault): the timeout note says it all
    note(exchange, TRY, exchange.endpoint, exchange.try_started, exchange.client.state.loop.time(), outcome, status, detail, None)


def retrying(exchange: DecidedExchange, delay: float, counted: bool) -> None:
    """The last try is retried after `delay` seconds (`counted` False: a stale pooled connection)."""
    trail = exchange.trail
    if trail:
        for entry in reversed(trail):
            if entry[0] == TRY:
                entry[7] = (delay, counted)
                return


def woken(exchange: DecidedExchange) -> None:
    """A queued exchange got its connection slot: the queue wait ends now."""
    for entry in exchange.trail or ():
        if entry[0] == QUEUED and len(entry) == 2:
            entry.append(exchange.client.state.loop.time())


_EVENTFUL = (TRY, QUEUED, DELAY, FIRED)


def eventful(trail: list) -> bool:
    """Whether something worth explaining happened even though the request succeeded."""
    return any(entry[0] in _EVENTFUL for entry in trail)


class Recorder:
    """The ring of kept records of one sidecar and the rule for what is kept."""

    __slots__ = ("mode", "on", "keep_all", "records", "instance", "service")

    def __init__(self, mode: str = "errors", size: int = DEFAULT_RING) -> None:
        self.mode = mode
        self.on = mode != "off"
        self.keep_all = mode == "all"
        self.records: deque[dict[str, Any]] = deque(maxlen=size)
        self.instance = "?"
        self.service = "?"

    def configure(self, snapshot: Snapshot, raw: Any) -> None:
        raw = raw if isinstance(raw, dict) else {}
        mode = raw.get("mode", "errors")
        self.mode = mode if mode in MODES else "errors"
        self.on = self.mode != "off"
        self.keep_all = self.mode == "all"
        size = raw.get("ring", DEFAULT_RING)
        if isinstance(size, int) and not isinstance(size, bool) and size > 0 and size != self.records.maxlen:
            self.records = deque(self.records, maxlen=size)
        self.instance = snapshot.instance
        self.service = snapshot.service if snapshot.service != "None" else "ingress"

    def keep(self, exchange: DecidedExchange, outcome: str, status: int, duration: float) -> None:
        try:
            self.records.append(build_record(exchange, outcome, status, duration, self.instance, self.service))
        except Exception:
            # A record explains a request; failing to build one must never fail the request.
            log.exception("building the decision record of %r failed", exchange)

    def add(self, build: Callable[..., dict[str, Any]], *inputs: Any) -> None:
        """Keep the record `build(*inputs, instance, service)` makes (HTTP/2 streams, relays: proxy.stream_decisions)."""
        try:
            self.records.append(build(*inputs, self.instance, self.service))
        except Exception:
            log.exception("building a decision record (%s) failed", build.__name__)

    def find(self, request_id: str) -> list[dict[str, Any]]:
        return [record for record in self.records if record["request_id"] == request_id]

    def recent(self, count: int) -> list[dict[str, Any]]:
        count = max(0, min(count, MAX_RECENT))
        return list(self.records)[-count:] if count else []


# -- building one record (only for kept requests) ------------------------------------------


def build_record(exchange: DecidedExchange, outcome: str, status: int, duration: float, instance: str, own_service: str) -> dict[str, Any]:
    client = exchange.client
    state = client.state
    snapshot = state.snapshot
    head = exchange.head
    kind = client.listener.kind
    direction = _DIRECTIONS.get(kind, kind)
    service = exchange.target.service
    started = exchange.started
    now = state.loop.time()
    wall_start = time.time() - (now - started)
    request_id = exchange.request_id or head.get(b"x-request-id")
    mesh_error = outcome not in _OK_OUTCOMES
    target_text = head.target.decode("latin-1")
    path, _, query = target_text.partition("?")
    method = exchange.method.decode("latin-1")
    headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in head.headers}
    trail = exchange.trail or []
    record: dict[str, Any] = {
        "request_id": request_id.decode("latin-1") if request_id is not None else None,
        "ts": round(wall_start, 6),
        "sidecar": instance,
        "service": own_service if direction == "inbound" else (service.name if service is not None else exchange.target.label),
        "caller_service": own_service if direction != "inbound" else None,
        "direction": direction,
        "protocol": "http/%s" % head.version.decode("latin-1"),
        "method": method,
        "path": path[:500],
        "peer_identity": client.peer_identity,
        "mtls": client.peer_identity is not None if direction == "inbound" else (service is not None and service.tls is not None),
        "status": status,
        "by": "mesh" if mesh_error else "app",
        "error": outcome if mesh_error else None,
        "duration_ms": ms(duration),
        "route": None,
        "version": None,
        "balancer": None,
        "limits": _limits(trail, exchange, outcome),
        "tries": _tries(exchange, trail, outcome, status, method, started),
        "timeouts": None,
        "authz": None,
        "faults": _faults(trail, outcome, status),
        "mirror": next((entry[1] for entry in trail if entry[0] == MIRROR), None),
    }
    action = exchange.action
    if service is not None and action is not None:
        record["route"] = _route(service, action, method, path, query, headers)
        record["version"] = action.version
        record["balancer"] = balancer_explained(service, action.version, record["tries"], started)
        record["timeouts"] = _timeouts(action, trail)
    if direction == "inbound" and snapshot is not None and snapshot.authz is not None:
        decision = snapshot.authz.check(client.peer_identity, method, target_text, headers)
        record["authz"] = {"decision": "allow" if decision.allowed else "deny", "rule": decision.rule}
    return record


def ms(seconds: float | None) -> float | None:
    """Milliseconds, or None for a limit that is not set (no whole-request timeout by default)."""
    return None if seconds is None else round(seconds * 1000, 3)


def _endpoint_name(endpoint: Any, exchange: DecidedExchange) -> str:
    if endpoint is not None:
        return str(endpoint.id)
    return "app" if exchange.client.listener.kind == "inbound" else exchange.target.label


def _tries(exchange: DecidedExchange, trail: list, outcome: str, status: int, method: str, started: float) -> list[dict[str, Any]]:
    entries = [entry for entry in trail if entry[0] == TRY]
    tries = []
    policy = exchange.action.retry_policy if exchange.action is not None else None
    body_size = exchange.replay_size - len(exchange.replay[0]) if exchange.replay and exchange.request_done else None
    attempt = 1
    for _, endpoint, begun, ended, try_outcome, try_status, detail, retry in entries:
        entry = {
            "endpoint": _endpoint_name(endpoint, exchange),
            "version": endpoint.version if endpoint is not None else None,
            "start_ms": ms(begun - started),
            "duration_ms": ms(ended - begun),
            "outcome": try_outcome,
            "status": try_status,
            "error": detail,
            "retried": retry is not None,
            "retry_reason": None,
            "backoff_ms": None,
        }
        if retry is not None:
            delay, counted = retry
            entry["backoff_ms"] = ms(delay)
            if counted:
                entry["retry_reason"] = policy.explain(attempt, method, try_outcome, try_status, body_size)[1] if policy else "retried"
                attempt += 1
            else:
                entry["retry_reason"] = "the pooled connection was closed by the peer as it was reused (not counted as an attempt)"
        else:
            entry["retry_reason"] = _why_not(exchange, policy, attempt, method, try_outcome, try_status, body_size, outcome)
        tries.append(entry)
    begun = exchange.try_started
    if begun and (outcome == "ok" or (outcome == "client-lost" and exchange.response_started)):
        # The try whose response went to the client (failed and retried tries are in the trail).
        endpoint = exchange.last_endpoint
        tries.append({
            "endpoint": _endpoint_name(endpoint, exchange),
            "version": endpoint.version if endpoint is not None else None,
            "start_ms": ms(begun - started),
            "duration_ms": ms(exchange.client.state.loop.time() - begun),
            "outcome": "response" if outcome in _OK_OUTCOMES else outcome,
            "status": status or None,
            "error": outcome if outcome not in _OK_OUTCOMES else None,
            "retried": False,
            "retry_reason": _why_not(exchange, policy, attempt, method, "response", status, body_size, outcome) if status >= 500 else None,
            "backoff_ms": None,
        })
    return tries


def _why_not(exchange: DecidedExchange, policy: Any, attempt: int, method: str, outcome: str, status: int | None,
             body_size: int | None, final_outcome: str) -> str:
    """Why a try that ended like this was not retried."""
    if outcome == "timeout" and final_outcome == "timeout" and exchange.trail and any(
            entry[0] == FIRED and entry[1] == "request" for entry in exchange.trail):
        return "the request timeout fired: no time left for a retry"
    if exchange.target.service is None:
        return "no retries to the app (only a pooled connection the app had closed is resent)"
    if policy is None:
        return "no retries configured for this route"
    if exchange.replay is None:
        return "the request body was too large (or streamed) to keep for a replay"
    would, reason = policy.explain(attempt, method, outcome, status, body_size)
    if would:
        return "retry budget exhausted (%s matched, but retries are capped to a share of traffic)" % reason
    return str(reason)


def _limits(trail: list, exchange: DecidedExchange, outcome: str) -> dict[str, Any]:
    queued = next((entry for entry in trail if entry[0] == QUEUED), None)
    waited = None
    if queued is not None and len(queued) > 2:
        waited = ms(queued[2] - queued[1])
    return {"queued": queued is not None, "queued_ms": waited, "circuit_open": outcome == "circuit-open"}


def _faults(trail: list, outcome: str, status: int) -> list[dict[str, Any]]:
    faults: list[dict[str, Any]] = [{"kind": "delay", "ms": ms(entry[1])} for entry in trail if entry[0] == DELAY]
    if outcome == "fault-abort":
        faults.append({"kind": "abort", "status": status})
    return faults


def _timeouts(action: RouteAction, trail: list) -> dict[str, Any]:
    policy = action.retry_policy
    fired = next((entry for entry in trail if entry[0] == FIRED), None)
    return {
        "request_ms": ms(action.timeout),
        "stream_idle_ms": ms(action.idle_timeout),
        "per_try_ms": ms(policy.per_try_timeout) if policy is not None and policy.per_try_timeout else None,
        "fired": fired[1] if fired is not None else None,
    }


def route_explained(service: Service, action_rule: int, version: str | None, method: str, path: str, query: str,
                    headers: dict[str, str]) -> dict[str, Any]:
    """The matched rule as written, where it came from, the earlier rules' failed conditions, the split."""
    raw = service.raw
    routes = raw.get("routes") or []
    live = raw.get("live") or {}
    matched, misses = service.router.explain(method, path, query, headers)
    if action_rule >= 0:
        matched = action_rule
    if matched >= 0 and matched < len(routes):
        rule = routes[matched]
        text = _written(rule)
        split = rule.get("split") if isinstance(rule, dict) else None
        if split is None and isinstance(rule, dict) and rule.get("version"):
            split = {rule["version"]: 100}
        source = "override" if matched < int(live.get("rules") or 0) else "manifest"
    else:
        text = None
        split = raw.get("split")
        source = "override" if live.get("split") else "manifest"
    return {
        "rule": matched,
        "text": text,
        "conditions": list(service.router.conditions(matched)),
        "source": source,
        "misses": [{"rule": index, "condition": condition} for index, condition in misses if index < max(matched, 0) or matched < 0],
        "split": split,
        "version": version,
    }


def _written(value: Any) -> Any:
    """A rule without its empty keys, closer to how it was written."""
    if isinstance(value, dict):
        return {key: _written(item) for key, item in value.items() if item not in (None, [], {})}
    if isinstance(value, list):
        return [_written(item) for item in value]
    return value


def _route(service: Service, action: RouteAction, method: str, path: str, query: str, headers: dict[str, str]) -> dict[str, Any]:
    return route_explained(service, action.rule, action.version, method, path, query, headers)


def endpoints_state(service: Service, version: str, now: float) -> list[dict[str, Any]]:
    """Each endpoint of `version` as the balancer sees it at `now`."""
    return [
        {"endpoint": endpoint.id, "ejected": endpoint.ejected_until > now,
         "ejected_for_s": round(endpoint.ejected_until - now, 1) if endpoint.ejected_until > now else None,
         "in_flight": endpoint.active}
        for endpoint in service.endpoints if endpoint.version == version
    ]


def balancer_explained(service: Service, version: str, tries: list[dict[str, Any]], started: float) -> dict[str, Any]:
    picked = [entry["endpoint"] for entry in tries]
    considered = endpoints_state(service, version, started)
    skipped = []
    ejected = [entry for entry in considered if entry["ejected"] and entry["endpoint"] not in picked]
    if ejected and len(ejected) < len(considered):
        skipped = [{"endpoint": entry["endpoint"], "reason": "ejected"} for entry in ejected]
    return {
        "algorithm": service.balancer.kind,
        "considered": [entry["endpoint"] for entry in considered],
        "skipped": skipped,
        "panic": bool(considered) and len(ejected) == len(considered),
        "picked": picked,
    }


# -- a request not sent (`meshctl why --from --to`) ------------------------------------------


def plan(snapshot: Snapshot, to: str, method: str, path: str, headers: dict[str, str], now: float) -> dict[str, Any]:
    """What this sidecar would do with a request to service `to`, by the code that routes real ones."""
    service = snapshot.services.get(to)
    if service is None:
        return {"error": "this sidecar has no route to %s (not one of its upstreams)" % to}
    target, _, query = path.partition("?")
    headers = {name.lower(): value for name, value in headers.items()}
    action = service.router.route(method, target, query, headers)
    route = route_explained(service, action.rule, None, method, target, query, headers)
    split = route["split"] or {action.version: 100}
    policy = action.retry_policy
    retries = None
    if policy is not None:
        retries = {
            "attempts": policy.attempts,
            "retry_on": sorted(policy.retry_on),
            "per_try_timeout_ms": ms(policy.per_try_timeout) if policy.per_try_timeout else None,
            "non_idempotent": policy.non_idempotent,
            "method_retried": policy.non_idempotent or method.upper() in IDEMPOTENT_METHODS,
        }
    return {
        "service": to,
        "sidecar": snapshot.instance,
        "route": route,
        "versions": {version: endpoints_state(service, version, now) for version in split},
        "algorithm": service.balancer.kind,
        "timeouts": {"request_ms": ms(action.timeout), "stream_idle_ms": ms(action.idle_timeout),
                     "connect_ms": ms(service.connect_timeout),
                     "per_try_ms": retries["per_try_timeout_ms"] if retries else None},
        "retries": retries,
        "fault": action.fault,
        "mirror": action.mirror,
        "mtls": service.tls is not None,
    }

