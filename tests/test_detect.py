"""proxy.detect: the protocol of a connection from its first bytes (pure, table tests)."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshctl.proxy.detect import DECIDE_WITHIN, DETECT_TIMEOUT_S, H2_PREFACE, Kind, classify, on_timeout

CLIENT_HELLO_START = bytes([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC, 0x03, 0x03])


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        (b"", Kind.NEED_MORE),
        (b"G", Kind.NEED_MORE),
        (b"GET", Kind.NEED_MORE),
        (b"GET ", Kind.HTTP1),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Kind.HTTP1),
        (b"POST /items HTTP/1.1\r\n", Kind.HTTP1),
        (b"OPTIONS * HTTP/1.1\r\n", Kind.HTTP1),
        (b"CONNECT db:5432 HTTP/1.1\r\n", Kind.HTTP1),
        (b"UPDATEREDIRECTREF / HTTP/1.1", Kind.HTTP1),
        (b"M-SEARCH * HTTP/1.1", Kind.HTTP1),
        (b"P", Kind.NEED_MORE),
        (b"PRI", Kind.NEED_MORE),
        (b"PRI ", Kind.NEED_MORE),  # a valid method too: only the full preface decides
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r", Kind.NEED_MORE),
        (H2_PREFACE, Kind.HTTP2),
        (H2_PREFACE + b"\x00\x00\x12\x04\x00", Kind.HTTP2),
        (b"PRI * HTTP/1.1\r\n", Kind.HTTP1),  # diverges from the preface, looks like HTTP/1
        (b"PRIX / HTTP/1.1", Kind.HTTP1),
        (b"\x16", Kind.NEED_MORE),
        (b"\x16\x03", Kind.TLS),
        (CLIENT_HELLO_START, Kind.TLS),
        (b"\x16\x01", Kind.OPAQUE),
        (b" GET /", Kind.OPAQUE),  # no method before the space
        (b"GET\r\n", Kind.OPAQUE),
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", Kind.OPAQUE),  # PostgreSQL SSLRequest
        (b"*1\r\n$4\r\nPING\r\n", Kind.OPAQUE),  # Redis RESP
        (b"get", Kind.NEED_MORE),  # lower-case is still a token; servers reject it later
        (b"A" * 20, Kind.NEED_MORE),
        (b"A" * 21, Kind.OPAQUE),  # no method is that long
        (b"A" * 20 + b" /", Kind.HTTP1),
    ],
)
def test_classify_table(prefix, expected):
    assert classify(prefix) is expected


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [
        (b"", Kind.OPAQUE),  # silent client: server speaks first (MySQL, SMTP)
        (b"GE", Kind.OPAQUE),
        (b"PRI * HTTP/2.0\r\n", Kind.OPAQUE),
        (b"\x16", Kind.OPAQUE),
        (b"GET ", Kind.HTTP1),
        (H2_PREFACE, Kind.HTTP2),
        (b"\x16\x03", Kind.TLS),
    ],
)
def test_on_timeout_never_waits(prefix, expected):
    assert on_timeout(prefix) is expected


def test_bounds():
    assert DECIDE_WITHIN == 24
    assert 0.1 <= DETECT_TIMEOUT_S <= 1.0


@given(st.binary(min_size=DECIDE_WITHIN, max_size=64))
def test_always_decides_within_bound(data):
    assert classify(data) is not Kind.NEED_MORE
    assert classify(data) is classify(data[:DECIDE_WITHIN])


@given(st.binary(max_size=64))
def test_decision_is_stable_as_bytes_arrive(data):
    """Once a prefix is decided, every longer prefix gets the same answer."""
    decided = None
    for end in range(len(data) + 1):
        kind = classify(data[:end])
        if decided is not None:
            assert kind is decided
        elif kind is not Kind.NEED_MORE:
            decided = kind
