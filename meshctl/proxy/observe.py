"""What one sidecar reports about its traffic: metrics, spans, tap events and access lines.

The engine calls `Observer.exchange_done(exchange, outcome)` once per finished exchange
(proxy.exchange.Exchange._completed) and `Observer.trace(head, kind)` when it builds the
upstream head (proxy.server.ClientConnection._begin). Everything else is read-out, done
only when someone asks over the config channel (docs/observability.md):

* `{"type": "stats?"}` -> `{"type": "stats", "data": Metrics.snapshot()}`;
* `{"type": "tap", "id", "filter"}` / `{"type": "untap", "id"}` -> `tap-event` lines;
* `record` / `unrecord` -> `record-event` lines (proxy.record); `replay` sends one
  recorded request again and compares (proxy.replay); `shadow-results` batches (proxy.shadow);
* `{"type": "why?", "id", "request_id"}` or `{"type": "why?", "id", "recent": N}` ->
  `{"type": "why", "id", "records"}`: decision records (proxy.decisions);
  `{"type": "why-plan?", "id", "to", "method", "path", "headers"}` -> `{"type": "why-plan",
  "id", "plan"}`: what this sidecar would do with such a request;
* `spans` batches once a second while any are buffered; `access` batches of access lines
  when the snapshot's `access_log` is `on` (every request) or `errors` (status >= 500 or
  mesh error), sent ACCESS_FLUSH_INTERVAL after the first line of a batch or at once when
  ACCESS_BATCH_MAX lines are waiting: one message per request halved the throughput.

The cost when nobody taps and access logs are off is one `Metrics.record_request` call.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from meshctl.proxy.batch import Batch
from meshctl.proxy.decisions import Recorder, eventful, plan
from meshctl.proxy.http1 import HOP_BY_HOP, Head
from meshctl.proxy.idle import STREAM_IDLE_TIMEOUT_CODE
from meshctl.proxy.metrics import INBOUND, OUTBOUND, Metrics, path_template
from meshctl.proxy.record import Recording, record_events
from meshctl.proxy.replay import replay_request
from meshctl.proxy.shadow import RESULTS_BATCH_MAX, RESULTS_FLUSH_INTERVAL
from meshctl.proxy.tracing import (
    B3_SINGLE,
    TRACE_HEADERS,
    Hop,
    Sampler,
    Span,
    SpanBuffer,
    extract,
    next_hop,
)

if TYPE_CHECKING:
    from meshctl.proxy.exchange import Exchange
    from meshctl.proxy.seams import Server
    from meshctl.proxy.snapshot import Snapshot

log = logging.getLogger("proxy.observe")

SPAN_FLUSH_INTERVAL = 1.0
ACCESS_FLUSH_INTERVAL = 0.1  # seconds an access line may wait for others (`logs --access -f` lags this much)
ACCESS_BATCH_MAX = 256
UNKNOWN = "unknown"
ACCESS_LOG_MODES = ("off", "on", "errors")
_NOT_MESH_ERRORS = ("ok", "client-lost")
_DROP_ON_TRACE = frozenset(TRACE_HEADERS) | HOP_BY_HOP
_NEVER_DROPPED = frozenset({b"content-length", b"transfer-encoding", b"host"})
# The trace field lines of a validated head behind a "\n", names in any case (proxy.http1
# validated the block). Searched in b"\n" + fields: the leading literal lets the regex engine
# jump between line feeds instead of trying the names at every byte, as `^` would.
_TRACE_NAMES_LONGEST_FIRST: list[bytes] = sorted(TRACE_HEADERS, key=len, reverse=True)
_TRACE_FIELD = re.compile(rb"\n(" + b"|".join(_TRACE_NAMES_LONGEST_FIRST) + rb"):[ \t]*([^\r\n]*)", re.IGNORECASE)
# A W3C traceparent whose sampled flag is off (flags with bit 0 clear), lower-case as sent.
_W3C_UNSAMPLED = re.compile(rb"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f][02468ace]")
_ZERO_TRACE = b"0" * 32
_ZERO_SPAN = b"0" * 16
_random_bits = random.getrandbits
_SOURCE_CACHE_LIMIT = 1024

Send = Callable[[dict], None]


def service_of_identity(identity: str | None) -> str:
    """`spiffe://td/service/cart` -> `cart`, `spiffe://td/ingress` -> `ingress`."""
    if not identity:
        return UNKNOWN
    path = identity.partition("//")[2].partition("/")[2]
    if path.startswith("service/"):
        return path[len("service/"):] or UNKNOWN
    return path or UNKNOWN


class TapFilter:
    """Which finished exchanges one `meshctl tap` wants; `max_rps` bounds what it costs."""

    __slots__ = ("service", "path_prefix", "method", "status_class", "max_rps", "window_start", "sent")

    def __init__(self, raw: dict[str, Any]) -> None:
        self.service = raw.get("service") or None
        self.path_prefix = raw.get("path_prefix") or None
        self.method = raw.get("method") or None
        status = raw.get("status") or None
        self.status_class = int(status[0]) if isinstance(status, str) and status[:1].isdigit() else None
        self.max_rps = int(raw.get("max_rps") or 100)
        self.window_start = 0.0
        self.sent = 0

    def matches(self, event: dict[str, Any]) -> bool:
        if self.service is not None and self.service not in (event["source"], event["destination"]):
            return False
        if self.path_prefix is not None and not event["path"].startswith(self.path_prefix):
            return False
        if self.method is not None and event["method"] != self.method:
            return False
        return self.status_class is None or event["status"] // 100 == self.status_class

    def admit(self, now: float) -> bool:
        if now - self.window_start >= 1.0:
            self.window_start = now
            self.sent = 0
        self.sent += 1
        return self.sent <= self.max_rps


class Observer:
    """The metrics registry, span buffer and taps of one sidecar process."""

    def __init__(self, state: Server, snapshot: Snapshot, send: Send) -> None:
        self.state = state
        self.send = send
        self.metrics = Metrics(snapshot.instance, snapshot.service, snapshot.service_version)
        self.metrics.in_flight_source = self._in_flight
        self.spans = SpanBuffer()
        self.sampler: Sampler | None = None
        self.access_log = "off"
        self.taps: dict[int, TapFilter] = {}
        self.recordings: dict[int, Recording] = {}  # open `meshctl record`s (proxy.record)
        self.hops: dict[int, Hop] = {}  # id(exchange) -> its span, only while tracing
        self.identity: str | None = None
        self.service_identities: dict[str, str | None] = {}
        self.metrics_on = True
        self.why = Recorder()
        self._own_service = snapshot.service
        self._own_version = snapshot.service_version
        self._outbound_source = snapshot.service if snapshot.service != "None" else "ingress"
        self._sources: dict[str | None, str] = {}  # peer identity -> its service name
        self._flusher: asyncio.TimerHandle | None = None
        self.access_lines = Batch(state.loop, send, "access", "events", ACCESS_BATCH_MAX, ACCESS_FLUSH_INTERVAL)
        self.shadow_results = Batch(state.loop, send, "shadow-results", "results", RESULTS_BATCH_MAX, RESULTS_FLUSH_INTERVAL)  # compared requests (proxy.shadow)

    def __repr__(self) -> str:
        return "<Observer %r, %d taps, %r>" % (self.metrics, len(self.taps), self.spans)

    def configure(self, snapshot: Snapshot, raw: dict[str, Any]) -> None:
        """Take the observability keys of a newly applied snapshot."""
        tracing = raw.get("tracing")
        self.sampler = Sampler(float(tracing.get("sampling", 0.0))) if isinstance(tracing, dict) else None
        mode = raw.get("access_log") or "off"
        self.access_log = mode if mode in ACCESS_LOG_MODES else "off"
        tls = snapshot.tls
        self.identity = tls.identity if tls is not None else None
        if tls is not None and tls.not_after:
            self.metrics.set_certificate_expiry(snapshot.service, tls.not_after)
        self.service_identities = {
            name: (cfg.get("tls") or {}).get("identity") for name, cfg in (raw.get("services") or {}).items() if isinstance(cfg, dict)
        }
        self.metrics_on = raw.get("metrics", True) is not False
        self.why.configure(snapshot, raw.get("why"))
        self._own_service = snapshot.service
        self._own_version = snapshot.service_version
        self._outbound_source = snapshot.service if snapshot.service != "None" else "ingress"
        if self.sampler is not None and self._flusher is None:
            self._flusher = self.state.loop.call_later(SPAN_FLUSH_INTERVAL, self._flush_spans)
        self._hook()

    def _hook(self) -> None:
        """Unhook exchange_done when nothing would record (metrics off, no spans, taps or access lines)."""
        sampler = self.sampler
        wanted = (self.metrics_on or self.taps or self.recordings or self.access_log != "off"
                  or (sampler is not None and sampler.rate > 0.0) or self.why.on)
        # While recording, a hook that also records: no check on the hot path otherwise.
        self.state.on_exchange_done = (self._done_and_recorded if self.recordings else self.exchange_done) if wanted else None
        self.state.pool.observer = self if self.metrics_on else None

    # -- channel requests ------------------------------------------------------------------

    def handle(self, message: dict[str, Any]) -> bool:
        """Answer an observability message; False when it is not one."""
        kind = message.get("type")
        if kind == "stats?":
            self.send({"type": "stats", "data": self.metrics.snapshot()})
        elif kind == "tap":
            self.taps[int(message.get("id", 0))] = TapFilter(message.get("filter") or {})
            self._hook()
        elif kind == "untap":
            self.taps.pop(int(message.get("id", 0)), None)
            self._hook()
        elif kind == "record":
            recording = Recording(message)
            self.recordings[recording.id] = recording
            self._hook()
        elif kind == "unrecord":
            self.recordings.pop(int(message.get("id", 0)), None)
            self._hook()
        elif kind == "replay":
            replay_request(self.state, message, self.shadow_results.add)
        elif kind == "why?":
            request_id = message.get("request_id")
            found = self.why.find(request_id) if isinstance(request_id, str) else self.why.recent(int(message.get("recent") or 0))
            self.send({"type": "why", "id": message.get("id"), "instance": self.metrics.instance, "records": found})
        elif kind == "why-plan?":
            snapshot = self.state.snapshot
            assert snapshot is not None  # the agent asks only sidecars that applied a config
            headers = message.get("headers")
            if not isinstance(headers, dict):
                headers = {}
            answer = plan(snapshot, str(message.get("to")), str(message.get("method") or "GET"), str(message.get("path") or "/"),
                          {str(k): str(v) for k, v in headers.items()}, self.state.loop.time())
            self.send({"type": "why-plan", "id": message.get("id"), "instance": self.metrics.instance, "plan": answer})
        else:
            return False
        return True

    def flush_access(self) -> None:
        """Send the access lines waiting (also at exit, so that a drain loses none)."""
        self.access_lines.flush()

    def _flush_spans(self) -> None:
        self._flusher = None
        if self.spans.spans:
            dropped, self.spans.dropped = self.spans.dropped, 0
            self.send({"type": "spans", "spans": self.spans.drain(), "dropped": dropped})
        if self.sampler is not None:
            self._flusher = self.state.loop.call_later(SPAN_FLUSH_INTERVAL, self._flush_spans)

    # -- hooks (hot path) ------------------------------------------------------------------

    def trace(self, exchange_key: int, head: Head, listener_kind: str) -> list[bytes] | None:
        """The next hop's trace header lines, or None to pass the headers through untouched.

        Only the ingress starts traces; other listeners continue the ones that arrive. A
        trace the caller decided not to sample passes through untouched: no hop records a
        span of it, so a new span id would link nothing, and the head need not be rebuilt.
        """
        sampler = self.sampler
        if sampler is None:
            return None
        block = b"\n" + head.fields
        first = _TRACE_FIELD.search(block) if head.fields else None
        if first is None:
            if listener_kind != "ingress":
                return None
            return self._start_trace(exchange_key, sampler)
        name, value = first.groups()
        if name.lower() == b"traceparent":
            # The first trace field is the traceparent (as sidecars write them): the common
            # unsampled case is decided from it alone, without collecting the others.
            match = _W3C_UNSAMPLED.fullmatch(value.rstrip(b" \t"))
            if match is not None and match.group(1) != _ZERO_TRACE and match.group(2) != _ZERO_SPAN:
                return None
        found: dict[bytes, bytes] = {}
        for name, value in _TRACE_FIELD.findall(block, first.start()):
            found.setdefault(name.lower(), value.rstrip(b" \t"))
        traceparent = found.get(b"traceparent")
        if traceparent is not None:
            match = _W3C_UNSAMPLED.fullmatch(traceparent)
            if match is not None and match.group(1) != _ZERO_TRACE and match.group(2) != _ZERO_SPAN:
                return None  # unsampled W3C, decided without parsing every format
        incoming = extract(found.get)
        if incoming is None:
            if listener_kind != "ingress":
                return None
            return self._start_trace(exchange_key, sampler)
        if incoming.sampled is False:
            return None
        # Span ids need to be unique, not secret: the PRNG spares a getrandom call.
        hop = next_hop(incoming, sampler, "%016x" % (_random_bits(64) or 1))
        if hop.sampled:
            self.hops[exchange_key] = hop
        return [name + b": " + value for name, value in hop.headers()]

    def _start_trace(self, exchange_key: int, sampler: Sampler) -> list[bytes]:
        """A new trace: W3C and single-header B3 lines, as Hop.headers() writes them."""
        trace_id = b"%032x" % (_random_bits(128) or 1)
        span_id = b"%016x" % (_random_bits(64) or 1)
        if sampler.decide(None):
            self.hops[exchange_key] = Hop(trace_id.decode(), span_id.decode(), None, True, None, B3_SINGLE)
            return [b"traceparent: 00-%s-%s-01" % (trace_id, span_id), b"b3: %s-%s-1" % (trace_id, span_id)]
        return [b"traceparent: 00-%s-%s-00" % (trace_id, span_id), b"b3: %s-%s-0" % (trace_id, span_id)]

    def exchange_done(self, exchange: Exchange, outcome: str) -> None:
        client = exchange.client
        inbound = client.listener.kind == "inbound"
        mesh_error = outcome not in _NOT_MESH_ERRORS
        status = exchange.status if exchange.response_started or mesh_error else 0
        duration = self.state.loop.time() - exchange.started
        # A stream's latency is the time to its response head, not how long it stayed open.
        latency = exchange.head_at - exchange.started if exchange.head_at else duration
        if inbound:
            source = self._sources.get(client.peer_identity) or self.source_of(client.peer_identity)
            destination = self._own_service
            version = self._own_version
        else:
            source = self._outbound_source
            service = exchange.target.service
            destination = service.name if service is not None else exchange.target.label
            endpoint = exchange.last_endpoint
            if endpoint is not None:
                version = endpoint.version
            else:
                action = exchange.action
                version = action.version if action is not None else ""
        metrics = self.metrics
        if self.metrics_on:
            metrics.record_request(
                OUTBOUND if not inbound else INBOUND, source, destination, version, exchange.method, status, latency,
                mesh_error, exchange.head.target if inbound else None,
            )
            if exchange.attempt > 1:
                for _ in range(exchange.attempt - 1):
                    metrics.count_retry(destination, version)
            if mesh_error:
                if outcome == "timeout":
                    metrics.count_timeout(destination, version)
                elif outcome == STREAM_IDLE_TIMEOUT_CODE:
                    metrics.count_stream_idle_timeout(destination, version)
                elif outcome == "forbidden":
                    metrics.count_authz_denied(source, destination)
        trace_id = None
        if self.hops:
            hop = self.hops.pop(id(exchange.head), None)
            if hop is not None:
                trace_id = hop.trace_id
                self.spans.add(Span(
                    hop.trace_id, hop.span_id, hop.parent_id, destination if inbound else source, metrics.instance,
                    "%s %s" % (exchange.method.decode("latin-1"), path_template(exchange.head.target)),
                    time.time() - duration, duration, status, INBOUND if inbound else OUTBOUND,
                ))
        if self.taps or self.access_log == "on" or (self.access_log == "errors" and (mesh_error or status >= 500)):
            self._emit(exchange, inbound, source, destination, version, status, duration,
                       outcome if mesh_error else None, trace_id)
        why = self.why
        if why.on:
            trail = exchange.trail
            if mesh_error or status >= 500 or why.keep_all or exchange.head.debug or (trail is not None and eventful(trail)):
                why.keep(exchange, outcome, status, duration)

    def _done_and_recorded(self, exchange: Exchange, outcome: str) -> None:
        self.exchange_done(exchange, outcome)
        if exchange.client.listener.kind == "inbound":
            mesh_error = outcome not in _NOT_MESH_ERRORS
            record_events(self.recordings, exchange, exchange.status if exchange.response_started or mesh_error else 0, self.send)

    def count_ejection(self, destination: str, version: str) -> None:
        if self.metrics_on:
            self.metrics.count_ejection(destination, version)

    def tcp_opened(self, direction: str, peer_service: str) -> None:
        self.metrics.tcp_opened(direction, peer_service)

    def tcp_closed(self, direction: str, peer_service: str, bytes_in: int, bytes_out: int) -> None:
        self.metrics.tcp_closed(direction, peer_service, bytes_in, bytes_out)

    def client_closed(self, peer_identity: str | None, bytes_in: int, bytes_out: int) -> None:
        """An HTTP/1 client connection closed: counted as opened and closed, with its bytes."""
        if self.metrics_on:
            peer = self.source_of(peer_identity)
            metrics = self.metrics
            metrics.tcp_opened(INBOUND, peer)
            metrics.tcp_closed(INBOUND, peer, bytes_in, bytes_out)

    def source_of(self, identity: str | None) -> str:
        """The service a peer identity names, cached (identities are few)."""
        source = self._sources.get(identity)
        if source is None:
            if len(self._sources) >= _SOURCE_CACHE_LIMIT:
                self._sources.clear()
            source = self._sources[identity] = service_of_identity(identity)
        return source

    # -- read-outs of one exchange -----------------------------------------------------------

    def _emit(self, exchange: Exchange, inbound: bool, source: str, destination: str, version: str, status: int,
              duration: float, mesh_error: str | None, trace_id: str | None) -> None:
        client = exchange.client
        head = exchange.head
        request_id = exchange.request_id or head.get(b"x-request-id")
        if inbound:
            source_identity, destination_identity, tls = client.peer_identity, self.identity, client.peer_identity is not None
        else:
            destination_identity = self.service_identities.get(destination)
            source_identity, tls = self.identity, destination_identity is not None
        event = {
            "ts": time.time(),
            "instance": self.metrics.instance,
            "direction": INBOUND if inbound else OUTBOUND,
            "source": source,
            "source_identity": source_identity,
            "destination": destination,
            "destination_identity": destination_identity,
            "version": version,
            "tls": tls,
            "method": exchange.method.decode("latin-1"),
            "path": head.target.decode("latin-1"),
            "status": status,
            "ms": round(duration * 1000, 3),
            "request_id": request_id.decode("latin-1") if request_id is not None else None,
            "mesh_error": mesh_error,
            "trace_id": trace_id,  # None unless this exchange was sampled into a trace
        }
        if self.access_log == "on" or (self.access_log == "errors" and (mesh_error or status >= 500)):
            self.access_lines.add(event)
        if self.taps:
            now = self.state.loop.time()
            for tap_id, tap in self.taps.items():
                if tap.matches(event) and tap.admit(now):
                    self.send({"type": "tap-event", "id": tap_id, "event": event})

    def _in_flight(self) -> dict[tuple[str, str], int]:
        counts: dict[tuple[str, str], int] = {}
        own = self.metrics.service
        for conn in self.state.connections:
            exchange = conn.exchange
            if exchange is None:
                continue
            if conn.listener.kind == "inbound":
                key = (INBOUND, own)
            else:
                service = exchange.target.service
                key = (OUTBOUND, service.name if service is not None else exchange.target.label)
            counts[key] = counts.get(key, 0) + 1
        return counts


def rebuild_traced_head(head: Head, add: list[bytes], start_line: bytes | None) -> bytes:
    """`head` without hop-by-hop and incoming trace headers, with `add` (trace lines included)."""
    lines = [head.start_line if start_line is None else start_line]
    fields = head.fields
    if not head.has_hop_by_hop and _TRACE_FIELD.search(b"\n" + fields) is None:
        # Nothing to drop (a new trace at the ingress): the field block goes out as it came.
        if fields:
            lines.append(fields)
    else:
        drop = _DROP_ON_TRACE | (head.connection_tokens - _NEVER_DROPPED) if head.has_hop_by_hop else _DROP_ON_TRACE
        lines.extend(line for (name, _), line in zip(head.headers, head.lines) if name not in drop)
    lines.extend(add)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)
