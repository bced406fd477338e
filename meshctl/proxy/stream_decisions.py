"""Decision records of HTTP/2 and gRPC streams and of outbound TCP relays, for `meshctl why`.

The same record as an HTTP/1.1 exchange's (proxy.decisions), from what the drivers keep
anyway. An HTTP/2 stream's `StreamRecord` (proxy.h2streams) holds its routing decision by
reference (`UpstreamChoice.service/action/endpoint`), the mesh error or cut that ended it
and a `trail` of retried tries that stays None unless a trailers-only retriable gRPC answer
is retried (`h2streams.stream_retried`); `keep_stream()` decides at the stream's end whether a record
is built (`build_stream_record`). A relay (proxy.dispatch) is recorded only when a connect
failed, with an id of its own since raw TCP carries none (`build_relay_record`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from meshctl.proxy.decisions import balancer_explained, ms, route_explained
from meshctl.proxy.h2conn import GRPC_RETRIABLE, HeaderList, grpc_timeout, header

if TYPE_CHECKING:
    from meshctl.proxy.h2streams import StreamRecord, UpstreamChoice
    from meshctl.proxy.snapshot import Snapshot


# -- HTTP/2 and gRPC streams -------------------------------------------------------------------

GRPC_NAMES = ("OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND", "ALREADY_EXISTS",
              "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED",
              "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED")
_DEBUG = (b"x-mesh-debug", b"1")
# How a stream the proxy ended describes its last try.
_STREAM_OUTCOMES = {"upstream-connect-failed": "connect-failure", "upstream-reset": "reset", "timeout": "timeout",
                    "stream-idle-timeout": "stream-idle-timeout"}


def grpc_name(code: int | None) -> str | None:
    return None if code is None else GRPC_NAMES[code] if 0 <= code < len(GRPC_NAMES) else str(code)


def keep_stream(stream: StreamRecord, status: int, grpc_code: int | None, keep_all: bool) -> bool:
    """Whether a stream that just ended gets a record: failed, ended by the mesh, retried, non-OK gRPC, or asked for."""
    if keep_all or status >= 500 or stream.error is not None or stream.cut is not None or stream.trail is not None:
        return True
    if grpc_code and status != 499:  # any grpc-status but OK (0), unless the client cancelled
        return True
    # HTTP/2 field values carry no surrounding whitespace (RFC 9113 8.2.1): one C-level search of the list.
    return _DEBUG in stream.headers


def build_stream_record(stream: StreamRecord, status: int, grpc_code: int | None, direction: str, peer: str | None,
                        snapshot: Snapshot, now: float, service_hint: str, instance: str, own_service: str) -> dict[str, Any]:
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
        "duration_ms": ms(now - stream.started),
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
            record["balancer"] = balancer_explained(service, action.version, tries, stream.started)
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
            "start_ms": ms(begun - started), "duration_ms": ms(ended - begun), "outcome": "response",
            "status": None, "grpc_status": code, "grpc_name": grpc_name(code), "error": None, "retried": backoff is not None,
            "retry_reason": "trailers-only grpc-status %s (retriable)" % grpc_name(code), "backoff_ms": ms(backoff),
        })
    choice = stream.choice
    if not choice.host or (error is not None and error not in _STREAM_OUTCOMES) or (tries and not tries[-1]["retried"]):
        return tries  # refused before any try (route, authz, limits, fault), or no endpoint left for the retry
    endpoint = choice.endpoint
    outcome = _STREAM_OUTCOMES.get(error, "response") if error is not None else "response" if status != 499 else "client-lost"
    tries.append({
        "endpoint": _stream_endpoint(endpoint, inbound), "version": endpoint.version if endpoint is not None else None,
        "start_ms": ms(stream.try_started - started), "duration_ms": ms(now - stream.try_started),
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
    return {"request_ms": ms(choice.timeout), "stream_idle_ms": ms(choice.idle_timeout), "per_try_ms": None,
            "deadline_ms": ms(deadline), "fired": fired}


# -- opaque TCP relays ----------------------------------------------------------------------------


def build_relay_record(snapshot: Snapshot, service_name: str, relay_id: bytes, started: float, now: float, tries: list,
                       allowed: int, error: str | None, instance: str, own_service: str) -> dict[str, Any]:
    """An outbound TCP relay's connects: `tries` are (endpoint, begun, ended, error or None for the one that connected),
    `allowed` how many connects one relay may try."""
    service = snapshot.services.get(service_name) if snapshot is not None else None
    attempts = []
    for index, (endpoint, begun, ended, detail) in enumerate(tries):
        retried = index + 1 < len(tries)
        attempts.append({
            "endpoint": endpoint.id, "version": endpoint.version, "start_ms": ms(begun - started), "duration_ms": ms(ended - begun),
            "outcome": "connect-failure" if detail is not None else "connected", "status": None, "error": detail,
            "retried": retried, "backoff_ms": None, "retry_reason": _relay_retry_reason(retried, detail, len(tries), allowed),
        })
    record: dict[str, Any] = {
        "request_id": relay_id.decode("latin-1"), "ts": round(time.time() - (now - started), 6), "sidecar": instance,
        "service": service_name, "caller_service": own_service, "direction": "outbound", "protocol": "tcp",
        "method": "TCP", "path": "", "peer_identity": None, "mtls": service is not None and service.tls is not None,
        "status": None, "by": "mesh" if error is not None else "app", "error": error, "duration_ms": ms(now - started),
        "route": None, "version": attempts[-1]["version"] if attempts else None, "balancer": None,
        "limits": {"queued": False, "queued_ms": None, "circuit_open": error == "circuit-open"}, "tries": attempts,
        "timeouts": {"request_ms": None, "stream_idle_ms": None, "per_try_ms": None,
                     "connect_ms": ms(service.connect_timeout) if service is not None else None, "fired": None},
        "authz": None, "faults": [], "mirror": None,
    }
    if service is not None and attempts:
        record["balancer"] = balancer_explained(service, attempts[-1]["version"], attempts, started)
    return record


def _relay_retry_reason(retried: bool, failure: str | None, tried: int, allowed: int) -> str | None:
    if retried:
        return "a failed connect is tried on another endpoint"
    if failure is None:
        return None  # this one connected
    return "the %d connects a relay may try are used" % allowed if tried >= allowed else "no other endpoint left to try"
