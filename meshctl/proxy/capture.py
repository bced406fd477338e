"""Whole HTTP/1 messages kept from raw bytes: what shadow comparison and `record` look at.

The engine forwards raw wire bytes (chunk framing included, proxy.http1); a `Capture`
keeps the first MAX_CAPTURE_BYTES of them beside the forwarding, and `parse_message`
turns them, later and off the request path, into the final head and the decoded body.
"""

from __future__ import annotations

from meshctl.proxy.compare import Response
from meshctl.proxy.errors import ProtocolError
from meshctl.proxy.http1 import END, Data, Head, Parser
from meshctl.proxy.retry import MAX_REPLAY_BODY_BYTES

MAX_CAPTURE_BYTES = MAX_REPLAY_BODY_BYTES + 16 * 1024  # the body limit plus room for the head


class Capture:
    """The first MAX_CAPTURE_BYTES of one answer's raw bytes; `whole` until it overflows."""

    __slots__ = ("chunks", "size", "whole")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.size = 0
        self.whole = True

    def add(self, data: bytes) -> None:
        if self.whole:
            self.size += len(data)
            if self.size <= MAX_CAPTURE_BYTES:
                self.chunks.append(data)
            else:
                self.whole = False
                self.chunks = []

    def response(self, no_body: bool) -> Response | None:
        """The final answer, or None when the bytes hold no complete one."""
        if not self.whole:
            return None
        parsed = parse_message(b"".join(self.chunks), is_request=False, no_body=no_body)
        return None if parsed is None else Response(parsed[0].status, text_headers(parsed[0]), parsed[1])


def parse_message(raw: bytes, is_request: bool, no_body: bool = False) -> tuple[Head, bytes] | None:
    """The (final) head and the decoded body of one whole message, or None."""
    parser = Parser(is_request)
    parser.feed(raw)
    parser.feed_eof()
    head: Head | None = None
    body: list[bytes] = []
    try:
        while True:
            if no_body:
                parser.expect_no_body()
            event = parser.next_event()
            if type(event) is Head:
                head, body = event, []
            elif type(event) is Data:
                body.append(event.data)
            elif event is END:
                if head is not None and not is_request and head.status < 200:
                    parser.start_next_cycle()  # an interim answer: the real one follows
                    continue
                break
            else:
                return None
    except ProtocolError:
        return None
    if head is None or (not is_request and head.status < 200):
        return None
    data = b"".join(body)
    return head, dechunk(data) if head.chunked else data


def dechunk(raw: bytes) -> bytes:
    """The payload of a chunked body the parser has validated (trailers dropped)."""
    out: list[bytes] = []
    pos = 0
    while True:
        eol = raw.index(b"\r\n", pos)
        size = int(raw[pos:eol].split(b";", 1)[0], 16)
        if size == 0:
            return b"".join(out)
        out.append(raw[eol + 2 : eol + 2 + size])
        pos = eol + 2 + size + 2


def text_headers(head: Head) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in head.headers]
