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

HTTP/2 and gRPC streams (proxy.h2proxy) get the same record from `build_stream_record()`:
the stream's `StreamRecord` holds its routing decision by reference (`UpstreamChoice`),
the tries retried before the last one (`stream_retried`, rare) and the mesh error that
ended it; `keep_stream()` is the rule for which streams are kept, at the stream's end.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import TYPE_CHECKING, Any

from meshctl.proxy.h2conn import GRPC_RETRIABLE, HeaderList, grpc_timeout, header
from meshctl.proxy.retry import IDEMPOTENT_METHODS

if TYPE_CHECKING:
    from meshctl.proxy.exchange import Exchange
    from meshctl.proxy.h2streams import StreamRecord, UpstreamChoice
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


def note(exchange: Exchange, *entry: Any) -> None:
    """Remember a rare event of `exchange` (failure paths and opt-in features only)."""
    trail = exchange.trail
    if trail is None:
        trail = exchange.trail = []
    trail.append(list(entry))


def try_ended(exchange: Exchange, outcome: str, status: int | None, detail: str | None) -> None:
    """A try failed or is about to be retried; `retrying()` marks it when a retry follows."""
    if not exchange.try_started:
        return  # nothing was tried yet (queued, delayed by a fault): the timeout note says it all
    note(exchange, TRY, exchange.endpoint, exchange.try_started, exchange.client.state.loop.time(), outcome, status, detail, None)


def retrying(exchange: Exchange, delay: float, counted: bool) -> None:
    """The last try is retried after `delay` seconds (`counted` False: a stale pooled connection)."""
    trail = exchange.trail
    if trail:
        for entry in reversed(trail):
            if entry[0] == TRY:
                entry[7] = (delay, counted)
                return


def woken(exchange: Exchange) -> None:
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

    def keep(self, exchange: Exchange, outcome: str, status: int, duration: float) -> None:
        try:
            self.records.append(build_record(exchange, outcome, status, duration, self.instance, self.service))
        except Exception:
            # A record explains a request; failing to build one must never fail the request.
            log.exception("building the decision record of %r failed", exchange)

    def keep_stream(self, stream: StreamRecord, status: int, grpc_code: int | None, direction: str, peer: str | None,
                    snapshot: Snapshot, now: float, service_hint: str) -> None:
        try:
            self.records.append(build_stream_record(stream, status, grpc_code, direction, peer, snapshot, now,
                                                    self.instance, self.service, service_hint))
        except Exception:
            log.exception("building the decision record of HTTP/2 stream %d failed", stream.stream_id)

    def find(self, request_id: str) -> list[dict[str, Any]]:
        return [record for record in self.records if record["request_id"] == request_id]

    def recent(self, count: int) -> list[dict[str, Any]]:
        count = max(0, min(count, MAX_RECENT))
        return list(self.records)[-count:] if count else []


# -- building one record (only for kept requests) ------------------------------------------


def build_record(exchange: Exchange, outcome: str, status: int, duration: float, instance: str, own_service: str) -> dict[str, Any]:
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
        "duration_ms": _ms(duration),
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
        record["balancer"] = _balancer(service, action.version, record["tries"], started)
        record["timeouts"] = _timeouts(action, trail)
    if direction == "inbound" and snapshot is not None and snapshot.authz is not None:
        decision = snapshot.authz.check(client.peer_identity, method, target_text, headers)
        record["authz"] = {"decision": "allow" if decision.allowed else "deny", "rule": decision.rule}
    return record


def _ms(seconds: float | None) -> float | None:
    """Milliseconds, or None for a limit that is not set (no whole-request timeout by default)."""
    return None if seconds is None else round(seconds * 1000, 3)


def _endpoint_name(endpoint: Any, exchange: Exchange) -> str:
    if endpoint is not None:
        return endpoint.id
    return "app" if exchange.client.listener.kind == "inbound" else exchange.target.label


def _tries(exchange: Exchange, trail: list, outcome: str, status: int, method: str, started: float) -> list[dict[str, Any]]:
    entries = [entry for entry in trail if entry[0] == TRY]
    tries = []
    policy = exchange.action.retry_policy if exchange.action is not None else None
    body_size = exchange.replay_size - len(exchange.replay[0]) if exchange.replay and exchange.request_done else None
    attempt = 1
    for _, endpoint, begun, ended, try_outcome, try_status, detail, retry in entries:
        entry = {
            "endpoint": _endpoint_name(endpoint, exchange),
            "version": endpoint.version if endpoint is not None else None,
            "start_ms": _ms(begun - started),
            "duration_ms": _ms(ended - begun),
            "outcome": try_outcome,
            "status": try_status,
            "error": detail,
            "retried": retry is not None,
            "retry_reason": None,
            "backoff_ms": None,
        }
        if retry is not None:
            delay, counted = retry
            entry["backoff_ms"] = _ms(delay)
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
            "start_ms": _ms(begun - started),
            "duration_ms": _ms(exchange.client.state.loop.time() - begun),
            "outcome": "response" if outcome in _OK_OUTCOMES else outcome,
            "status": status or None,
            "error": outcome if outcome not in _OK_OUTCOMES else None,
            "retried": False,
            "retry_reason": _why_not(exchange, policy, attempt, method, "response", status, body_size, outcome) if status >= 500 else None,
            "backoff_ms": None,
        })
    return tries


def _why_not(exchange: Exchange, policy: Any, attempt: int, method: str, outcome: str, status: int | None,
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
    return reason


def _limits(trail: list, exchange: Exchange, outcome: str) -> dict[str, Any]:
    queued = next((entry for entry in trail if entry[0] == QUEUED), None)
    waited = None
    if queued is not None and len(queued) > 2:
        waited = _ms(queued[2] - queued[1])
    return {"queued": queued is not None, "queued_ms": waited, "circuit_open": outcome == "circuit-open"}


def _faults(trail: list, outcome: str, status: int) -> list[dict[str, Any]]:
    faults: list[dict[str, Any]] = [{"kind": "delay", "ms": _ms(entry[1])} for entry in trail if entry[0] == DELAY]
    if outcome == "fault-abort":
        faults.append({"kind": "abort", "status": status})
    return faults


def _timeouts(action: RouteAction, trail: list) -> dict[str, Any]:
    policy = action.retry_policy
    fired = next((entry for entry in trail if entry[0] == FIRED), None)
    return {
        "request_ms": _ms(action.timeout),
        "stream_idle_ms": _ms(action.idle_timeout),
        "per_try_ms": _ms(policy.per_try_timeout) if policy is not None and policy.per_try_timeout else None,
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


def _balancer(service: Service, version: str, tries: list[dict[str, Any]], started: float) -> dict[str, Any]:
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
            "per_try_timeout_ms": _ms(policy.per_try_timeout) if policy.per_try_timeout else None,
            "non_idempotent": policy.non_idempotent,
            "method_retried": policy.non_idempotent or method.upper() in IDEMPOTENT_METHODS,
        }
    return {
        "service": to,
        "sidecar": snapshot.instance,
        "route": route,
        "versions": {version: endpoints_state(service, version, now) for version in split},
        "algorithm": service.balancer.kind,
        "timeouts": {"request_ms": _ms(action.timeout), "stream_idle_ms": _ms(action.idle_timeout),
                     "connect_ms": _ms(service.connect_timeout),
                     "per_try_ms": retries["per_try_timeout_ms"] if retries else None},
        "retries": retries,
        "fault": action.fault,
        "mirror": action.mirror,
        "mtls": service.tls is not None,
    }


# -- HTTP/2 and gRPC streams -------------------------------------------------------------------

GRPC_NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
              "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
              "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")
_DEBUG_FIELD = b"x-mesh-debug"
# How a stream the proxy ended describes its last try.
_STREAM_OUTCOMES = {"upstream-connect-failed": "connect-failure", "upstream-reset": "reset", "timeout": "timeout",
                    "stream-idle-timeout": "stream-idle-timeout"}


def grpc_name(code: int | None) -> str | None:
    return None if code is None else GRPC_NAMES[code] if 0 <= code < len(GRPC_NAMES) else str(code)


def keep_stream(stream: StreamRecord, status: int, grpc_code: int | None, keep_all: bool) -> bool:
    """Whether a stream that just ended gets a record: failed, ended by the mesh, retried, non-OK gRPC, or asked for."""
    if keep_all or status >= 500 or stream.error is not None or stream.cut is not None or stream.trail is not None:
        return True
    if grpc_code:  # any grpc-status but OK (0)
        return True
    for name, value in stream.headers:
        if name == _DEBUG_FIELD:
            return value.strip() == b"1"
    return False


def stream_retried(stream: StreamRecord, tried: UpstreamChoice, grpc_code: int | None, now: float, backoff: float | None) -> None:
    """A trailers-only retriable gRPC answer on `tried` is retried after `backoff` (None: no endpoint left to pick)."""
    trail = stream.trail
    if trail is None:
        trail = stream.trail = []
    trail.append((tried.endpoint, stream.try_started, now, grpc_code, backoff))


def build_stream_record(stream: StreamRecord, status: int, grpc_code: int | None, direction: str, peer: str | None,
                        snapshot: Snapshot, now: float, instance: str, own_service: str, service_hint: str) -> dict[str, Any]:
    """The record of one HTTP/2 or gRPC stream, with the keys of `build_record`'s and grpc_status.

    `service_hint` names the destination of a stream refused before it had one (the outbound listener's service).
    """
    headers = stream.headers
    choice = stream.choice
    service = choice.service
    inbound = direction == "inbound"
    method = (header(headers, b":method") or b"").decode("latin-1")
    target = (header(headers, b":path") or b"").decode("latin-1")
    path, _, query = target.partition("?")
    request_id = header(headers, b"x-request-id")
    fields = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers if name[:1] != b":"}
    error = stream.error or stream.cut
    if inbound:
        name = own_service
    elif service is not None:
        name = service.name
    else:
        name = choice.tag[0] if isinstance(choice.tag, tuple) else service_hint
    tries = _stream_tries(stream, status, grpc_code, error, inbound, now)
    action = choice.action
    record: dict[str, Any] = {
        "request_id": request_id.decode("latin-1") if request_id is not None else None,
        "ts": round(time.time() - (now - stream.started), 6),
        "sidecar": instance,
        "service": name,
        "caller_service": None if inbound else own_service,
        "direction": direction,
        "protocol": "grpc" if stream.grpc else "http2",
        "method": method,
        "path": path[:500],
        "peer_identity": peer if inbound else None,
        "mtls": peer is not None if inbound else choice.context is not None,
        "status": status,
        "grpc_status": grpc_code,
        "grpc_name": grpc_name(grpc_code),
        "by": "mesh" if error is not None else "app",
        "error": error,
        "duration_ms": _ms(now - stream.started),
        "route": None,
        "version": action.version if action is not None else None,
        "balancer": None,
        "limits": {"queued": False, "queued_ms": None, "circuit_open": error == "circuit-open"},
        "tries": tries,
        "timeouts": _stream_timeouts(stream, headers),
        "authz": None,
        "faults": [{"kind": "abort", "status": status}] if error == "fault-abort" else [],
        "mirror": None,
    }
    if service is None and not inbound and snapshot is not None:
        service = snapshot.services.get(name)  # refused before a choice: explained by re-routing
    if service is not None:
        record["route"] = route_explained(service, action.rule if action is not None else -1, record["version"], method, path,
                                          query, fields)
        if action is not None:
            record["balancer"] = _balancer(service, action.version, tries, stream.started)
    if inbound and snapshot is not None and snapshot.authz is not None:
        decision = snapshot.authz.check(peer, method, target, fields)
        record["authz"] = {"decision": "allow" if decision.allowed else "deny", "rule": decision.rule}
    return record


def _stream_endpoint(endpoint: Any, inbound: bool) -> str:
    return endpoint.id if endpoint is not None else "app" if inbound else "?"


def _stream_tries(stream: StreamRecord, status: int, grpc_code: int | None, error: str | None, inbound: bool,
                  now: float) -> list[dict[str, Any]]:
    started = stream.started
    tries = []
    for endpoint, begun, ended, code, backoff in stream.trail or ():
        tries.append({
            "endpoint": _stream_endpoint(endpoint, inbound), "version": endpoint.version if endpoint is not None else None,
            "start_ms": _ms(begun - started), "duration_ms": _ms(ended - begun), "outcome": "response",
            "status": None, "grpc_status": code, "grpc_name": grpc_name(code), "error": None, "retried": backoff is not None,
            "retry_reason": "trailers-only grpc-status %s (retriable)" % grpc_name(code), "backoff_ms": _ms(backoff),
        })
    choice = stream.choice
    if not choice.host or (error is not None and error not in _STREAM_OUTCOMES) or (tries and not tries[-1]["retried"]):
        return tries  # refused before any try (route, authz, limits, fault), or no endpoint left for the retry
    endpoint = choice.endpoint
    outcome = _STREAM_OUTCOMES.get(error, "response") if error is not None else "response" if status != 499 else "client-lost"
    tries.append({
        "endpoint": _stream_endpoint(endpoint, inbound), "version": endpoint.version if endpoint is not None else None,
        "start_ms": _ms(stream.try_started - started), "duration_ms": _ms(now - stream.try_started),
        "outcome": outcome, "status": status if outcome == "response" else None, "grpc_status": grpc_code if outcome == "response" else None,
        "grpc_name": grpc_name(grpc_code) if outcome == "response" else None,
        "error": error, "retried": False,
        "retry_reason": _stream_why_not(stream, grpc_code, outcome) if (status >= 500 or grpc_code) and not inbound else None,
        "backoff_ms": None,
    })
    return tries


def _stream_why_not(stream: StreamRecord, grpc_code: int | None, outcome: str) -> str:
    """Why the last try of a stream was not retried (h2proxy retries trailers-only retriable gRPC answers only)."""
    if not stream.grpc:
        return "HTTP/2 streams are retried only for trailers-only gRPC answers"
    if outcome in ("timeout", "stream-idle-timeout"):
        return "the deadline passed: no time left for a retry"
    if not stream.choice.retries and stream.trail is None:
        return "no retries configured for this route"
    if grpc_code is not None and grpc_code not in GRPC_RETRIABLE:
        return "grpc-status %s is not retried (only CANCELLED, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNAVAILABLE)" % grpc_name(grpc_code)
    if stream.retries_left <= 0:
        return "attempts used"
    if stream.replay is None:
        return "the request body was too large (over 64 KiB) to keep for a replay"
    return "the answer was not trailers-only: the response had begun"


def _stream_timeouts(stream: StreamRecord, headers: HeaderList) -> dict[str, Any]:
    """The route timeout, the client's grpc-timeout (the deadline), the stream idle timeout, and which one fired."""
    choice = stream.choice
    deadline = grpc_timeout(headers) if stream.grpc else None
    fired = None
    if stream.cut == "timeout":
        fired = "deadline" if deadline is not None and (choice.timeout is None or deadline < choice.timeout) else "request"
    elif stream.cut is not None:
        fired = "stream_idle"
    return {"request_ms": _ms(choice.timeout), "stream_idle_ms": _ms(choice.idle_timeout), "per_try_ms": None,
            "deadline_ms": _ms(deadline), "fired": fired}
