"""Protocol detection on the first bytes of a connection, sans-IO.

`classify(prefix)` looks at what a client has sent so far and answers one of

* `HTTP1`: a request line starts with a method token and a space (`GET `, `PATCH `);
* `HTTP2`: the HTTP/2 client connection preface, `PRI * HTTP/2.0\\r\\n\\r\\nSM\\r\\n\\r\\n` (h2c
  with prior knowledge, RFC 9113 3.4);
* `TLS`: a TLS handshake record (content type 0x16, major version 3): the caller starts
  TLS and then reads ALPN, which says http/1.1 or h2;
* `OPAQUE`: anything else (a database protocol, a custom binary protocol): relayed as TCP;
* `NEED_MORE`: the prefix is still compatible with more than one answer.

The decision is bounded: it never needs more than DECIDE_WITHIN bytes. A client that
sends nothing at all may be waiting for the server to speak first (MySQL, SMTP,
PostgreSQL's SSL probe aside), so the caller gives up waiting after DETECT_TIMEOUT_S and
calls `on_timeout()` with whatever arrived: a silent connection is opaque, never stuck.

The driver side is tiny and lives in the caller: peek (MSG_PEEK) or buffer, call
`classify`, and hand the bytes over unconsumed to whatever serves the protocol.
"""

from __future__ import annotations

import enum

__all__ = [
    "DECIDE_WITHIN",
    "DETECT_TIMEOUT_S",
    "H2_PREFACE",
    "Kind",
    "classify",
    "on_timeout",
]

H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Longest method we accept as HTTP/1 before the space; anything longer is opaque. 20
# covers every registered method (the longest, UPDATEREDIRECTREF, has 17 letters).
MAX_METHOD_LENGTH = 20
DECIDE_WITHIN = max(len(H2_PREFACE), MAX_METHOD_LENGTH + 1)  # 24 bytes
# Short enough that a server-speaks-first protocol does not notice; long enough for a
# client on the same host to get its first segment out.
DETECT_TIMEOUT_S = 0.3

_TLS_RECORD_HANDSHAKE = 0x16
_TLS_MAJOR_VERSION = 0x03
_TOKEN_BYTES = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


class Kind(enum.Enum):
    NEED_MORE = "need-more"
    HTTP1 = "http1"
    HTTP2 = "http2"
    TLS = "tls"
    OPAQUE = "opaque"


def _classify_tls(prefix: bytes) -> Kind | None:
    if prefix[0] != _TLS_RECORD_HANDSHAKE:
        return None
    if len(prefix) < 2:
        return Kind.NEED_MORE
    return Kind.TLS if prefix[1] == _TLS_MAJOR_VERSION else Kind.OPAQUE


def _classify_http(prefix: bytes) -> Kind:
    """HTTP/2 preface, HTTP/1 request line, or opaque; `prefix` is non-empty and not TLS."""
    window = prefix[: len(H2_PREFACE)]
    if H2_PREFACE.startswith(window):
        # "PRI " is also a syntactically valid HTTP/1 method; only the whole preface decides.
        return Kind.HTTP2 if len(window) == len(H2_PREFACE) else Kind.NEED_MORE
    for index, byte in enumerate(prefix[: MAX_METHOD_LENGTH + 1]):
        if byte == 0x20:  # a space ends the method
            return Kind.HTTP1 if index > 0 else Kind.OPAQUE
        if byte not in _TOKEN_BYTES:
            return Kind.OPAQUE
    return Kind.NEED_MORE if len(prefix) <= MAX_METHOD_LENGTH else Kind.OPAQUE


def classify(prefix: bytes) -> Kind:
    """What the connection that started with `prefix` speaks, or NEED_MORE.

    Never NEED_MORE once `len(prefix) >= DECIDE_WITHIN`.
    """
    if not prefix:
        return Kind.NEED_MORE
    tls = _classify_tls(prefix)
    if tls is not None:
        return tls
    return _classify_http(prefix)


def on_timeout(prefix: bytes) -> Kind:
    """The decision once DETECT_TIMEOUT_S has passed with only `prefix` received.

    A silent client, or one that stopped in the middle of something that looked like
    HTTP, is relayed as opaque TCP: the bytes go through unchanged either way.
    """
    kind = classify(prefix)
    return Kind.OPAQUE if kind is Kind.NEED_MORE else kind
