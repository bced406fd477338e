"""HTTP/2 (and gRPC) for the sidecar: a sans-IO endpoint over `h2`, and a stream-by-stream proxy.

`H2Endpoint` wraps one `h2` connection behind the same kind of boundary as proxy.http1:
`receive(bytes)` returns events, `data_to_send()` returns bytes for the socket. Header
lists are `(name, value)` byte pairs, pseudo-headers included. Flow control is explicit:
a `Data` event carries `flow_length`, and the window reopens only when the consumer calls
`acknowledge(stream_id, n)` for bytes it has actually passed on, so a slow reader on one
side holds the sender on the other at one window per stream (backpressure).

`H2Proxy` is an asyncio Protocol for one downstream connection (h2c from an app, or h2
over TLS from a peer sidecar once ALPN chose `h2`). Each request stream is mapped to a
stream on an upstream HTTP/2 connection picked by `pick_upstream(headers)`; connections
to the same upstream are shared by all streams of the downstream connection. Headers pass
through without connection-specific fields, data respects both windows, trailers (which
gRPC needs for grpc-status) and resets are forwarded. An upstream that cannot be reached
answers 502 (or, to a gRPC client, a trailers-only UNAVAILABLE).

gRPC semantics for metrics and retries: `grpc_status()`, `is_grpc()`, `grpc_timeout()`,
GRPC_RETRIABLE.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import re
import ssl
from collections.abc import Callable
from typing import Union

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

__all__ = [
    "CONNECTION_SPECIFIC",
    "GRPC_RETRIABLE",
    "ConnectionEnded",
    "Data",
    "H2Endpoint",
    "H2Proxy",
    "Headers",
    "StreamDenied",
    "StreamRecord",
    "UpstreamChoice",
    "StreamEnded",
    "StreamReset",
    "Trailers",
    "WindowOpened",
    "grpc_as_http",
    "grpc_status",
    "grpc_timeout",
    "is_grpc",
    "strip_connection_specific",
]

log = logging.getLogger("proxy.h2conn")

HeaderList = list[tuple[bytes, bytes]]
# Our receive windows: how much a peer may send before we pass it on. They bound the
# memory one stream (and one connection) can hold in the proxy.
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 4 * 1024 * 1024
MAX_CONCURRENT_STREAMS = 256
CONNECT_TIMEOUT_S = 2.0

# RFC 9113 8.2.2: connection-specific fields must not appear in HTTP/2; TE only as "trailers".
CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"host"})

# gRPC status codes (grpc/doc/statuscodes.md) that a retry may fix.
GRPC_OK = 0
GRPC_CANCELLED = 1
GRPC_DEADLINE_EXCEEDED = 4
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_UNIMPLEMENTED = 12
GRPC_UNAVAILABLE = 14
GRPC_RETRIABLE = frozenset({GRPC_CANCELLED, GRPC_DEADLINE_EXCEEDED, GRPC_RESOURCE_EXHAUSTED, GRPC_UNAVAILABLE})

_GRPC_TIMEOUT = re.compile(rb"([0-9]{1,8})([HMSmun])")
_GRPC_TIMEOUT_UNIT = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}


# -- events ----------------------------------------------------------------------------


class Headers:
    """A request head (server side) or response head (client side) opening `stream_id`."""

    __slots__ = ("stream_id", "headers", "end_stream")

    def __init__(self, stream_id: int, headers: HeaderList, end_stream: bool) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.end_stream = end_stream  # a trailers-only response, or a request without body

    def __repr__(self) -> str:
        return "<Headers %d %d fields%s>" % (self.stream_id, len(self.headers), " end" if self.end_stream else "")


class Data:
    __slots__ = ("stream_id", "data", "flow_length")

    def __init__(self, stream_id: int, data: bytes, flow_length: int) -> None:
        self.stream_id = stream_id
        self.data = data
        self.flow_length = flow_length  # counts padding: what acknowledge() must eventually return

    def __repr__(self) -> str:
        return "<Data %d %d bytes>" % (self.stream_id, len(self.data))


class Trailers:
    __slots__ = ("stream_id", "headers")

    def __init__(self, stream_id: int, headers: HeaderList) -> None:
        self.stream_id = stream_id
        self.headers = headers


class StreamEnded:
    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class StreamReset:
    __slots__ = ("stream_id", "error_code")

    def __init__(self, stream_id: int, error_code: int) -> None:
        self.stream_id = stream_id
        self.error_code = error_code


class WindowOpened:
    """The peer granted more send window (stream 0: the whole connection, or new settings)."""

    __slots__ = ("stream_id",)

    def __init__(self, stream_id: int) -> None:
        self.stream_id = stream_id


class ConnectionEnded:
    """GOAWAY received, or a protocol error on our side; no new streams on this connection."""

    __slots__ = ("error_code", "last_stream_id")

    def __init__(self, error_code: int, last_stream_id: int) -> None:
        self.error_code = error_code
        self.last_stream_id = last_stream_id


Event = Union[Headers, Data, Trailers, StreamEnded, StreamReset, WindowOpened, ConnectionEnded]


# -- helpers -------------------------------------------------------------------------------


def strip_connection_specific(headers: HeaderList) -> HeaderList:
    """`headers` as they may be forwarded on another HTTP/2 connection."""
    return [
        (name, value)
        for name, value in headers
        if name not in CONNECTION_SPECIFIC and (name != b"te" or value.strip().lower() == b"trailers")
    ]


def header(headers: HeaderList, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def is_grpc(headers: HeaderList) -> bool:
    content_type = header(headers, b"content-type") or b""
    return content_type.startswith(b"application/grpc")


def grpc_status(headers: HeaderList) -> int | None:
    """grpc-status from trailers or a trailers-only response head; None when absent or malformed."""
    value = header(headers, b"grpc-status")
    if value is None or not value.isdigit() or len(value) > 2:
        return None
    return int(value)


def grpc_timeout(headers: HeaderList) -> float | None:
    """The grpc-timeout request header in seconds (`100m` is 0.1), None when absent or malformed."""
    value = header(headers, b"grpc-timeout")
    if value is None:
        return None
    match = _GRPC_TIMEOUT.fullmatch(value.strip())
    if match is None:
        return None
    return int(match.group(1)) * _GRPC_TIMEOUT_UNIT[match.group(2)]


# -- the sans-IO endpoint --------------------------------------------------------------------


class H2Endpoint:
    """One HTTP/2 connection, either side, bytes in and events out."""

    __slots__ = ("conn", "client_side")

    def __init__(self, client_side: bool) -> None:
        self.client_side = client_side
        config = h2.config.H2Configuration(client_side=client_side, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.local_settings = h2.settings.Settings(
            client=client_side,
            initial_values={
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)

    def __repr__(self) -> str:
        return "<H2Endpoint %s>" % ("client" if self.client_side else "server")

    def data_to_send(self) -> bytes:
        return self.conn.data_to_send()

    def receive(self, data: bytes) -> list[Event]:
        """Events for `data`; raises h2.exceptions.ProtocolError (GOAWAY is then in data_to_send)."""
        out: list[Event] = []
        for event in self.conn.receive_data(data):
            if isinstance(event, (h2.events.RequestReceived, h2.events.ResponseReceived)):
                out.append(Headers(event.stream_id, list(event.headers), event.stream_ended is not None))
                if event.stream_ended is not None:
                    out.append(StreamEnded(event.stream_id))
            elif isinstance(event, h2.events.InformationalResponseReceived):
                continue  # 100-continue and friends: not forwarded, the final head follows
            elif isinstance(event, h2.events.DataReceived):
                out.append(Data(event.stream_id, event.data, event.flow_controlled_length))
                if event.stream_ended is not None:
                    out.append(StreamEnded(event.stream_id))
            elif isinstance(event, h2.events.TrailersReceived):
                out.append(Trailers(event.stream_id, list(event.headers)))
                out.append(StreamEnded(event.stream_id))
            elif isinstance(event, h2.events.StreamEnded):
                if not out or not isinstance(out[-1], StreamEnded) or out[-1].stream_id != event.stream_id:
                    out.append(StreamEnded(event.stream_id))
            elif isinstance(event, h2.events.StreamReset):
                out.append(StreamReset(event.stream_id, int(event.error_code)))
            elif isinstance(event, h2.events.WindowUpdated):
                out.append(WindowOpened(event.stream_id))
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                out.append(WindowOpened(0))
            elif isinstance(event, h2.events.ConnectionTerminated):
                out.append(ConnectionEnded(int(event.error_code), event.last_stream_id or 0))
        return out

    def next_stream_id(self) -> int:
        return self.conn.get_next_available_stream_id()

    def send_headers(self, stream_id: int, headers: HeaderList, end_stream: bool = False) -> None:
        self.conn.send_headers(stream_id, headers, end_stream=end_stream)

    def send_data(self, stream_id: int, data: bytes) -> int:
        """Send as much of `data` as both windows allow now; returns how many bytes went."""
        try:
            room = min(self.conn.local_flow_control_window(stream_id), len(data))
        except h2.exceptions.StreamClosedError:
            return 0
        sent = 0
        frame = self.conn.max_outbound_frame_size
        while sent < room:
            size = min(frame, room - sent)
            self.conn.send_data(stream_id, data[sent : sent + size])
            sent += size
        return sent

    def end_stream(self, stream_id: int) -> None:
        self.conn.end_stream(stream_id)

    def acknowledge(self, stream_id: int, flow_length: int) -> None:
        """The consumer has taken `flow_length` bytes of `stream_id`: reopen the windows."""
        if flow_length:
            self.conn.acknowledge_received_data(flow_length, stream_id)

    def reset(self, stream_id: int, error_code: int = h2.errors.ErrorCodes.CANCEL) -> None:
        try:
            self.conn.reset_stream(stream_id, error_code)
        except h2.exceptions.StreamClosedError:
            pass

    def close(self, error_code: int = h2.errors.ErrorCodes.NO_ERROR) -> None:
        self.conn.close_connection(error_code)


# -- the proxy driver ----------------------------------------------------------------------------


class UpstreamChoice:
    """Where one stream goes, as `pick_upstream(headers)` decides (a plain 3-tuple also works).

    `verify(transport)` checks the upstream's identity after the TLS handshake (raises to
    refuse it); `timeout` caps the stream together with grpc-timeout; `retries` is how many
    more tries a trailers-only retriable gRPC answer may get; `tag` comes back to `record`.
    """

    __slots__ = ("host", "port", "context", "verify", "timeout", "retries", "backoff", "tag")

    def __init__(
        self, host: str, port: int, context: ssl.SSLContext | None = None, verify: Callable | None = None,
        timeout: float | None = None, retries: int = 0, backoff: float = 0.025, tag: object = None,
    ) -> None:
        self.host = host
        self.port = port
        self.context = context
        self.verify = verify
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.tag = tag


class StreamDenied(Exception):
    """Raised by `pick_upstream` to answer a stream itself: `status` 403/404/..., stable `code`."""

    def __init__(self, code: str, detail: str, status: int) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status


PickUpstream = Callable[[HeaderList], "UpstreamChoice | tuple"]
_END = object()
MAX_REPLAY_BYTES = 64 * 1024  # request bytes kept per stream so that a retry can resend them
# HTTP statuses that stand for gRPC codes in metrics (success is grpc-status 0, not :status 200).
_GRPC_AS_HTTP = {0: 200, 1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409,
                 11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401}
_GRPC_BY_HTTP = {403: 7, 404: 12, 504: GRPC_DEADLINE_EXCEEDED}


def grpc_as_http(code: int) -> int:
    """The HTTP status that means what gRPC `code` means (the gRPC-gateway mapping)."""
    return _GRPC_AS_HTTP.get(code, 500)


class StreamRecord:
    """One downstream stream for metrics, retries and its deadline."""

    __slots__ = ("stream_id", "headers", "choice", "started", "grpc", "responded", "replay", "replay_size",
                 "request_complete", "retries_left", "timer", "done", "upstream", "up_stream")

    def __init__(self, stream_id: int, headers: HeaderList, choice: UpstreamChoice, started: float) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.choice = choice
        self.started = started
        self.grpc = is_grpc(headers)
        self.responded = False  # a response head went downstream: no retry any more
        self.replay: list[bytes] | None = [] if choice.retries else None
        self.replay_size = 0
        self.request_complete = False
        self.retries_left = choice.retries
        self.timer: asyncio.TimerHandle | None = None
        self.done = False
        self.upstream: _Side | None = None
        self.up_stream = 0


Record = Callable[[StreamRecord, int, "int | None", bool], None]


class _Pipe:
    """One direction of one proxied stream: items waiting for the target's send window."""

    __slots__ = ("source", "source_stream", "target", "target_stream", "queue", "closed", "grpc", "acknowledges")

    def __init__(self, source: _Side, source_stream: int, target: _Side, target_stream: int) -> None:
        self.source = source
        self.source_stream = source_stream
        self.target = target
        self.target_stream = target_stream
        self.queue: collections.deque = collections.deque()
        self.closed = False
        self.grpc = False  # the stream carries gRPC: errors we generate are gRPC statuses
        self.acknowledges = True  # False for a retry's replayed bytes: the source got its window back already

    def flush(self) -> None:
        """Send what the windows allow; acknowledge to the source only what went out."""
        endpoint = self.target.endpoint
        while self.queue and not self.closed:
            item = self.queue[0]
            if isinstance(item, bytes):
                sent = endpoint.send_data(self.target_stream, item)
                if sent and self.acknowledges:
                    self.source.endpoint.acknowledge(self.source_stream, sent)
                if sent < len(item):
                    if sent:
                        self.queue[0] = item[sent:]
                    break
            elif item is _END:
                endpoint.end_stream(self.target_stream)
                self.closed = True
            else:
                endpoint.send_headers(self.target_stream, item, end_stream=True)
                self.closed = True
            self.queue.popleft()
        if self.closed:
            self.target.forget(self.target_stream)
        self.target.flush()
        self.source.flush()

    def unsent(self) -> int:
        return sum(len(item) for item in self.queue if isinstance(item, bytes))


class _Side(asyncio.Protocol):
    """A connection of the proxy (downstream, or one upstream) with its endpoint and pipes."""

    def __init__(self, proxy: H2Proxy, client_side: bool, label: str) -> None:
        self.proxy = proxy
        self.label = label
        self.endpoint = H2Endpoint(client_side)
        self.transport: asyncio.Transport | None = None
        self.outgoing: dict[int, _Pipe] = {}  # our stream id -> the pipe writing to it
        self.incoming: dict[int, _Pipe] = {}  # our stream id -> the pipe reading from it
        self.lost = False

    def __repr__(self) -> str:
        return "<%s %s>" % (type(self).__name__, self.label)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flush()

    def flush(self) -> None:
        if self.transport is not None and not self.lost:
            data = self.endpoint.data_to_send()
            if data:
                self.transport.write(data)

    def data_received(self, data: bytes) -> None:
        try:
            events = self.endpoint.receive(data)
        except h2.exceptions.ProtocolError as exc:
            log.info("%s: HTTP/2 protocol error: %s", self.label, exc)
            self.flush()
            self.transport.close()  # type: ignore[union-attr]
            return
        for event in events:
            self.proxy.on_event(self, event)
        self.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.proxy.side_lost(self)

    def forget(self, stream_id: int) -> None:
        """Drop a stream's bookkeeping once both of its directions are finished."""
        pipe = self.outgoing.get(stream_id)
        if pipe is not None and pipe.closed and stream_id not in self.incoming:
            del self.outgoing[stream_id]

    def window_opened(self, stream_id: int) -> None:
        pipes = self.outgoing.values() if stream_id == 0 else [p for p in (self.outgoing.get(stream_id),) if p]
        for pipe in list(pipes):
            pipe.flush()


def _as_choice(picked: UpstreamChoice | tuple) -> UpstreamChoice:
    return picked if isinstance(picked, UpstreamChoice) else UpstreamChoice(*picked)


class H2Proxy(_Side):
    """The downstream connection's protocol: serves HTTP/2 and proxies each stream upstream.

    Each stream is balanced on its own (`pick_upstream` runs per stream); streams to the
    same (host, port, context) share one upstream connection per downstream connection.
    `record(stream, status, grpc_code, mesh_error)` runs once per stream when it ends, however
    it ends; for gRPC `status` is the HTTP equivalent of grpc-status (`grpc_as_http`).
    """

    def __init__(self, pick_upstream: PickUpstream, loop: asyncio.AbstractEventLoop | None = None, record: Record | None = None) -> None:
        super().__init__(self, client_side=False, label="downstream")
        self.pick_upstream = pick_upstream
        self.loop = loop or asyncio.get_running_loop()
        self.record = record
        self.upstreams: dict[tuple[str, int, int], _Side] = {}
        self.records: dict[int, StreamRecord] = {}  # downstream stream id -> its record
        self.streams = 0  # requests proxied, for tests and metrics
        self.retried = 0
        self.closed = asyncio.Event()

    def on_event(self, side: _Side, event: Event) -> None:
        if isinstance(event, WindowOpened):
            side.window_opened(event.stream_id)
        elif side is self and isinstance(event, Headers):
            self._open_stream(event)
        elif isinstance(event, Headers):
            pipe = side.incoming.get(event.stream_id)
            if pipe is not None:
                record = self.records.get(pipe.target_stream)
                if record is not None and event.end_stream and self._retry_trailers_only(record, side, event):
                    return
                # end_stream here is a trailers-only response: it must stay one HEADERS frame.
                pipe.target.endpoint.send_headers(pipe.target_stream, strip_connection_specific(event.headers), event.end_stream)
                pipe.closed = event.end_stream
                pipe.target.forget(pipe.target_stream)
                pipe.target.flush()
                if record is not None:
                    record.responded = True
                    if event.end_stream:
                        self._finish(record, event.headers)
        elif isinstance(event, Data):
            pipe = side.incoming.get(event.stream_id)
            padding = event.flow_length - len(event.data)
            side.endpoint.acknowledge(event.stream_id, padding if pipe is not None else event.flow_length)
            if pipe is not None and event.data:
                if side is self:
                    self._keep_for_replay(event.stream_id, event.data)
                pipe.queue.append(event.data)
                pipe.flush()
        elif isinstance(event, Trailers):
            pipe = side.incoming.get(event.stream_id)
            if pipe is not None:
                pipe.queue.append(strip_connection_specific(event.headers))
                pipe.flush()
                record = self.records.get(pipe.target_stream)
                if record is not None:
                    self._finish(record, event.headers)
        elif isinstance(event, StreamEnded):
            pipe = side.incoming.pop(event.stream_id, None)
            if pipe is not None and not pipe.closed:
                if not (pipe.queue and isinstance(pipe.queue[-1], list)):  # trailers end the stream themselves
                    pipe.queue.append(_END)
                pipe.flush()
            if side is self:
                record = self.records.get(event.stream_id)
                if record is not None:
                    record.request_complete = True
            elif pipe is not None:
                record = self.records.get(pipe.target_stream)
                if record is not None and not record.done:
                    self._finish(record, None)
            side.forget(event.stream_id)
        elif isinstance(event, StreamReset):
            self._reset_peer(side, event.stream_id, event.error_code)
        elif isinstance(event, ConnectionEnded):
            if side is not self:
                for stream_id in list(side.incoming):
                    if stream_id > event.last_stream_id:
                        self._reset_peer(side, stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                self.upstreams = {key: up for key, up in self.upstreams.items() if up is not side}

    # -- opening streams and retrying them ------------------------------------------------

    def _open_stream(self, event: Headers) -> None:
        headers = strip_connection_specific(event.headers)
        try:
            choice = _as_choice(self.pick_upstream(headers))
        except StreamDenied as exc:
            self._answer_error(event.stream_id, is_grpc(headers), exc.code, exc.detail, exc.status)
            return
        except Exception as exc:  # a routing error: answer it on this stream only
            self._answer_error(event.stream_id, is_grpc(headers), "route-not-found" if isinstance(exc, LookupError) else "upstream-connect-failed", str(exc))
            return
        record = StreamRecord(event.stream_id, headers, choice, self.loop.time())
        record.request_complete = event.end_stream
        self.records[event.stream_id] = record
        timeout = choice.timeout
        if record.grpc:
            asked = grpc_timeout(headers)
            if asked is not None and (timeout is None or asked < timeout):
                timeout = asked
        if timeout is not None:
            record.timer = self.loop.call_later(timeout, self._expire, event.stream_id)
        self.streams += 1
        self._start_attempt(record, [] if event.end_stream else None)

    def _start_attempt(self, record: StreamRecord, replay: list[bytes] | None) -> None:
        """Send the stream's head upstream; `replay` (a retry) is its whole body, already acknowledged."""
        choice = record.choice
        host, port, context = choice.host, choice.port, choice.context
        key = (host, port, id(context))
        upstream = self.upstreams.get(key)
        if upstream is None:
            upstream = self.upstreams[key] = _Side(self, client_side=True, label="upstream %s:%d" % (host, port))
            self.loop.create_task(self._connect(upstream, key, choice))
        up_stream = upstream.endpoint.next_stream_id()
        ends_now = replay is not None and not replay
        upstream.endpoint.send_headers(up_stream, record.headers, end_stream=ends_now)
        request = _Pipe(self, record.stream_id, upstream, up_stream)
        response = _Pipe(upstream, up_stream, self, record.stream_id)
        response.grpc = record.grpc
        record.upstream, record.up_stream = upstream, up_stream
        upstream.outgoing[up_stream] = request
        upstream.incoming[up_stream] = response
        self.outgoing[record.stream_id] = response
        if replay is None:
            self.incoming[record.stream_id] = request
        else:
            request.acknowledges = False
            request.queue.extend(replay)
            if replay:
                request.queue.append(_END)
            else:
                request.closed = True
            request.flush()
        upstream.flush()

    def _keep_for_replay(self, stream_id: int, data: bytes) -> None:
        record = self.records.get(stream_id)
        if record is None or record.replay is None:
            return
        record.replay_size += len(data)
        if record.replay_size > MAX_REPLAY_BYTES:
            record.replay = None  # too big to hold: this stream will not be retried
        else:
            record.replay.append(data)

    def _retry_trailers_only(self, record: StreamRecord, side: _Side, event: Headers) -> bool:
        """A trailers-only retriable gRPC answer, nothing sent downstream yet: try again."""
        if not (record.grpc and record.retries_left > 0 and record.replay is not None and record.request_complete):
            return False
        if grpc_status(event.headers) not in GRPC_RETRIABLE or record.responded or record.done:
            return False
        record.retries_left -= 1
        self.retried += 1
        side.incoming.pop(event.stream_id, None)
        side.outgoing.pop(event.stream_id, None)
        self.outgoing.pop(record.stream_id, None)
        try:
            record.choice = _as_choice(self.pick_upstream(record.headers))
        except Exception as exc:
            self._answer_error(record.stream_id, True, "upstream-connect-failed", str(exc))
            return True
        replay = list(record.replay)
        self.loop.call_later(record.choice.backoff, self._retry_now, record, replay)
        return True

    def _retry_now(self, record: StreamRecord, replay: list[bytes]) -> None:
        if not record.done and not self.lost:
            self._start_attempt(record, replay)

    def _expire(self, stream_id: int) -> None:
        """The stream's deadline (route timeout or grpc-timeout) passed: DEADLINE_EXCEEDED."""
        record = self.records.get(stream_id)
        if record is None or record.done:
            return
        record.timer = None
        if record.upstream is not None:
            record.upstream.incoming.pop(record.up_stream, None)
            record.upstream.outgoing.pop(record.up_stream, None)
            record.upstream.endpoint.reset(record.up_stream, h2.errors.ErrorCodes.CANCEL)
            record.upstream.flush()
        if record.responded:
            self.incoming.pop(stream_id, None)
            self.outgoing.pop(stream_id, None)
            if record.grpc:
                self.endpoint.conn.send_headers(stream_id, [(b"grpc-status", b"4"), (b"grpc-message", b"timeout")], end_stream=True)
            else:
                self.endpoint.reset(stream_id, h2.errors.ErrorCodes.CANCEL)
            self.flush()
            self._done(record, 504, GRPC_DEADLINE_EXCEEDED if record.grpc else None)
            return
        self._answer_error(stream_id, record.grpc, "timeout", "no response within the deadline", 504)

    async def _connect(self, upstream: _Side, key: tuple, choice: UpstreamChoice) -> None:
        host, port, context = choice.host, choice.port, choice.context
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                transport, _ = await self.loop.create_connection(
                    lambda: upstream, host, port, ssl=context, server_hostname=host if context else None
                )
            if choice.verify is not None:
                choice.verify(transport)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            log.info("h2 upstream %s:%d: %s", host, port, exc or "connect timed out")
            upstream.lost = True
            if self.upstreams.get(key) is upstream:
                del self.upstreams[key]
            for pipe in list(upstream.incoming.values()):
                self._answer_error(pipe.target_stream, pipe.grpc, "upstream-connect-failed", "%s:%d: %s" % (host, port, exc or "timed out"))
            upstream.incoming.clear()
            upstream.outgoing.clear()
            self.flush()

    # -- answers of our own, and the end of a stream ---------------------------------------

    def _answer_error(self, stream_id: int, grpc: bool, code: str, detail: str, status: int | None = None) -> None:
        """Answer one downstream stream ourselves (x-mesh-error, or a gRPC status)."""
        self.outgoing.pop(stream_id, None)
        self.incoming.pop(stream_id, None)
        if status is None:
            status = 404 if code == "route-not-found" else 502
        message = ("%s: %s" % (code, detail)).encode("utf-8", "replace")[:200]
        grpc_code = None
        try:
            if grpc:
                # Trailers-only: gRPC clients map a bare HTTP error status to a vaguer code.
                grpc_code = _GRPC_BY_HTTP.get(status, GRPC_UNAVAILABLE)
                self.endpoint.send_headers(
                    stream_id,
                    [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"%d" % grpc_code),
                     (b"grpc-message", message), (b"x-mesh-error", code.encode("ascii"))],
                    end_stream=True,
                )
            else:
                body = message + b"\n"
                self.endpoint.send_headers(
                    stream_id, [(b":status", b"%d" % status), (b"x-mesh-error", code.encode("ascii")), (b"content-length", b"%d" % len(body))]
                )
                self.endpoint.send_data(stream_id, body)
                self.endpoint.end_stream(stream_id)
        except h2.exceptions.StreamClosedError:
            pass  # the client gave up on this stream meanwhile
        self.flush()
        record = self.records.get(stream_id)
        if record is not None:
            self._done(record, status, grpc_code, mesh_error=True)
        elif self.record is not None:
            self.record(StreamRecord(stream_id, [], UpstreamChoice("", 0), self.loop.time()), status, grpc_code, True)

    def _finish(self, record: StreamRecord, final_headers: HeaderList | None) -> None:
        if record.done:
            return
        status_value = header(final_headers or [], b":status")
        grpc_code = grpc_status(final_headers) if final_headers is not None and record.grpc else None
        if grpc_code is not None:
            status = grpc_as_http(grpc_code)
        else:
            status = int(status_value) if status_value and status_value.isdigit() else 200
        self._done(record, status, grpc_code)

    def _done(self, record: StreamRecord, status: int, grpc_code: int | None, mesh_error: bool = False) -> None:
        if record.done:
            return
        record.done = True
        if record.timer is not None:
            record.timer.cancel()
            record.timer = None
        self.records.pop(record.stream_id, None)
        if self.record is not None:
            try:
                self.record(record, status, grpc_code, mesh_error)
            except Exception:
                log.exception("recording an HTTP/2 stream failed")

    def _reset_peer(self, side: _Side, stream_id: int, error_code: int) -> None:
        pipe = side.incoming.pop(stream_id, None) or side.outgoing.get(stream_id)
        side.outgoing.pop(stream_id, None)
        if pipe is None:
            return
        other, other_stream = (pipe.target, pipe.target_stream) if pipe.source is side else (pipe.source, pipe.source_stream)
        other.incoming.pop(other_stream, None)
        other.outgoing.pop(other_stream, None)
        other.endpoint.reset(other_stream, error_code)
        other.flush()
        record = self.records.get(stream_id if side is self else other_stream)
        if record is not None:
            self._done(record, 502, GRPC_CANCELLED if record.grpc else None, mesh_error=side is not self)

    def side_lost(self, side: _Side) -> None:
        if side is self:
            for upstream in list(self.upstreams.values()):
                if upstream.transport is not None:
                    upstream.transport.close()
            self.upstreams.clear()
            for record in list(self.records.values()):
                self._done(record, 499, GRPC_CANCELLED if record.grpc else None)
            self.closed.set()
            return
        for stream_id in list(side.incoming) + list(side.outgoing):
            self._reset_peer(side, stream_id, h2.errors.ErrorCodes.CANCEL)
        self.upstreams = {key: up for key, up in self.upstreams.items() if up is not side}
