"""HTTP/2 (and gRPC) for the sidecar: a sans-IO endpoint over a codec, and the gRPC helpers.

`H2Endpoint` wraps one connection of the HTTP/2 codec (ngh2, libnghttp2's sans-IO
wrapper, where installed; the pure-Python `h2` otherwise; MESHCTL_H2_CODEC=h2 forces the
fallback) behind the same kind of boundary as proxy.http1:
`receive(bytes)` returns events, `data_to_send()` returns bytes for the socket. Header
lists are `(name, value)` byte pairs, pseudo-headers included. Flow control is explicit:
a `Data` event carries `flow_length`, and the window reopens only when the consumer calls
`acknowledge(stream_id, n)` for bytes it has actually passed on, so a slow reader on one
side holds the sender on the other at one window per stream (backpressure).

gRPC semantics for metrics and retries: `grpc_status()`, `is_grpc()`, `grpc_timeout()`,
`grpc_as_http()`, GRPC_RETRIABLE. The asyncio driver that proxies streams is proxy.h2proxy.
"""

from __future__ import annotations

import os
import re
from typing import Any, Union

from meshctl.proxy.errors import (
    GRPC_CANCELLED,
    GRPC_DEADLINE_EXCEEDED,
    GRPC_RESOURCE_EXHAUSTED,
    GRPC_UNAVAILABLE,
)

try:
    import ngh2

    HAVE_NGH2 = True
except ImportError:  # the h2 fallback serves (slower)
    HAVE_NGH2 = False

__all__ = [
    "CONNECTION_SPECIFIC",
    "GRPC_RETRIABLE",
    "CODEC",
    "CODECS",
    "ConnectionEnded",
    "Data",
    "ErrorCodes",
    "H2Endpoint",
    "H2ProtocolError",
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


# -- the sans-IO endpoint, over one of two codecs ------------------------------------------


class H2ProtocolError(Exception):
    """The peer broke HTTP/2 on the connection; a GOAWAY is waiting in data_to_send()."""


class ErrorCodes:
    """RFC 9113 section 7 error codes for RST_STREAM and GOAWAY (the ones the proxy sends)."""

    NO_ERROR = 0x0
    PROTOCOL_ERROR = 0x1
    REFUSED_STREAM = 0x7
    CANCEL = 0x8


class _H2LibEndpoint:
    """The fallback codec: the pure-Python `h2` library (about 30x slower than ngh2 per request)."""

    __slots__ = ("conn", "client_side")
    codec = "h2"
    waiting: frozenset[int] = frozenset()  # h2 never holds a stream back (see _NgEndpoint.streams_opened)

    def __init__(self, client_side: bool, peer_sidecar: bool = False) -> None:
        import h2.config
        import h2.connection
        import h2.settings

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
        return "<H2Endpoint h2 %s>" % ("client" if self.client_side else "server")

    def data_to_send(self) -> bytes:
        return self.conn.data_to_send()

    def receive(self, data: bytes) -> list[Event]:
        """Events for `data`; raises H2ProtocolError (GOAWAY is then in data_to_send)."""
        import h2.events
        import h2.exceptions

        try:
            received = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            raise H2ProtocolError(str(exc) or type(exc).__name__) from None
        out: list[Event] = []
        for event in received:
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
                out.append(StreamReset(event.stream_id, int(event.error_code or 0)))
            elif isinstance(event, h2.events.WindowUpdated):
                out.append(WindowOpened(event.stream_id))
            elif isinstance(event, h2.events.RemoteSettingsChanged):
                out.append(WindowOpened(0))
            elif isinstance(event, h2.events.ConnectionTerminated):
                out.append(ConnectionEnded(int(event.error_code or 0), event.last_stream_id or 0))
        return out

    def send_request(self, headers: HeaderList, end_stream: bool = False) -> int:
        """Open a stream with request `headers`; returns its id."""
        stream_id = self.conn.get_next_available_stream_id()
        self.conn.send_headers(stream_id, headers, end_stream=end_stream)
        return stream_id

    def send_response(self, stream_id: int, headers: HeaderList, end_stream: bool = False) -> None:
        import h2.exceptions

        try:
            self.conn.send_headers(stream_id, headers, end_stream=end_stream)
        except h2.exceptions.StreamClosedError:
            pass  # the peer gave up on the stream meanwhile

    def send_trailers(self, stream_id: int, headers: HeaderList) -> None:
        self.send_response(stream_id, headers, end_stream=True)

    def send_data(self, stream_id: int, data: bytes) -> int:
        """Send as much of `data` as both windows allow now; returns how many bytes went."""
        import h2.exceptions

        conn = self.conn
        try:
            room = min(conn.local_flow_control_window(stream_id), len(data))
        except h2.exceptions.StreamClosedError:
            return 0
        sent = 0
        frame = conn.max_outbound_frame_size
        while sent < room:
            size = min(frame, room - sent)
            conn.send_data(stream_id, data[sent : sent + size])
            sent += size
        return sent

    def end_stream(self, stream_id: int) -> None:
        import h2.exceptions

        try:
            self.conn.end_stream(stream_id)
        except h2.exceptions.StreamClosedError:
            pass

    def acknowledge(self, stream_id: int, flow_length: int) -> None:
        """The consumer has taken `flow_length` bytes of `stream_id`: reopen the windows."""
        if flow_length:
            self.conn.acknowledge_received_data(flow_length, stream_id)

    def reset(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        import h2.exceptions

        try:
            self.conn.reset_stream(stream_id, error_code)
        except h2.exceptions.StreamClosedError:
            pass

    def close(self, error_code: int = ErrorCodes.NO_ERROR) -> None:
        self.conn.close_connection(error_code)


class _NgEndpoint:
    """The fast codec: libnghttp2 through ngh2 (sans-IO; its wheels bundle the C library).

    Differences from h2 that this class absorbs: ngh2 allocates request stream ids, queues
    any amount of data (so `send_data` offers only what both windows hold, minus what is
    queued, to keep backpressure), reports no StreamEnded (an end_stream flag rides on the
    other events), and knows a submitted stream only once it has been serialised, which
    `_open_submitted` forces. Window updates are manual, as in h2, for the same backpressure.
    """

    __slots__ = ("conn", "client_side", "early", "goaway", "waiting")
    codec = "ngh2"

    def __init__(self, client_side: bool, peer_sidecar: bool = False) -> None:
        # ngh2 (nghttp2) validates inbound header blocks itself at a cost too small to skip.
        self.client_side = client_side
        self.early = b""  # frames serialised ahead of data_to_send (see _open_submitted)
        self.goaway = False  # the peer said GOAWAY: the session winding down is no error
        # Streams ngh2 holds back (the peer's MAX_CONCURRENT_STREAMS is reached) whose body
        # waits: see streams_opened().
        self.waiting: set[int] = set()
        self.conn = conn = ngh2.Connection(
            ngh2.Role.CLIENT if client_side else ngh2.Role.SERVER, ngh2.Configuration(auto_window_update=False))
        settings = {ngh2.Setting.INITIAL_WINDOW_SIZE: STREAM_WINDOW, ngh2.Setting.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS}
        if client_side:
            settings[ngh2.Setting.ENABLE_PUSH] = 0
        conn.initiate_connection(settings)
        conn.set_local_window_size(CONNECTION_WINDOW)

    def __repr__(self) -> str:
        return "<H2Endpoint ngh2 %s>" % ("client" if self.client_side else "server")

    def data_to_send(self) -> bytes:
        if self.early:
            early, self.early = self.early, b""
            return early + self.conn.data_to_send()
        return self.conn.data_to_send()

    def receive(self, data: bytes) -> list[Event]:
        """Events for `data`; raises H2ProtocolError (GOAWAY is then in data_to_send)."""
        conn = self.conn
        try:
            conn.receive_data(data)
        except ngh2.ProtocolError as exc:
            raise H2ProtocolError(str(exc)) from None
        out: list[Event] = []
        append = out.append
        reset: set[int] = set()
        # Dispatched on the exact type (`kind is`), cheaper than isinstance but not narrowed by mypy.
        event: Any
        for event in conn.events():
            kind = type(event)
            if kind is _NG_DATA:
                append(Data(event.stream_id, event.data, len(event.data)))
                if event.end_stream:
                    append(StreamEnded(event.stream_id))
            elif kind is _NG_REQUEST or kind is _NG_RESPONSE:
                append(Headers(event.stream_id, list(event.headers), event.end_stream))
                if event.end_stream:
                    append(StreamEnded(event.stream_id))
            elif kind is _NG_TRAILERS:
                append(Trailers(event.stream_id, list(event.headers)))
                append(StreamEnded(event.stream_id))
            elif kind is _NG_WINDOW:
                append(WindowOpened(event.stream_id))
            elif kind is _NG_RESET:
                reset.add(event.stream_id)
                append(StreamReset(event.stream_id, event.error_code))
            elif kind is _NG_CLOSED:
                # nghttp2 refuses a malformed stream itself: the proxy must hear of it as a reset.
                if event.error_code and event.stream_id not in reset:
                    append(StreamReset(event.stream_id, event.error_code))
            elif kind is _NG_SETTINGS:
                append(WindowOpened(0))
            elif kind is _NG_GOAWAY:
                self.goaway = True
                append(ConnectionEnded(event.error_code, event.last_stream_id))
        if not conn.want_read and not self.goaway:
            raise H2ProtocolError("the HTTP/2 session ended on a protocol error")
        return out

    def send_request(self, headers: HeaderList, end_stream: bool = False) -> int:
        """Open a stream with request `headers`; returns its id."""
        return self.conn.send_request(headers, end_stream=end_stream)

    def send_response(self, stream_id: int, headers: HeaderList, end_stream: bool = False) -> None:
        try:
            self.conn.send_response(stream_id, headers, end_stream=end_stream)
        except ngh2.NGH2Error:
            pass  # the peer gave up on the stream meanwhile

    def send_trailers(self, stream_id: int, headers: HeaderList) -> None:
        try:
            self.conn.send_trailers(stream_id, headers)
        except ngh2.NGH2Error:
            pass

    def _room(self, stream_id: int) -> int:
        conn = self.conn
        return min(conn.stream_remote_window_size(stream_id) - conn.queued_body_size(stream_id),
                   conn.remote_window_size - conn.queued_body_size())

    def _open_submitted(self) -> None:
        """Serialise what is submitted, so that a stream sent this turn exists for window queries."""
        self.early += self.conn.data_to_send()

    def send_data(self, stream_id: int, data: bytes) -> int:
        """Queue as much of `data` as both windows allow now; returns how many bytes went."""
        try:
            room = self._room(stream_id)
        except ngh2.StreamUnavailableError:
            self._open_submitted()
            try:
                room = self._room(stream_id)
            except ngh2.NGH2Error:
                if stream_id < self.conn.next_stream_id:
                    self.waiting.add(stream_id)  # submitted, not yet sent: a concurrency slot at the peer
                return 0
        if room <= 0:
            return 0
        if room < len(data):
            data = data[:room]
        try:
            self.conn.send_data(stream_id, data)
        except ngh2.NGH2Error:
            return 0
        return len(data)

    def streams_opened(self) -> bool:
        """Whether a stream held back for a concurrency slot went out since: its body may follow now.

        The driver asks after each write (only while `waiting` is not empty): ngh2 sends a
        held-back stream's head when another stream closes, and says nothing about it.
        """
        opened = False
        for stream_id in list(self.waiting):
            try:
                self.conn.stream_remote_window_size(stream_id)
            except ngh2.StreamUnavailableError:
                continue
            except ngh2.NGH2Error:
                pass  # closed meanwhile: nothing to wait for
            self.waiting.discard(stream_id)
            opened = True
        return opened

    def end_stream(self, stream_id: int) -> None:
        try:
            self.conn.end_stream(stream_id)
        except ngh2.NGH2Error:
            pass

    def acknowledge(self, stream_id: int, flow_length: int) -> None:
        """The consumer has taken `flow_length` bytes of `stream_id`: reopen the windows."""
        if flow_length:
            try:
                self.conn.acknowledge_received_data(flow_length, stream_id)
            except ngh2.NGH2Error:
                pass  # the stream closed meanwhile; nghttp2 keeps the connection window right

    def reset(self, stream_id: int, error_code: int = ErrorCodes.CANCEL) -> None:
        try:
            self.conn.reset_stream(stream_id, error_code)
        except ngh2.NGH2Error:
            pass

    def close(self, error_code: int = ErrorCodes.NO_ERROR) -> None:
        try:
            self.conn.terminate_connection(error_code)
        except ngh2.NGH2Error:
            pass


# The codec, chosen once at import: ngh2 where it is installed, h2 otherwise;
# MESHCTL_H2_CODEC=h2 (or ngh2) forces one.
CODECS: dict[str, type] = {"h2": _H2LibEndpoint}
if HAVE_NGH2:
    CODECS["ngh2"] = _NgEndpoint
    _NG_DATA, _NG_REQUEST, _NG_RESPONSE, _NG_TRAILERS = ngh2.DataReceived, ngh2.RequestReceived, ngh2.ResponseReceived, ngh2.TrailersReceived
    _NG_WINDOW, _NG_RESET, _NG_CLOSED, _NG_SETTINGS, _NG_GOAWAY = (
        ngh2.WindowUpdated, ngh2.StreamReset, ngh2.StreamClosed, ngh2.SettingsReceived, ngh2.GoAwayReceived)


def _choose_codec(wanted: str) -> str:
    if not wanted:
        return "ngh2" if "ngh2" in CODECS else "h2"
    if wanted not in ("h2", "ngh2"):
        raise RuntimeError("MESHCTL_H2_CODEC=%r: expected h2 or ngh2 (or unset for the fastest installed)" % wanted)
    if wanted not in CODECS:
        raise RuntimeError("MESHCTL_H2_CODEC=ngh2 but ngh2 is not installed: pip install ngh2, or unset MESHCTL_H2_CODEC")
    return wanted


CODEC = _choose_codec(os.environ.get("MESHCTL_H2_CODEC", ""))
H2Endpoint = CODECS[CODEC]
