"""proxy.tracing (header formats, sampling, next hop) and agent.traces (store, tree, waterfall, OTLP)."""

from __future__ import annotations

import json

import pytest
from rich.console import Console

from meshctl.agent.traces import SpanRecord, TraceStore, build_tree, otlp_payload, render_waterfall
from meshctl.proxy.tracing import (
    B3_MULTI,
    B3_SINGLE,
    W3C,
    Sampler,
    Span,
    SpanBuffer,
    extract,
    headers_from_mapping,
    next_hop,
    parse_b3_single,
    parse_traceparent,
)

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = "00f067aa0ba902b7"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("00-%s-%s-01" % (TRACE, SPAN), (TRACE, SPAN, True)),
        ("00-%s-%s-00" % (TRACE, SPAN), (TRACE, SPAN, False)),
        ("00-%s-%s-01" % (TRACE.upper(), SPAN), (TRACE, SPAN, True)),
        ("01-%s-%s-01-future" % (TRACE, SPAN), (TRACE, SPAN, True)),
        ("00-%s-%s-01-extra" % (TRACE, SPAN), None),
        ("ff-%s-%s-01" % (TRACE, SPAN), None),
        ("00-%s-%s-01" % ("0" * 32, SPAN), None),
        ("00-%s-%s-01" % (TRACE, "0" * 16), None),
        ("00-%s-%s-01" % (TRACE[:-1], SPAN), None),
        ("00-%s-%s-zz" % (TRACE, SPAN), None),
        ("garbage", None),
        ("", None),
    ],
)
def test_parse_traceparent(value: str, expected) -> None:
    assert parse_traceparent(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("%s-%s-1" % (TRACE, SPAN), (TRACE, SPAN, True)),
        ("%s-%s-0-%s" % (TRACE, SPAN, "1" * 16), (TRACE, SPAN, False)),
        ("%s-%s-d" % (TRACE, SPAN), (TRACE, SPAN, True)),
        ("%s-%s" % (TRACE, SPAN), (TRACE, SPAN, None)),
        ("a3ce929d0e0e4736-%s-1" % SPAN, ("0" * 16 + "a3ce929d0e0e4736", SPAN, True)),
        ("%s-%s-x" % (TRACE, SPAN), None),
        ("0", None),
        ("%s-short" % TRACE, None),
    ],
)
def test_parse_b3_single(value: str, expected) -> None:
    assert parse_b3_single(value) == expected


@pytest.mark.parametrize(
    ("headers", "format", "sampled"),
    [
        ({"traceparent": "00-%s-%s-01" % (TRACE, SPAN), "b3": "%s-%s-0" % ("1" * 32, "2" * 16)}, W3C, True),
        ({"traceparent": "bad", "b3": "%s-%s-0" % (TRACE, SPAN)}, B3_SINGLE, False),
        ({"X-B3-TraceId": TRACE, "X-B3-SpanId": SPAN, "X-B3-Sampled": "1"}, B3_MULTI, True),
        ({"x-b3-traceid": TRACE, "x-b3-spanid": SPAN, "x-b3-flags": "1", "x-b3-sampled": "0"}, B3_MULTI, True),
        ({"x-b3-traceid": TRACE, "x-b3-spanid": SPAN}, B3_MULTI, None),
    ],
)
def test_extract_prefers_w3c_then_b3_single_then_multi(headers: dict, format: str, sampled) -> None:
    incoming = extract(headers_from_mapping(headers))
    assert incoming is not None
    assert (incoming.trace_id, incoming.span_id, incoming.format, incoming.sampled) == (TRACE, SPAN, format, sampled)


@pytest.mark.parametrize("headers", [{}, {"traceparent": "nope"}, {"x-b3-traceid": TRACE}, {"b3": "1"}])
def test_extract_without_usable_context(headers: dict) -> None:
    assert extract(headers_from_mapping(headers)) is None


def test_next_hop_continues_w3c_and_keeps_tracestate() -> None:
    incoming = extract(headers_from_mapping({"traceparent": "00-%s-%s-01" % (TRACE, SPAN), "tracestate": "vendor=x"}))
    hop = next_hop(incoming, Sampler(0.0), span_id="a" * 16)
    assert (hop.trace_id, hop.span_id, hop.parent_id, hop.sampled) == (TRACE, "a" * 16, SPAN, True)
    assert hop.headers() == [(b"traceparent", b"00-%s-%s-01" % (TRACE.encode(), b"a" * 16)), (b"tracestate", b"vendor=x")]


def test_next_hop_answers_b3_multi_in_kind() -> None:
    incoming = extract(headers_from_mapping({"x-b3-traceid": TRACE, "x-b3-spanid": SPAN, "x-b3-sampled": "0"}))
    headers = dict(next_hop(incoming, Sampler(1.0), span_id="b" * 16).headers())
    assert headers[b"x-b3-parentspanid"] == SPAN.encode() and headers[b"x-b3-sampled"] == b"0"
    assert headers[b"traceparent"].endswith(b"-00")


def test_trace_starts_here_with_w3c_and_b3() -> None:
    hop = next_hop(None, Sampler(1.0), span_id="c" * 16, trace_id=TRACE)
    assert hop.parent_id is None
    assert dict(hop.headers()) == {b"traceparent": b"00-%s-%s-01" % (TRACE.encode(), b"c" * 16), b"b3": b"%s-%s-1" % (TRACE.encode(), b"c" * 16)}


@pytest.mark.parametrize(("rate", "draw", "sampled"), [(0.0, 0.0, False), (1.0, 0.99, True), (0.1, 0.05, True), (0.1, 0.5, False)])
def test_sampler_for_new_traces(rate: float, draw: float, sampled: bool) -> None:
    assert Sampler(rate, rng=lambda: draw).decide(None) is sampled


def test_sampler_rejects_bad_rates() -> None:
    with pytest.raises(ValueError):
        Sampler(1.5)


def test_new_ids_are_fresh_hex() -> None:
    first, second = next_hop(None, Sampler(1.0)), next_hop(None, Sampler(1.0))
    assert first.trace_id != second.trace_id and len(first.trace_id) == 32 and len(first.span_id) == 16
    assert parse_traceparent(dict(first.headers())[b"traceparent"].decode()) is not None


def test_span_buffer_is_bounded() -> None:
    buffer = SpanBuffer(capacity=2)
    for index in range(5):
        buffer.add(Span(TRACE, "%016x" % index, None, "cart", "cart@v1#0", "GET /", 1.0, 0.1, 200, "inbound"))
    rows = buffer.drain()
    assert len(rows) == 2 and buffer.dropped == 3 and buffer.drain() == []
    assert json.loads(json.dumps(rows))[0][:3] == [TRACE, "0" * 16, None]


def _span(span_id: str, parent: str | None, service: str, start: float, duration: float, status: int = 200, direction: str = "inbound", trace: str = TRACE) -> SpanRecord:
    return SpanRecord(trace, span_id, parent, service, service + "@v1#0", "GET /" + service, start, duration, status, direction)


CHAIN = [
    _span("0000000000000001", None, "ingress", 100.0, 0.050, direction="outbound"),
    _span("0000000000000002", "0000000000000001", "frontend", 100.001, 0.048),
    _span("0000000000000003", "0000000000000002", "frontend", 100.005, 0.020, direction="outbound"),
    _span("0000000000000004", "0000000000000003", "catalog", 100.006, 0.018),
    _span("0000000000000005", "0000000000000002", "frontend", 100.026, 0.020, 503, "outbound"),
]


def test_tree_links_parents_and_orders_children() -> None:
    (root,) = build_tree(list(reversed(CHAIN)))
    assert root.span.service == "ingress"
    (frontend,) = root.children
    assert [child.span.span_id[-1] for child in frontend.children] == ["3", "5"]
    assert frontend.children[0].children[0].span.service == "catalog"


def test_orphans_become_roots() -> None:
    roots = build_tree([CHAIN[0], CHAIN[3]])
    assert [root.span.service for root in roots] == ["ingress", "catalog"]


def test_store_is_bounded_and_summarises() -> None:
    store = TraceStore(max_traces=3, max_spans=4)
    store.add_wire([[*vars_of(span)] for span in CHAIN])
    assert len(store.spans(TRACE)) == 4 and store.dropped_spans == 1
    for index in range(5):
        store.add([_span("0000000000000001", None, "hello", 200.0 + index, 0.01, trace="%032x" % (index + 1))])
    assert len(store) == 3 and store.spans(TRACE) == []
    (summary, *_) = store.summaries(limit=10)
    assert summary["trace_id"] == "%032x" % 5 and summary["root"] == "hello GET /hello" and summary["spans"] == 1
    assert store.find("0000") and store.summaries(service="nope") == []


def vars_of(span: SpanRecord) -> list:
    return [span.trace_id, span.span_id, span.parent_id, span.service, span.instance, span.name, span.start, span.duration, span.status, span.direction]


@pytest.mark.parametrize("width", [80, 160])
def test_waterfall_fits_the_terminal(width: int) -> None:
    console = Console(width=width, record=True, force_terminal=False)
    console.print(render_waterfall(build_tree(CHAIN)))
    lines = console.export_text().splitlines()
    assert lines and all(len(line) <= width for line in lines)
    text = "\n".join(lines)
    assert "catalog" in text and "503" in text and "█" in text


def test_otlp_payload_shape() -> None:
    payload = json.loads(json.dumps(otlp_payload(CHAIN)))
    services = {rs["resource"]["attributes"][0]["value"]["stringValue"]: rs for rs in payload["resourceSpans"]}
    assert set(services) == {"ingress", "frontend", "catalog"}
    spans = services["frontend"]["scopeSpans"][0]["spans"]
    assert len(spans) == 3
    server = spans[0]
    assert server["traceId"] == TRACE and server["parentSpanId"] == "0000000000000001" and server["kind"] == 2
    assert server["startTimeUnixNano"] == "100001000000" and server["endTimeUnixNano"] == "100049000000"
    assert spans[2]["status"] == {"code": 2} and spans[2]["kind"] == 3
    assert "parentSpanId" not in services["ingress"]["scopeSpans"][0]["spans"][0]
