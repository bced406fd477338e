"""HTTP/1.1 message framing, sans-IO: bytes in, events out.

`Parser` is fed raw bytes with `feed()` and hands out events with `next_event()`:

* a `Head` (request or response line, headers, the raw head bytes),
* `Data` events whose bytes are the *raw wire bytes* of the body, chunk framing
  included: the proxy forwards them unchanged, nothing is decoded or re-encoded,
* `END` when the message is complete, then `PAUSED` until `start_next_cycle()`, so
  pipelined bytes wait in the buffer until the previous exchange is done,
* `NEED_DATA` when more bytes are needed, `CLOSED` after a clean EOF between messages.

`next_event_whole()` is `next_event()` with a shortcut for the common case: a head whose
whole message is already buffered (no body, or a Content-Length body that arrived with
it) comes with its body in `Head.body`, and no `Data` or `END` follows it: the parser is
at `PAUSED` already. Otherwise `Head.body` is None and the events follow as usual.

Validation is strict in the way h11 is, because a proxy that is lenient where its
upstream is strict (or the other way round) is how request smuggling happens: header
names must be tokens, no whitespace before the colon, no obs-fold, no bare LF, a single
well-formed Content-Length, never both Content-Length and Transfer-Encoding, chunked
as the final transfer coding, strict chunk-size lines. Every rejection is a
`ProtocolError` carrying the status and stable code it should become.

`rebuild_head()` serialises a head with headers dropped and added; the caller only uses
it when something changes, otherwise `Head.raw` is forwarded as it came.
"""

from __future__ import annotations

import re

from meshctl.proxy.errors import ProtocolError

__all__ = [
    "CLOSED",
    "END",
    "HOP_BY_HOP",
    "NEED_DATA",
    "PAUSED",
    "Data",
    "Head",
    "Parser",
    "rebuild_head",
]


class _Sentinel:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


NEED_DATA = _Sentinel("NEED_DATA")
PAUSED = _Sentinel("PAUSED")
CLOSED = _Sentinel("CLOSED")
END = _Sentinel("END")

# Headers that describe one connection, not the message (RFC 9110 7.6.1). Transfer-Encoding
# is hop-by-hop too, but the proxy passes chunked framing through, so it stays.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer", b"upgrade"})
_NEVER_DROPPED = frozenset({b"content-length", b"transfer-encoding", b"host"})

_TOKEN = rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_REQUEST_LINE = re.compile(rb"(" + _TOKEN + rb") ([\x21-\x7e]+) HTTP/(1\.[01])")
_STATUS_LINE = re.compile(rb"HTTP/(1\.[01]) ([0-9]{3})(?: ([\t \x21-\x7e\x80-\xff]*))?")
_FIELD_VALUE = rb"[^\x00-\x08\x0a-\x1f\x7f]*"
_HEADER_LINE = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _FIELD_VALUE + rb")")
_HEADER_FIELD = re.compile(rb"(" + _TOKEN + rb"):[ \t]*(" + _FIELD_VALUE + rb")(?:\r\n|$)")
_HEADER_BLOCK = re.compile(_TOKEN + rb":" + _FIELD_VALUE + rb"(?:\r\n" + _TOKEN + rb":" + _FIELD_VALUE + rb")*")
_MAX_CHUNK_SIZE = 2**63 - 1
_CHUNK_SIZE_LINE = re.compile(rb"([0-9A-Fa-f]{1,16})(?:;[^\x00-\x08\x0a-\x1f\x7f]*)?")
_MAX_CHUNK_LINE = 4096

DEBUG_FIELD = b"x-mesh-debug"  # `x-mesh-debug: 1` asks every sidecar for a decision record (`meshctl why`)
_FRAMING_HEADERS = frozenset(
    {b"content-length", b"transfer-encoding", b"connection", DEBUG_FIELD} | HOP_BY_HOP
)
# The framing and hop-by-hop field lines of a validated block behind a "\n", names in any
# case. Searched in b"\n" + fields: a leading literal lets the regex engine skip from one
# line feed to the next (a validated block has them only between lines), where `^` with
# re.MULTILINE would try the names at every byte, at twice the cost.
_FRAMING_FIELD = re.compile(
    rb"\n(" + b"|".join(sorted(_FRAMING_HEADERS, key=len, reverse=True)) + rb"):[ \t]*(" + _FIELD_VALUE + rb")",  # type: ignore[arg-type]  # typeshed: bytes are Sized
    re.IGNORECASE,
)
# Head.has(name): a field line named `name` behind a "\n" (see _FRAMING_FIELD), per name.
_FIELD_NAMED: dict[bytes, re.Pattern[bytes]] = {}
_NO_TOKENS: frozenset[bytes] = frozenset()
_KEEP_ALIVE_ONLY = frozenset({b"keep-alive"})

# Parser states.
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_CRLF, _TRAILER, _UNTIL_CLOSE, _END, _DONE = range(9)


class Head:
    """A request or response head. Header names are lower-cased, values as received.

    `headers` and `lines` are split from the validated `fields` bytes on first use: a
    response whose head is forwarded as it came never needs them.
    """

    __slots__ = (
        "method",
        "target",
        "version",
        "status",
        "reason",
        "start_line",
        "fields",
        "_headers",
        "_lines",
        "raw",
        "content_length",
        "chunked",
        "keep_alive",
        "connection_tokens",
        "has_hop_by_hop",
        "only_keep_alive",
        "body",
        "debug",
    )
    _COMPARED = ("method", "target", "version", "status", "reason", "start_line", "headers", "lines", "raw",
                 "content_length", "chunked", "keep_alive", "connection_tokens", "has_hop_by_hop", "only_keep_alive", "debug")

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.version = b"1.1"
        self.status = 0
        self.reason = b""
        self.start_line = b""
        self.fields = b""  # the header lines as received, CRLF-separated, without the last CRLF
        self._headers: list[tuple[bytes, bytes]] | None = None
        self._lines: list[bytes] | None = None
        self.raw = b""
        self.content_length: int | None = None
        self.chunked = False
        self.keep_alive = True
        self.connection_tokens: frozenset[bytes] = _NO_TOKENS
        self.has_hop_by_hop = False
        # The only hop-by-hop header is an HTTP/1.1 `connection: keep-alive`: a no-op that a
        # kept-alive HTTP/1.1 peer may receive as it is, so the head need not be rebuilt.
        self.only_keep_alive = False
        # The whole body, when next_event_whole() returned the message in one step.
        self.body: bytes | None = None
        self.debug = False  # carries x-mesh-debug: 1 (found with the framing fields, at no extra pass)

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        headers = self._headers
        if headers is None:
            fields = self.fields
            headers = self._headers = [(n.lower(), v.rstrip(b" \t")) for n, v in _HEADER_FIELD.findall(fields)] if fields else []
        return headers

    @headers.setter
    def headers(self, value: list[tuple[bytes, bytes]]) -> None:
        self._headers = value

    @property
    def lines(self) -> list[bytes]:
        """The raw header lines, aligned with `headers`."""
        lines = self._lines
        if lines is None:
            lines = self._lines = self.fields.split(b"\r\n") if self.fields else []
        return lines

    @lines.setter
    def lines(self, value: list[bytes]) -> None:
        self._lines = value

    def has(self, name: bytes) -> bool:
        """Whether header `name` (lower-case) is present; one regex search, the list is not split."""
        fields = self.fields
        if not fields:
            return False
        pattern = _FIELD_NAMED.get(name)
        if pattern is None:
            pattern = _FIELD_NAMED[name] = re.compile(b"\n" + re.escape(name) + b":", re.IGNORECASE)
        return pattern.search(b"\n" + fields) is not None

    def get(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lower-case), or None."""
        for key, value in self.headers:
            if key == name:
                return value
        return None

    def __repr__(self) -> str:
        if self.status:
            return "<Head %d %r %d headers>" % (self.status, self.reason, len(self.headers))
        return "<Head %r %r %d headers>" % (self.method, self.target, len(self.headers))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Head):
            return NotImplemented
        return all(getattr(self, name) == getattr(other, name) for name in self._COMPARED)

    __hash__ = None  # type: ignore[assignment]


class Data:
    """Raw body bytes as they were on the wire (chunk framing included)."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __repr__(self) -> str:
        return "<Data %d bytes>" % len(self.data)


def _bad(detail: str) -> ProtocolError:
    return ProtocolError("bad-request", detail)


def _parse_head(block: bytes, is_request: bool) -> Head:
    start, _, fields = block.partition(b"\r\n")
    head = Head()
    head.start_line = start
    if is_request:
        match = _REQUEST_LINE.fullmatch(start)
        if match is None:
            raise _bad("malformed request line")
        head.method, head.target, head.version = match.groups()
    else:
        match = _STATUS_LINE.fullmatch(start)
        if match is None:
            raise _bad("malformed status line")
        head.version = match.group(1)
        head.status = int(match.group(2))
        head.reason = match.group(3) or b""
    if not fields:
        if head.version != b"1.1":
            head.keep_alive = False
        _apply_framing(head, [], [], is_request)
        return head
    # One C-level pass validates every line and one more finds the framing headers; the
    # per-line loop in _reject_header_lines only runs to name the error.
    if _HEADER_BLOCK.fullmatch(fields) is None:
        _reject_header_lines(fields)
    head.fields = fields
    lengths: list[bytes] = []
    codings: list[bytes] = []
    connection: list[bytes] = []
    hop_by_hop = 0
    for name, value in _FRAMING_FIELD.findall(b"\n" + fields):
        name = name.lower()
        if name == b"content-length":
            lengths.append(value.rstrip(b" \t"))
        elif name == b"transfer-encoding":
            codings.extend(_tokens(value))
        elif name == DEBUG_FIELD:
            head.debug = value.rstrip(b" \t") == b"1"
        else:
            hop_by_hop += 1
            if name == b"connection":
                connection.extend(_tokens(value))
    if hop_by_hop:
        head.has_hop_by_hop = True
    if connection:
        head.connection_tokens = frozenset(connection)
    if head.version == b"1.1":
        head.keep_alive = b"close" not in head.connection_tokens
        head.only_keep_alive = hop_by_hop == 1 and head.connection_tokens == _KEEP_ALIVE_ONLY
    else:
        head.keep_alive = b"keep-alive" in head.connection_tokens and b"close" not in head.connection_tokens
    _apply_framing(head, lengths, codings, is_request)
    return head


def _tokens(value: bytes) -> list[bytes]:
    """The lower-cased elements of a comma-separated header value."""
    if b"," not in value:
        return [value.strip(b" \t").lower()]
    return [token.strip(b" \t").lower() for token in value.split(b",")]


def _reject_header_lines(fields: bytes) -> None:
    """Raise the error for the first header line that is not a valid field line."""
    for line in fields.split(b"\r\n"):
        if _HEADER_LINE.fullmatch(line) is None:
            if line[:1] in (b" ", b"\t"):
                raise _bad("obsolete line folding in headers")
            raise _bad("malformed header line")
    raise _bad("malformed header line")


def _apply_framing(head: Head, lengths: list[bytes], codings: list[bytes], is_request: bool) -> None:
    if codings:
        if lengths:
            raise _bad("both content-length and transfer-encoding")
        if head.version != b"1.1":
            if is_request:
                raise _bad("transfer-encoding in an HTTP/1.0 request")
            head.keep_alive = False
            return
        if codings[-1] == b"chunked" and codings.count(b"chunked") == 1:
            head.chunked = True
        elif is_request:
            raise _bad("transfer-encoding must end with chunked")
        else:
            head.keep_alive = False  # body runs until the connection closes
        return
    if lengths:
        if len(lengths) > 1:
            raise _bad("more than one content-length")
        length = lengths[0]
        if not (length.isdigit() and len(length) <= 18):  # bytes.isdigit() is ASCII digits only
            raise _bad("invalid content-length")
        head.content_length = int(length)


class Parser:
    """Framing state machine for one direction of one connection (see module docstring)."""

    __slots__ = (
        "is_request",
        "max_header_bytes",
        "max_body_bytes",
        "_buf",
        "_state",
        "_remaining",
        "_body_bytes",
        "_eof",
        "_no_body",
    )

    def __init__(self, is_request: bool, max_header_bytes: int = 65536, max_body_bytes: int | None = None) -> None:
        self.is_request = is_request
        self.max_header_bytes = max_header_bytes
        self.max_body_bytes = max_body_bytes
        self._buf = b""
        self._state = _HEAD
        self._remaining = 0
        self._body_bytes = 0
        self._eof = False
        self._no_body = False

    def __repr__(self) -> str:
        kind = "request" if self.is_request else "response"
        return "<Parser %s state=%d buffered=%d>" % (kind, self._state, len(self._buf))

    @property
    def buffered(self) -> int:
        return len(self._buf)

    @property
    def at_message_start(self) -> bool:
        """True when no byte of the current message has been consumed yet."""
        return self._state == _HEAD

    def has_input(self) -> bool:
        """True when buffered bytes or an EOF wait to be turned into events."""
        return self._eof or bool(self._buf)

    def feed(self, data: bytes) -> None:
        if self._buf:
            self._buf += data
        else:
            self._buf = data

    def feed_eof(self) -> None:
        self._eof = True

    def expect_no_body(self) -> None:
        """The next response answers a HEAD request: it has no body whatever it says."""
        self._no_body = True

    def start_next_cycle(self) -> None:
        if self._state != _DONE:
            raise RuntimeError("start_next_cycle() before the message ended")
        self._state = _HEAD
        self._body_bytes = 0
        self._no_body = False

    def take_buffer(self) -> bytes:
        """Remove and return the unparsed bytes (used when a connection stops being HTTP)."""
        buf, self._buf = self._buf, b""
        return buf

    def next_event_whole(self) -> object:
        """`next_event()`, but a fully buffered message comes as one `Head` (see the module docstring)."""
        if self._state == _HEAD:
            return self._next_head(True)
        return self.next_event()

    def next_event(self) -> object:
        state = self._state
        if state == _LENGTH:
            buf = self._buf
            if not buf:
                return self._need_data()
            remaining = self._remaining
            if len(buf) <= remaining:
                self._buf = b""
                data = buf
            else:
                data = buf[:remaining]
                self._buf = buf[remaining:]
            remaining -= len(data)
            self._remaining = remaining
            if not remaining:
                self._state = _END
            return Data(data)
        if state == _HEAD:
            return self._next_head(False)
        if state == _END:
            self._state = _DONE
            return END
        if state == _DONE:
            return PAUSED
        if state == _UNTIL_CLOSE:
            buf = self._buf
            if buf:
                self._buf = b""
                return Data(buf)
            if self._eof:
                self._state = _DONE
                return END
            return NEED_DATA
        return self._next_chunked()

    def _need_data(self) -> object:
        if self._eof:
            raise _bad("connection closed in the middle of a message")
        return NEED_DATA

    def _next_head(self, whole: bool) -> object:
        buf = self._buf
        if self.is_request and buf.startswith(b"\r\n"):
            buf = self._buf = buf.lstrip(b"\r\n")
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > self.max_header_bytes:
                raise ProtocolError("header-too-large", "request head over %d bytes" % self.max_header_bytes)
            if self._eof:
                if not buf:
                    return CLOSED
                raise _bad("connection closed in the middle of a head")
            return NEED_DATA
        if end + 4 > self.max_header_bytes:
            raise ProtocolError("header-too-large", "request head over %d bytes" % self.max_header_bytes)
        head = _parse_head(buf[:end], self.is_request)
        head.raw = buf[: end + 4]
        self._buf = buf[end + 4 :]
        self._begin_body(head)
        if whole:
            state = self._state
            if state == _END:
                head.body = b""
                self._state = _DONE
            elif state == _LENGTH and len(self._buf) >= self._remaining:
                rest = self._buf
                head.body = rest[: self._remaining]
                self._buf = rest[self._remaining :]
                self._remaining = 0
                self._state = _DONE
        return head

    def _begin_body(self, head: Head) -> None:
        if not self.is_request and (self._no_body or head.status < 200 or head.status in (204, 304)):
            self._state = _END
            return
        if head.chunked:
            self._state = _CHUNK_SIZE
            return
        length = head.content_length
        if length is None:
            if self.is_request:
                self._state = _END
            else:
                self._state = _UNTIL_CLOSE
            return
        if self.max_body_bytes is not None and length > self.max_body_bytes:
            raise ProtocolError("body-too-large", "request body over %d bytes" % self.max_body_bytes)
        if length:
            self._remaining = length
            self._state = _LENGTH
        else:
            self._state = _END

    def _next_chunked(self) -> object:
        buf = self._buf
        size = len(buf)
        pos = 0
        state = self._state
        while pos < size:
            if state == _CHUNK_DATA:
                take = min(size - pos, self._remaining)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    state = _CHUNK_CRLF
            elif state == _CHUNK_SIZE:
                eol = buf.find(b"\r\n", pos, pos + _MAX_CHUNK_LINE)
                if eol < 0:
                    if size - pos >= _MAX_CHUNK_LINE:
                        raise _bad("chunk size line too long")
                    break
                match = _CHUNK_SIZE_LINE.fullmatch(buf, pos, eol)
                if match is None:
                    raise _bad("malformed chunk size line")
                chunk = int(match.group(1), 16)
                if chunk > _MAX_CHUNK_SIZE:
                    # A backend reading it as a signed 64-bit number would see another
                    # size than we do: the stuff request smuggling is made of.
                    raise _bad("chunk size too large")
                pos = eol + 2
                if chunk:
                    self._body_bytes += chunk
                    if self.max_body_bytes is not None and self._body_bytes > self.max_body_bytes:
                        raise ProtocolError("body-too-large", "request body over %d bytes" % self.max_body_bytes)
                    self._remaining = chunk
                    state = _CHUNK_DATA
                else:
                    state = _TRAILER
                    self._remaining = 0  # counts trailer bytes from here on
            elif state == _CHUNK_CRLF:
                if size - pos < 2:
                    if buf[pos] != 13:
                        raise _bad("chunk data not followed by CRLF")
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise _bad("chunk data not followed by CRLF")
                pos += 2
                state = _CHUNK_SIZE
            else:  # _TRAILER
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if self._remaining + size - pos > self.max_header_bytes:
                        raise ProtocolError("header-too-large", "trailers over %d bytes" % self.max_header_bytes)
                    break
                if eol == pos:
                    pos += 2
                    state = _END
                    break
                if _HEADER_LINE.fullmatch(buf, pos, eol) is None:
                    raise _bad("malformed trailer line")
                self._remaining += eol + 2 - pos
                if self._remaining > self.max_header_bytes:
                    raise ProtocolError("header-too-large", "trailers over %d bytes" % self.max_header_bytes)
                pos = eol + 2
        self._state = state
        if not pos:
            if state == _END:
                return self.next_event()
            return self._need_data()
        if pos == size:
            self._buf = b""
            return Data(buf)
        self._buf = buf[pos:]
        return Data(buf[:pos])


def rebuild_head(head: Head, add: list[bytes] = (), start_line: bytes | None = None, drop_hop_by_hop: bool = True) -> bytes:  # type: ignore[assignment]
    """Serialise `head` without its hop-by-hop headers, with raw header lines `add` appended."""
    lines = [head.start_line if start_line is None else start_line]
    if drop_hop_by_hop and head.has_hop_by_hop:
        drop = HOP_BY_HOP | (head.connection_tokens - _NEVER_DROPPED)
        lines.extend(line for (name, _), line in zip(head.headers, head.lines) if name not in drop)
    else:
        lines.extend(head.lines)
    lines.extend(add)
    lines.append(b"\r\n")
    return b"\r\n".join(lines)
