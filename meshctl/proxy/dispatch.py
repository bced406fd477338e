"""Connection-level dispatch: which protocol serves a connection, once it is known.

The listener's `protocol` (the service's, from the manifest) and, for `http`, the first
bytes (proxy.detect) decide (docs/protocols-l7.md):

* outbound `http`: HTTP/1 stays with ClientConnection; the h2c preface goes to an
  `H2Proxy` whose streams are balanced one by one over the service's endpoints, to the
  peer sidecar over mTLS with ALPN h2; TLS, other bytes, or silence for
  `detect.DETECT_TIMEOUT_S` become an opaque `Relay` to one endpoint;
* outbound `grpc`: an `H2Proxy` from the first byte; `tcp`: a `Relay` from the first byte
  (no detection, so a server-speaks-first protocol gets its banner at once);
* inbound: a `tcp` app gets a Relay after the caller's identity is authorized; ALPN `h2`
  (or an h2c preface in plaintext) gets an H2Proxy to the app, each stream authorized by
  identity, method and path: h2c to a `grpc` app, one HTTP/1.1 exchange per stream to an
  `http` app (proxy.h1bridge); anything else is HTTP/1.1 as before;
* ingress: ALPN `h2` on a TLS ingress, or the h2c preface on a plain one, gets an H2Proxy
  whose streams are routed by :path prefix like HTTP/1.1 requests; HTTP/1.1 stays with
  ClientConnection on the same port;
* forward: `CONNECT host:port` to an egress host (proxy.listeners decides) becomes a Relay
  with no idle timeout; the client hears `200 Connection Established` once the host is
  connected, or a 502 upstream-connect-failed.

The functions here build those protocols and their hooks (balancing, identity checks,
metrics); proxy.server decides when to call them and swaps the transport's protocol.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshctl.proxy.authz import Policy
from meshctl.proxy.stream_decisions import build_relay_record, build_stream_record, keep_stream
from meshctl.proxy.h2conn import header
from meshctl.proxy.h2proxy import H2Proxy
from meshctl.proxy.errors import MeshError, error_response
from meshctl.proxy.h2streams import StreamRecord, UpstreamChoice
from meshctl.proxy.limits import CircuitLimits
from meshctl.proxy.listeners import ingress_service
from meshctl.proxy.metrics import INBOUND, OUTBOUND
from meshctl.proxy.observe import service_of_identity
from meshctl.proxy.opaque import Relay
from meshctl.proxy.snapshot import Listener, Snapshot

if TYPE_CHECKING:
    from meshctl.proxy.seams import Server

log = logging.getLogger("proxy.dispatch")

TCP_CONNECT_TRIES = 3  # endpoints tried in turn when a connect fails
EGRESS_CONNECT_TIMEOUT = 1.0
ESTABLISHED = b"HTTP/1.1 200 Connection Established\r\n\r\n"


def hand_over(transport: asyncio.Transport, protocol: asyncio.Protocol, pending: bytes = b"") -> None:
    """Give a live connection to another protocol, with the bytes already read."""
    transport.set_protocol(protocol)
    protocol.connection_made(transport)
    if pending:
        protocol.data_received(pending)


# -- HTTP/2 ------------------------------------------------------------------------------------


def _applied(state: Server) -> Snapshot:
    """The snapshot in force: listeners serve only once the first one applied (proxy.control)."""
    snapshot = state.snapshot
    assert snapshot is not None
    return snapshot


def _app_address(listener: Listener) -> tuple[str, int]:
    app = listener.app
    assert app is not None  # an inbound listener has its app's address (proxy.snapshot.Listener)
    return app


def _source_service(state: Server) -> str:
    service = _applied(state).service
    return service if service not in ("None", "?") else "ingress"


def _pick_endpoint(state: Server, service_name: str, headers: list[tuple[bytes, bytes]]) -> UpstreamChoice:
    """Where one HTTP/2 stream to `service_name` goes: route, fault abort, limits, balancer."""
    service = _applied(state).services.get(service_name)
    if service is None:
        raise MeshError("route-not-found", "no service %r in this sidecar's config" % service_name, service=service_name)
    method = (header(headers, b":method") or b"").decode("latin-1")
    path, _, query = (header(headers, b":path") or b"/").decode("latin-1").partition("?")
    fields = None
    if service.needs_headers:
        fields = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers if not name.startswith(b":")}
    router = service.router
    action = router.route(method, path, query, fields) if router.needs_request_details else router.route("", "")
    fault = action.fault
    if fault is not None and fault["abort"] is not None and random.random() * 100 < fault["abort"]["percent"]:
        raise MeshError("fault-abort", "injected fault", fault["abort"]["status"], service.name)
    hash_key = service.balancer.hash_key_for(fields, "127.0.0.1") if service.balancer.needs_headers else None
    slot = object()  # this try's connection slot in the service's limits, until settle()
    if not service.limits.hold(slot):
        raise MeshError("circuit-open", "%d connections and streams in use, limits reached" % (
            service.limits.connections.in_use), service=service.name)
    loop = state.loop
    endpoint = service.balancer.pick(action.version, hash_key, frozenset(), loop.time())
    if endpoint is None:
        _leave_limits(state, service.limits, slot)
        raise MeshError("no-healthy-endpoints", "no endpoints of version %s" % action.version, service=service.name)
    policy = action.retry_policy
    tls = service.tls
    endpoint.active += 1  # least_request sees the stream until settle()
    return UpstreamChoice(
        endpoint.address[0], endpoint.address[1],
        tls.h2_context if tls is not None else None, tls.verify if tls is not None else None,
        timeout=action.timeout, retries=policy.attempts - 1 if policy is not None else 0,
        backoff=policy.backoff_base if policy is not None else 0.025, tag=(service.name, endpoint.version),
        settle=lambda ok: _settle(state, service, endpoint, ok, slot), idle_timeout=action.idle_timeout,
        service=service, action=action, endpoint=endpoint,
    )


def outbound_h2(state: Server, listener: Listener) -> H2Proxy:
    """An H2Proxy for an app's HTTP/2 (or gRPC) connection to `listener.service`."""
    service_name = listener.service
    assert service_name is not None  # an outbound listener names its service
    return state.track(H2Proxy(
        lambda headers: _pick_endpoint(state, service_name, headers), state.loop,
        record=_recorder(state, OUTBOUND, None, service_name), on_closed=state.untrack, service=service_name,
        request_ids=state.next_request_id, echo_request_ids=False))


def ingress_h2(state: Server, listener: Listener) -> H2Proxy:
    """An H2Proxy for an outside client's HTTP/2 or gRPC connection to the ingress: routes by :path prefix."""

    def pick(headers: list[tuple[bytes, bytes]]) -> UpstreamChoice:
        path = header(headers, b":path") or b"/"
        return _pick_endpoint(state, ingress_service(listener, path), headers)

    return state.track(H2Proxy(pick, state.loop, record=_recorder(state, OUTBOUND, None, "-", hop="ingress"), on_closed=state.untrack,
                               service="ingress", request_ids=state.next_request_id))


def _leave_limits(state: Server, limits: CircuitLimits, holder: object) -> None:
    """Give back `holder`'s connection slot; a queued HTTP/1.1 exchange that gets it is woken."""
    woken = limits.leave(holder)
    if woken is not None:
        state.loop.call_soon(woken.admitted)


def _settle(state: Server, service: Any, endpoint: Any, ok: bool | None, slot: object | None = None) -> None:
    """One try on `endpoint` ended: leave its slot and in-flight count, tell outlier detection how it went."""
    if slot is not None:
        _leave_limits(state, service.limits, slot)
    endpoint.active -= 1
    if ok is not None and service.outlier.record(endpoint, ok, state.loop.time(), len(service.endpoints)):
        if state.observer is not None:
            state.observer.count_ejection(service.name, endpoint.version)


def inbound_h2(state: Server, listener: Listener, peer: str | None) -> H2Proxy:
    """An H2Proxy for a peer sidecar's h2 connection (or a plaintext h2c client) to the app."""
    host, port = _app_address(listener)
    http1_app = listener.protocol == "http"  # an `http` app speaks HTTP/1.1: each stream is bridged (proxy.h1bridge)

    def pick(headers: list[tuple[bytes, bytes]]) -> UpstreamChoice:
        snapshot = _applied(state)
        if snapshot.authz is not None:
            _authorize_stream(snapshot.authz, peer, headers)
        return UpstreamChoice(host, port, None, tag=(snapshot.service, snapshot.service_version), http1=http1_app)

    return state.track(H2Proxy(
        pick, state.loop, record=_recorder(state, INBOUND, peer, None), on_closed=state.untrack, peer_sidecar=peer is not None,
        service=_applied(state).service))


def _authorize_stream(policy: Policy, peer: str | None, headers: list[tuple[bytes, bytes]]) -> None:
    method = (header(headers, b":method") or b"").decode("latin-1")
    path = (header(headers, b":path") or b"").decode("latin-1")
    fields = None
    if policy.needs_headers:
        fields = {name.decode("latin-1"): value.decode("latin-1") for name, value in headers if not name.startswith(b":")}
    decision = policy.check(peer, method, path, fields)
    if not decision.allowed:
        raise MeshError("forbidden", "%s may not call %s %s (decided by %s)" % (
            peer or "an unauthenticated caller", method, path.split("?", 1)[0][:200], decision.rule))


def _recorder(
    state: Server, direction: str, peer: str | None, service: str | None, hop: str | None = None
) -> Callable[[StreamRecord, int, int | None, bool], None]:
    """Metrics of each ended stream, and its decision record when it is kept (`hop`: the record's direction)."""
    hop = hop or direction

    def record(stream: StreamRecord, status: int, grpc_code: int | None, mesh_error: bool) -> None:
        observer = state.observer
        if observer is None:
            return
        why = observer.why
        if why.on and keep_stream(stream, status, grpc_code, why.keep_all):
            why.add(build_stream_record, stream, status, grpc_code, hop, peer, state.snapshot, state.loop.time(), service or "-")
        destination, version = stream.choice.tag if isinstance(stream.choice.tag, tuple) else ("-", "")
        method = header(stream.headers, b":method") or b"POST"
        # A stream's latency is the time to its response head, not how long it stayed open.
        duration = (stream.head_at or state.loop.time()) - stream.started
        if direction == INBOUND:
            source = service_of_identity(peer)
            snapshot = _applied(state)
            destination, version = snapshot.service, snapshot.service_version
            path = header(stream.headers, b":path")
        else:
            source, path = _source_service(state), None
        observer.metrics.record_request(direction, source, destination, version, method, status, duration, mesh_error, path)
        if mesh_error and status == 403:
            observer.metrics.count_authz_denied(source, destination)
        if stream.cut == "timeout":
            observer.metrics.count_timeout(destination, version)
        elif stream.cut is not None:
            observer.metrics.count_stream_idle_timeout(destination, version)

    return record


# -- opaque TCP ------------------------------------------------------------------------------------


def _tcp_metrics(state: Server, direction: str, peer_service: str) -> Any:
    observer = state.observer
    if observer is not None:
        observer.metrics.tcp_opened(direction, peer_service)

    def on_close(relay: Relay) -> None:
        observer = state.observer
        if observer is not None:
            # bytes_in: what the client side sent us; bytes_out: what we sent it.
            observer.metrics.tcp_closed(direction, peer_service, relay.sent_upstream, relay.sent_downstream)

    return on_close


def outbound_relay(state: Server, listener: Listener, client_ip: str) -> Relay:
    """A Relay from the app to one endpoint of `listener.service`, picked by its balancer."""
    service_name = listener.service or "-"
    relay = state.track(Relay(state.loop, _applied(state).http.idle_timeout, _tcp_metrics(state, OUTBOUND, service_name)))
    state.loop.create_task(_connect_endpoint(state, relay, service_name, client_ip), name="relay-connect %s" % service_name)
    return relay


async def _connect_endpoint(state: Server, relay: Relay, service_name: str, client_ip: str) -> None:
    """Connect the relay's upstream end, trying other endpoints when a connect fails (L4 balancing)."""
    loop = state.loop
    started = loop.time()
    tried: set[str] = set()
    failed: list | None = None  # the failed connects, for `meshctl why` (None until one fails)
    first = _applied(state).services.get(service_name)
    if first is not None:
        limits = first.limits  # carried over by new snapshots, so the slot is given back where it was taken
        if not limits.hold(relay):
            log.info("relay to %s refused: %d connections in use, limits reached", service_name, limits.connections.in_use)
            _relay_recorded(state, service_name, started, [], "circuit-open")
            relay.close()
            return
        relay.done.add_done_callback(lambda _: _leave_limits(state, limits, relay))
    for _ in range(TCP_CONNECT_TRIES):
        service = _applied(state).services.get(service_name)
        if service is None or relay.closed:
            break
        action = service.router.route("", "")
        hash_key = service.balancer.hash_key_for(None, client_ip) if service.balancer.needs_headers else None
        endpoint = service.balancer.pick(action.version, hash_key, frozenset(tried), loop.time())
        if endpoint is None or endpoint.id in tried:
            break
        tried.add(endpoint.id)
        tls = service.tls
        endpoint.active += 1
        begun = loop.time()
        try:
            async with asyncio.timeout(service.connect_timeout):
                transport, _ = await loop.create_connection(
                    lambda: relay.upstream, endpoint.address[0], endpoint.address[1],
                    ssl=tls.context if tls is not None else None, server_hostname=tls.server_name if tls is not None else None,
                )
            if tls is not None:
                tls.verify(transport)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            _settle(state, service, endpoint, False)
            log.info("relay to %s (%s:%d): %s", service_name, endpoint.address[0], endpoint.address[1], exc or "connect timed out")
            if failed is None:
                failed = []
            failed.append((endpoint, begun, loop.time(), str(exc) or "connect timed out"))
            continue
        relay.done.add_done_callback(lambda _: _settle(state, service, endpoint, None))
        if failed is not None:  # connected, but only after a failed connect: worth explaining too
            _relay_recorded(state, service_name, started, failed + [(endpoint, begun, loop.time(), None)], None)
        return
    _relay_recorded(state, service_name, started, failed or [], "upstream-connect-failed")
    relay.close()


def _relay_recorded(state: Server, service_name: str, started: float, tries: list, error: str | None) -> None:
    """A decision record of an outbound relay whose connect failed (or succeeded after a failure): it gets an id of its own."""
    observer = state.observer
    if observer is not None and observer.why.on:
        observer.why.add(build_relay_record, state.snapshot, service_name, state.next_request_id(), started, state.loop.time(), tries,
                         TCP_CONNECT_TRIES, error)


def authorize_connection(policy: Policy | None, peer: str | None) -> str | None:
    """Why a tcp connection from `peer` is refused, or None: rules with paths, methods or headers never match one."""
    if policy is None:
        return None
    decision = policy.check(peer, "", "", None)
    return None if decision.allowed else decision.rule


def inbound_relay(state: Server, listener: Listener, peer: str | None) -> Relay:
    """A Relay from a peer sidecar (or permissive plaintext client) to the tcp app."""
    host, port = _app_address(listener)
    relay = state.track(Relay(state.loop, _applied(state).http.idle_timeout, _tcp_metrics(state, INBOUND, service_of_identity(peer))))
    state.loop.create_task(relay.connect_upstream(host, port, 1.0), name="relay-connect app")
    return relay


def egress_tunnel(state: Server, address: tuple[str, int], on_close: Callable[[Relay], None]) -> Relay:
    """A CONNECT tunnel to an allowed egress host: a Relay that lives as long as both peers keep it open.

    The caller adopts the client connection as the relay's downstream, with the bytes it
    sent past the CONNECT head; they and whatever follows are held (up to the relay's
    early-bytes bound) until the host is connected. The 200 is the upstream end's
    `announce`, so it reaches the client before any byte of the host's.
    """
    relay = state.track(Relay(state.loop, None, on_close))
    relay.upstream.announce = ESTABLISHED
    state.loop.create_task(_connect_egress(relay, address), name="tunnel-connect")
    return relay


async def _connect_egress(relay: Relay, address: tuple[str, int]) -> None:
    host, port = address
    try:
        async with asyncio.timeout(EGRESS_CONNECT_TIMEOUT):
            await relay.loop.create_connection(lambda: relay.upstream, host, port)
    except (OSError, TimeoutError) as exc:
        # Unless the host was attached (and the 200 sent) just as the timeout struck.
        if not relay.closed and relay.upstream.transport is None:
            detail = "egress %s:%d: %s" % (host, port, getattr(exc, "strerror", None) or exc or "connect timed out")
            relay.downstream.write(error_response("upstream-connect-failed", detail, close=True))
        relay.close()
