"""HTTP/2 (and gRPC) for the sidecar: a sans-IO endpoint over `h2`, and the gRPC helpers.

`H2Endpoint` wraps one `h2` connection behind the same kind of boundary as proxy.http1:
`receive(bytes)` returns events, `data_to_send()` returns bytes for the socket. Header
lists are `(name, value)` byte pairs, pseudo-headers included. Flow control is explicit:
a `Data` event carries `flow_length`, and the window reopens only when the consumer calls
`acknowledge(stream_id, n)` for bytes it has actually passed on, so a slow reader on one
side holds the sender on the other at one window per stream (backpressure).

gRPC semantics for metrics and retries: `grpc_status()`, `is_grpc()`, `grpc_timeout()`,
`grpc_as_http()`, GRPC_RETRIABLE. The asyncio driver that proxies streams is proxy.h2proxy.
"""

from __future__ import annotations

import re
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
    "Headers",
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

HeaderList = list[tuple[bytes, bytes]]
# Our receive windows: how much a peer may send before we pass it on. They bound the
# memory one stream (and one connection) can hold in the proxy.
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 4 * 1024 * 1024
MAX_CONCURRENT_STREAMS = 256

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


# HTTP statuses that stand for gRPC codes in metrics (success is grpc-status 0, not :status 200).
_GRPC_AS_HTTP = {0: 200, 1: 499, 2: 500, 3: 400, 4: 504, 5: 404, 6: 409, 7: 403, 8: 429, 9: 400, 10: 409,
                 11: 400, 12: 501, 13: 500, 14: 503, 15: 500, 16: 401}


def grpc_as_http(code: int) -> int:
    """The HTTP status that means what gRPC `code` means (the gRPC-gateway mapping)."""
    return _GRPC_AS_HTTP.get(code, 500)


# -- the sans-IO endpoint --------------------------------------------------------------------


class H2Endpoint:
    """One HTTP/2 connection, either side, bytes in and events out."""

    __slots__ = ("conn", "client_side")

    def __init__(self, client_side: bool, peer_sidecar: bool = False) -> None:
        self.client_side = client_side
        # Headers are validated once, where they enter the mesh: outbound ones are headers we
        # validated on the way in, or our own; a peer sidecar (authenticated by mTLS) sends
        # only headers it validated itself. Re-checking every field at each of the four
        # endpoints a request crosses cost about a fifth of a sidecar's CPU. Outbound
        # normalisation stays: it keeps authorization and cookie values out of the HPACK table.
        config = h2.config.H2Configuration(
            client_side=client_side, header_encoding=None, validate_outbound_headers=False,
            validate_inbound_headers=not peer_sidecar,
        )
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
