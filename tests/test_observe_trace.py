"""Observer.trace: which trace header lines the next hop gets (pure: a parsed head in, lines out)."""

from __future__ import annotations

import asyncio
import re
from types import SimpleNamespace

import pytest

from meshctl.proxy.http1 import Parser
from meshctl.proxy.observe import Observer, rebuild_traced_head
from meshctl.proxy.tracing import Sampler

TRACE = "0af7651916cd43dd8448eb211c80319c"
SPAN = "b7ad6b7169203331"
TRACEPARENT = re.compile(rb"traceparent: 00-([0-9a-f]{32})-([0-9a-f]{16})-(0[01])")


def _head(*lines: str):
    parser = Parser(is_request=True)
    parser.feed(("GET / HTTP/1.1\r\nhost: a\r\n" + "".join(line + "\r\n" for line in lines) + "\r\n").encode())
    return parser.next_event()


@pytest.fixture
def observer():
    loop = asyncio.new_event_loop()
    try:
        state = SimpleNamespace(loop=loop, pool=SimpleNamespace(observer=None), on_exchange_done=None)
        snapshot = SimpleNamespace(instance="web@v1#0", service="web", service_version="v1", tls=None)
        obs = Observer(state, snapshot, lambda message: None)  # type: ignore[arg-type]
        obs.sampler = Sampler(0.0)
        yield obs
    finally:
        loop.close()


@pytest.mark.parametrize(
    ("kind", "lines"),
    [
        ("inbound", []),
        ("inbound", ["traceparent: 00-%s-%s-00" % (TRACE, SPAN)]),
        ("inbound", ["TraceParent: 00-%s-%s-00" % (TRACE.upper(), SPAN.upper())]),
        ("ingress", ["traceparent: 00-%s-%s-02" % (TRACE, SPAN), "b3: %s-%s-0" % (TRACE, SPAN)]),
        ("inbound", ["b3: %s-%s-0" % (TRACE, SPAN)]),
        ("inbound", ["traceparent: garbage"]),
        ("inbound", ["b3: %s-%s-0" % (TRACE, SPAN), "traceparent: 00-%s-%s-00" % (TRACE, SPAN)]),
        ("inbound", ["x-b3-sampled: 0", "x-b3-traceid: %s" % TRACE, "x-b3-spanid: %s" % SPAN]),
        ("ingress", ["traceparent: 00-%s-%s-00  " % (TRACE, SPAN), "traceparent: 00-%s-%s-01" % (TRACE, SPAN)]),
    ],
)
def test_headers_pass_through_untouched(observer, kind, lines):
    assert observer.trace(1, _head(*lines), kind) is None
    assert observer.hops == {}


@pytest.mark.parametrize("rate, flag", [(0.0, b"00"), (1.0, b"01")])
def test_the_ingress_starts_a_trace_in_both_formats(observer, rate, flag):
    observer.sampler = Sampler(rate)
    traceparent, b3 = observer.trace(7, _head(), "ingress")
    trace_id, span_id, sampled = TRACEPARENT.fullmatch(traceparent).groups()
    assert sampled == flag
    assert b3 == b"b3: %s-%s-%s" % (trace_id, span_id, flag[1:])
    assert (7 in observer.hops) is (rate == 1.0)


@pytest.mark.parametrize(
    "lines",
    [
        ["traceparent: 00-%s-%s-01" % (TRACE, SPAN), "x-b3-sampled: 1"],
        ["x-b3-sampled: 1", "traceparent: 00-%s-%s-01" % (TRACE, SPAN)],
        ["traceparent: 00-%s-%s-01" % (TRACE, SPAN), "traceparent: 00-%s-%s-00" % (TRACE, SPAN)],  # the first one counts
    ],
)
def test_a_sampled_traceparent_is_continued_wherever_it_stands(observer, lines):
    lines = observer.trace(3, _head(*lines), "inbound")
    trace_id, _, sampled = TRACEPARENT.fullmatch(lines[0]).groups()
    assert (trace_id.decode(), sampled) == (TRACE, b"01")


def test_a_zero_trace_id_is_not_taken_for_an_unsampled_trace(observer):
    observer.sampler = Sampler(1.0)
    lines = observer.trace(3, _head("traceparent: 00-%s-%s-00" % ("0" * 32, SPAN)), "ingress")
    trace_id, _, sampled = TRACEPARENT.fullmatch(lines[0]).groups()
    assert trace_id != b"0" * 32 and sampled == b"01"  # invalid: the ingress starts a new trace


def test_a_sampled_trace_continues_with_a_new_span(observer):
    lines = observer.trace(3, _head("traceparent: 00-%s-%s-01" % (TRACE, SPAN), "x-b3-sampled: 1"), "inbound")
    trace_id, span_id, sampled = TRACEPARENT.fullmatch(lines[0]).groups()
    assert (trace_id.decode(), sampled) == (TRACE, b"01") and span_id.decode() != SPAN
    assert observer.hops[3].parent_id == SPAN


ADDED = [b"x-request-id: 1", b"traceparent: 00-%s-%s-01" % (TRACE.encode(), SPAN.encode())]


@pytest.mark.parametrize(
    ("raw", "start_line", "expected"),
    [
        # nothing to drop: the field block goes out as it came
        (b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n\r\n", None, b"GET / HTTP/1.1\r\nHost: a\r\nX-A: 1\r\n"),
        (b"GET / HTTP/1.0\r\n\r\n", None, b"GET / HTTP/1.0\r\n"),
        (b"GET http://a/x HTTP/1.1\r\nHost: a\r\n\r\n", b"GET /x HTTP/1.1", b"GET /x HTTP/1.1\r\nHost: a\r\n"),
        # incoming trace headers, in any case, make way for the new ones
        (b"GET / HTTP/1.1\r\nB3: 0\r\nHost: a\r\nx-b3-sampled: 1\r\n\r\n", None, b"GET / HTTP/1.1\r\nHost: a\r\n"),
        # hop-by-hop headers, and what Connection names, are dropped
        (b"GET / HTTP/1.1\r\nHost: a\r\nConnection: x-a\r\nX-A: 1\r\nX-B: 2\r\n\r\n", None, b"GET / HTTP/1.1\r\nHost: a\r\nX-B: 2\r\n"),
    ],
)
def test_rebuild_traced_head(raw, start_line, expected):
    parser = Parser(is_request=True)
    parser.feed(raw)
    head = parser.next_event()
    assert rebuild_traced_head(head, ADDED, start_line) == expected + b"\r\n".join(ADDED) + b"\r\n\r\n"
