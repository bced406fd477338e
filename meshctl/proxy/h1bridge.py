"""One HTTP/2 stream carried as one HTTP/1.1 exchange, sans-IO: the h2-to-h1 bridge.

An HTTP/2 client (curl --http2-prior-knowledge, a browser that chose h2 by ALPN) may call
a service whose app speaks HTTP/1.1 only (`protocol: http`). The sidecar in front of that
app (proxy.dispatch.inbound_h2) then sends each stream to the app as an HTTP/1.1 request
on a connection of its own. `H1Endpoint` has the client-side surface of
proxy.h2conn.H2Endpoint, so proxy.h2proxy drives it like any upstream endpoint: the
request's header list becomes a request head (the body chunked unless content-length is
known; request trailers have no HTTP/1.1 equivalent an app would read and are dropped),
and the response head, body and end come back as `Headers`, `Data` and `StreamEnded`
events of the one stream. `finished` says when the connection has nothing more to carry
(the response ended, the stream was reset, or the exchange failed): the driver closes it.
"""

from __future__ import annotations

from collections.abc import Callable

from meshctl.proxy import http1
from meshctl.proxy.errors import MeshError
from meshctl.proxy.h2conn import STREAM_WINDOW, Data, Event, H2ProtocolError, HeaderList, Headers, StreamEnded

__all__ = ["H1Endpoint", "STREAM_ID"]

STREAM_ID = 1  # the one stream of the bridge's connection
# Fields of an HTTP/1.1 response that describe its connection or framing, never forwarded in HTTP/2.
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te", b"trailer"})
_BODY_METHODS = frozenset({b"POST", b"PUT", b"PATCH"})


class H1Endpoint:
    """The client side of one HTTP/1.1 exchange that stands for HTTP/2 stream STREAM_ID."""

    __slots__ = ("out", "parser", "chunked", "finished", "dechunk", "unacknowledged", "paused", "resume")
    waiting: frozenset[int] = frozenset()  # one stream, never held back (see h2conn's streams_opened)

    def __init__(self, max_header_bytes: int = 65536) -> None:
        self.out: list[bytes] = []
        self.parser = http1.Parser(False, max_header_bytes)
        self.chunked = False
        self.finished = False
        self.dechunk: _Dechunk | None = None  # a chunked response: its body without the framing
        # Response bytes handed out but not yet passed on downstream: over one stream window,
        # the driver stops reading the app (`over_window`) until `acknowledge` calls `resume`.
        self.unacknowledged = 0
        self.paused = False
        self.resume: Callable[[], None] | None = None

    def __repr__(self) -> str:
        return "<H1Endpoint%s>" % (" finished" if self.finished else "")

    def data_to_send(self) -> bytes:
        out, self.out = self.out, []
        return b"".join(out)

    def send_request(self, headers: HeaderList, end_stream: bool = False) -> int:
        method, path, authority = b"GET", b"/", b""
        fields: list[bytes] = []
        has_length = False
        for name, value in headers:
            if name[:1] == b":":
                if name == b":method":
                    method = value
                elif name == b":path":
                    path = value
                elif name == b":authority":
                    authority = value
            elif name != b"te" and name != b"host":
                has_length = has_length or name == b"content-length"
                fields.append(b"%s: %s\r\n" % (name, value))
        if authority:
            fields.insert(0, b"host: %s\r\n" % authority)
        if not end_stream and not has_length:
            fields.append(b"transfer-encoding: chunked\r\n")
            self.chunked = True
        elif end_stream and not has_length and method in _BODY_METHODS:
            fields.append(b"content-length: 0\r\n")
        if method == b"HEAD":
            self.parser.expect_no_body()
        self.out.append(b"%s %s HTTP/1.1\r\n%s\r\n" % (method, path, b"".join(fields)))
        return STREAM_ID

    def send_data(self, stream_id: int, data: bytes) -> int:
        if self.finished:
            return 0
        if self.chunked:
            self.out.append(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self.out.append(data)
        return len(data)  # the socket's own buffer and the app's reading pace hold the rest

    def end_stream(self, stream_id: int) -> None:
        if self.chunked and not self.finished:
            self.out.append(b"0\r\n\r\n")

    def send_trailers(self, stream_id: int, headers: HeaderList) -> None:
        self.end_stream(stream_id)

    def acknowledge(self, stream_id: int, flow_length: int) -> None:
        """`flow_length` response bytes went on downstream; reading the app resumes below one window."""
        self.unacknowledged -= flow_length
        if self.paused and self.unacknowledged <= STREAM_WINDOW:
            self.paused = False
            if self.resume is not None:
                self.resume()

    @property
    def over_window(self) -> bool:
        return self.unacknowledged > STREAM_WINDOW

    def reset(self, stream_id: int, error_code: int = 0) -> None:
        self.finished = True

    def close(self, error_code: int = 0) -> None:
        self.finished = True

    def receive(self, data: bytes) -> list[Event]:
        self.parser.feed(data)
        return self._events()

    def receive_eof(self) -> list[Event]:
        self.parser.feed_eof()
        return self._events()

    def _events(self) -> list[Event]:
        """The response so far as stream events; raises H2ProtocolError on a malformed response."""
        out: list[Event] = []
        parser = self.parser
        try:
            while not self.finished:
                event = parser.next_event()
                if isinstance(event, http1.Head):
                    if 100 <= event.status < 200:  # 100-continue and friends: the final head follows
                        parser.next_event()  # the interim message's END
                        parser.start_next_cycle()
                        continue
                    headers = [(b":status", b"%d" % event.status)]
                    headers.extend((name, value) for name, value in event.headers if name not in _HOP_BY_HOP)
                    out.append(Headers(STREAM_ID, headers, False))
                    if event.chunked:
                        self.dechunk = _Dechunk()
                elif isinstance(event, http1.Data):
                    data = event.data if self.dechunk is None else self.dechunk.feed(event.data)
                    if data:
                        self.unacknowledged += len(data)
                        out.append(Data(STREAM_ID, data, len(data)))
                elif event is http1.END:
                    out.append(StreamEnded(STREAM_ID))
                    self.finished = True
                else:
                    break  # NEED_DATA, or CLOSED before a response: the driver's connection_lost resets
        except MeshError as exc:
            self.finished = True
            raise H2ProtocolError("HTTP/1.1 response: %s" % exc.detail) from None
        return out


class _Dechunk:
    """The payload of a chunked body whose framing proxy.http1 has already validated.

    http1's Data events carry the raw wire bytes, split anywhere; HTTP/2 has its own
    framing, so the chunk sizes, CRLFs and trailer lines are taken out here.
    """

    __slots__ = ("pending", "remaining", "state")

    _SIZE, _DATA, _CRLF, _TRAILER, _DONE = range(5)

    def __init__(self) -> None:
        self.pending = b""
        self.remaining = 0
        self.state = self._SIZE

    def feed(self, raw: bytes) -> bytes:
        buf = self.pending + raw if self.pending else raw
        out: list[bytes] = []
        pos, size, state = 0, len(buf), self.state
        while pos < size and state != self._DONE:
            if state == self._DATA:
                take = min(self.remaining, size - pos)
                out.append(buf[pos : pos + take])
                pos += take
                self.remaining -= take
                if not self.remaining:
                    state = self._CRLF
            elif state == self._CRLF:
                if size - pos < 2:
                    break
                pos += 2
                state = self._SIZE
            else:  # a size line, or a trailer line (dropped; an empty one ends the body)
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    break
                if state == self._SIZE:
                    self.remaining = int(buf[pos:eol].split(b";", 1)[0].strip(), 16)
                    state = self._DATA if self.remaining else self._TRAILER
                elif eol == pos:
                    state = self._DONE
                pos = eol + 2
        self.state = state
        self.pending = buf[pos:]
        return b"".join(out)
