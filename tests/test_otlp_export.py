"""Continuous OTLP export (observability.tracing.otlp): the manifest key, the pure batching,
the exporter thread against a real collector socket, and whole meshes exporting.

The collector is a stdlib HTTP server on 127.0.0.1:0 in a thread that keeps every request.
"""

from __future__ import annotations

import json
import re
import socket
import textwrap
import threading
import urllib.error
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from meshctl.agent.errors import ManifestError
from meshctl.agent.manifest import parse_manifest
from meshctl.agent.model import OtlpExport
from meshctl.agent.otlp_export import ErrorLimiter, OtlpExporter, SpanBatcher, describe_error, public_endpoint
from meshctl.agent.traces import SpanRecord
from tests.meshharness import free_port, http_get, wait_for
from tests.test_observability import MESH as OBSERVED_MESH


def span(index: int, trace_id: str = "ab" * 16, service: str = "back") -> SpanRecord:
    return SpanRecord(trace_id, "%016x" % (index + 1), None, service, service + "@v1#0", "GET /x", 1.0, 0.001, 200, "inbound")


class Collector:
    """An OTLP/HTTP collector stand-in: keeps (headers, JSON body) of every POST."""

    def __init__(self) -> None:
        self.requests: list[tuple[dict, dict]] = []
        self.lock = threading.Lock()
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                with collector.lock:
                    collector.requests.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = "http://127.0.0.1:%d/v1/traces" % self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, name="collector", daemon=True)
        self.thread.start()

    def received(self) -> list[tuple[dict, dict]]:
        with self.lock:
            return list(self.requests)

    def spans(self) -> list[tuple[str, dict]]:
        """(service.name, OTLP span) of everything received."""
        out = []
        for _headers, body in self.received():
            for resource in body["resourceSpans"]:
                [service] = [a["value"]["stringValue"] for a in resource["resource"]["attributes"] if a["key"] == "service.name"]
                for scope in resource["scopeSpans"]:
                    out.extend((service, otlp) for otlp in scope["spans"])
        return out

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture
def collector():
    running = Collector()
    try:
        yield running
    finally:
        running.close()


# -- the manifest key ------------------------------------------------------------------------

BASE = """\
mesh: shop
observability:
  tracing:
    sampling: 1.0
    otlp: {otlp}
services:
  back: {{command: echo}}
"""


def parse(otlp: str):
    return parse_manifest(textwrap.dedent(BASE.format(otlp=otlp)), "mesh.yaml", base_dir="/srv")


@pytest.mark.parametrize(
    "otlp, expected",
    [
        ("{endpoint: 'http://127.0.0.1:4318/v1/traces'}", OtlpExport("http://127.0.0.1:4318/v1/traces", (), 2.0)),
        ("{endpoint: 'https://otel.example:4318/v1/traces', timeout: 500ms, headers: {x-api-key: k, b: c}}",
         OtlpExport("https://otel.example:4318/v1/traces", (("b", "c"), ("x-api-key", "k")), 0.5)),
        ("{endpoint: 'http://[::1]:4318'}", OtlpExport("http://[::1]:4318", (), 2.0)),
    ],
)
def test_otlp_key_is_carried_in_the_model(otlp, expected):
    assert parse(otlp).observability.otlp == expected


def test_no_otlp_key_means_no_export():
    manifest = parse_manifest("mesh: shop\nservices:\n  back: {command: echo}\n", "mesh.yaml", base_dir="/srv")
    assert manifest.observability.otlp is None


@pytest.mark.parametrize(
    "otlp, expected",
    [
        ("{endpoint: 'ftp://127.0.0.1:4318/v1/traces'}", "mesh.yaml:5: observability.tracing.otlp.endpoint: invalid collector URL 'ftp://127.0.0.1:4318/v1/traces'"),
        ("{endpoint: 'http://'}", "mesh.yaml:5: observability.tracing.otlp.endpoint: invalid collector URL 'http://'"),
        ("{endpoint: 'http://c:4318', timout: 2s}", "observability.tracing.otlp.timout: unknown key 'timout' (did you mean 'timeout'?)"),
        ("{endpont: 'http://c:4318'}", "observability.tracing.otlp.endpont: unknown key 'endpont' (did you mean 'endpoint'?)"),
        ("{headers: {a: b}}", "observability.tracing.otlp.endpoint: required"),
        ("{endpoint: 'http://c:4318', timeout: 0}", "observability.tracing.otlp.timeout: must be more than 0"),
        ("{endpoint: 'http://c:4318', timeout: soon}", "observability.tracing.otlp.timeout: invalid duration 'soon'"),
        ("{endpoint: 'http://c:4318', headers: {'a b': c}}", "observability.tracing.otlp.headers.a b: invalid header name 'a b'"),
        ("{endpoint: 'http://c:4318', headers: {a: 1}}", "observability.tracing.otlp.headers.a: expected a string, got integer"),
        ("{endpoint: 'http://c:4318', headers: {a: \"k\\ney\"}}", "observability.tracing.otlp.headers.a: a header value cannot contain a line break"),
    ],
)
def test_bad_otlp_key_is_refused(otlp, expected):
    with pytest.raises(ManifestError) as caught:
        parse(otlp)
    assert expected in str(caught.value)


def test_header_values_are_never_printed():
    manifest = parse("{endpoint: 'http://c:4318', headers: {authorization: 'Bearer s3cret'}}")
    assert "s3cret" not in repr(manifest)
    with pytest.raises(ManifestError) as caught:
        parse("{endpoint: 'http://c:4318', headers: {authorization: \"s3cret\\n\"}}")
    assert "s3cret" not in str(caught.value)


# -- pure units ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "capacity, offers, queued, dropped",
    [(4, [2], 2, 0), (4, [3, 3], 4, 2), (4, [10], 4, 6), (0, [1], 0, 1), (4, [4, 0, 1], 4, 1)],
)
def test_batcher_queue_is_bounded_and_counts_drops(capacity, offers, queued, dropped):
    batcher = SpanBatcher(capacity=capacity, batch=100, interval_s=1.0)
    for count in offers:
        batcher.offer([span(i) for i in range(count)])
    assert (len(batcher.pending), batcher.counts.dropped) == (queued, dropped)


@pytest.mark.parametrize(
    "queued, last_sent, now, wait",
    [
        (0, float("-inf"), 5.0, None),  # nothing to send
        (1, float("-inf"), 5.0, 0.0),  # the first batch goes at once
        (1, 4.5, 5.0, 0.5),  # then at most one per interval ...
        (3, 4.5, 5.0, 0.0),  # ... unless a whole batch is waiting
        (1, 3.0, 5.0, 0.0),
    ],
)
def test_batcher_says_when_a_batch_is_due(queued, last_sent, now, wait):
    batcher = SpanBatcher(capacity=10, batch=3, interval_s=1.0)
    batcher.offer([span(i) for i in range(queued)])
    batcher.last_sent = last_sent
    assert batcher.wait_s(now) == wait


def test_batcher_takes_oldest_first_in_batches_and_counts():
    batcher = SpanBatcher(capacity=10, batch=3, interval_s=1.0)
    batcher.offer([span(i) for i in range(5)])
    first = batcher.take(7.0)
    assert [s.span_id for s in first] == [span(i).span_id for i in range(3)]
    assert batcher.last_sent == 7.0 and len(batcher.pending) == 2
    batcher.sent(3)
    batcher.failed(2, "Connection refused")
    batcher.offer([span(9)])
    batcher.drop_all()
    snapshot = batcher.snapshot()
    assert (snapshot.exported, snapshot.failed, snapshot.dropped, snapshot.queued, snapshot.last_error) == (
        3, 2, 3, 0, "Connection refused")


@pytest.mark.parametrize(
    "events, allowed",
    [
        ([("refused", 0.0), ("refused", 30.0), ("refused", 61.0)], [True, False, True]),
        ([("refused", 0.0), ("HTTP 500", 1.0), ("refused", 2.0)], [True, True, False]),
    ],
)
def test_error_limiter_logs_each_error_once_a_minute(events, allowed):
    limiter = ErrorLimiter(period_s=60.0)
    assert [limiter.allow(error, at) for error, at in events] == allowed


def test_error_limiter_forgets_old_errors_when_full():
    limiter = ErrorLimiter(period_s=60.0, keys=2)
    assert limiter.allow("a", 0.0) and limiter.allow("b", 0.0)
    assert not limiter.allow("c", 1.0)  # full of recent errors: stay quiet
    assert limiter.allow("c", 61.0)


@pytest.mark.parametrize(
    "url, shown",
    [
        ("http://127.0.0.1:4318/v1/traces", "http://127.0.0.1:4318/v1/traces"),
        ("https://user:key@otel.example/v1/traces?api_key=k", "https://otel.example/v1/traces"),
        ("http://[::1]:4318/v1/traces", "http://[::1]:4318/v1/traces"),
    ],
)
def test_public_endpoint_hides_credentials(url, shown):
    assert public_endpoint(url) == shown


@pytest.mark.parametrize(
    "error, text",
    [
        (urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")), "Connection refused"),
        (urllib.error.URLError(TimeoutError("timed out")), "timed out"),
        (urllib.error.HTTPError("http://c/v1/traces", 401, "Unauthorized", None, None), "HTTP 401 Unauthorized"),  # type: ignore[arg-type]
        (TimeoutError("timed out"), "timed out"),
        (ConnectionResetError(104, "Connection reset by peer"), "Connection reset by peer"),
    ],
)
def test_describe_error(error, text):
    assert describe_error(error) == text


# -- the exporter thread against real sockets ------------------------------------------------


def test_exporter_posts_batches_with_headers_and_flushes_on_stop(collector):
    exporter = OtlpExporter(OtlpExport(collector.url, (("x-api-key", "k1"),), 5.0), SpanBatcher(batch=3))
    exporter.start()
    try:
        exporter.offer([span(i) for i in range(7)])
    finally:
        exporter.stop()
        assert exporter.join(10.0)
    assert len(collector.spans()) == 7
    assert all(headers["x-api-key"] == "k1" and headers["content-type"] == "application/json" for headers, _ in collector.received())
    assert exporter.counts() == {"endpoint": collector.url, "exported": 7, "dropped": 0, "failed": 0, "queued": 0, "last_error": None}


def test_exporter_drops_beyond_its_queue_while_the_collector_hangs():
    # A listening socket that never accepts: the export connects, then waits for an answer.
    hanging = socket.create_server(("127.0.0.1", 0))
    url = "http://127.0.0.1:%d/v1/traces" % hanging.getsockname()[1]
    exporter = OtlpExporter(OtlpExport(url, (), 60.0), SpanBatcher(capacity=4, batch=2))
    exporter.start()
    try:
        exporter.offer([span(0), span(1)])
        wait_for(lambda: exporter.counts()["queued"] == 0, timeout=10, what="the worker to take the batch")
        exporter.offer([span(i) for i in range(2, 12)])
        assert exporter.counts()["queued"] == 4 and exporter.counts()["dropped"] == 6
    finally:
        hanging.close()  # resets the waiting connection: the stuck post fails
        exporter.stop(flush_s=0.0)
        assert exporter.join(30.0)
    counts = exporter.counts()
    assert counts["failed"] >= 2 and counts["exported"] == 0
    assert counts["failed"] + counts["dropped"] == 12


def test_exporter_counts_a_refused_collector_as_failed():
    url = "http://127.0.0.1:%d/v1/traces" % free_port()  # nothing listens there
    exporter = OtlpExporter(OtlpExport(url, (("authorization", "Bearer s3cret"),), 2.0))
    exporter.start()
    try:
        exporter.offer([span(i) for i in range(3)])
        wait_for(lambda: exporter.counts()["failed"] == 3, timeout=10, what="the refused export")
    finally:
        exporter.stop()
        assert exporter.join(10.0)
    assert exporter.counts()["last_error"] == "Connection refused"


# -- whole meshes ----------------------------------------------------------------------------

# test_observability's two-tier mesh (front calls back), exporting its spans.
MESH = OBSERVED_MESH.replace("mesh: obs", "mesh: otlp").replace(
    "observability: {{access_log: errors, tracing: {{sampling: 1.0}}}}",
    'observability: {{tracing: {{sampling: 1.0, otlp: {{endpoint: "{endpoint}", headers: {{x-api-key: test-key-1}}, timeout: 2s}}}}}}',
)
assert "otlp:" in MESH and "mesh: otlp" in MESH, "test_observability.MESH changed: update the replacements"

_FOOTER = re.compile(r"otlp export to (\S+): (\d+) spans exported, (\d+) dropped, (\d+) failed")


def _write(mesh, endpoint: str, port: int) -> None:
    mesh.write_manifest(MESH.format(endpoint=endpoint, port=port, PY="{PY}", APPS="{APPS}"))


def _two_hop_trace(collector: Collector) -> str | None:
    """A trace id whose spans came from both front and back."""
    services: dict[str, set[str]] = {}
    for service, otlp in collector.spans():
        services.setdefault(otlp["traceId"], set()).add(service)
    return next((trace_id for trace_id, seen in services.items() if {"front", "back"} <= seen), None)


def _call_until(port: int, predicate, what: str):
    def attempt():
        code, _, _ = http_get("http://127.0.0.1:%d/call/back/whoami" % port)
        assert code == 200
        return predicate()

    return wait_for(attempt, timeout=30, interval=0.2, what=what)


def _footer(mesh) -> tuple[str, int, int, int]:
    match = _FOOTER.search(mesh.cli("trace", check=True).stdout)
    assert match is not None
    return match.group(1), int(match.group(2)), int(match.group(3)), int(match.group(4))


def test_mesh_exports_every_hop_to_the_collector_and_follows_the_manifest(mesh, collector):
    port = free_port()
    _write(mesh, collector.url, port)
    mesh.up()
    trace_id = _call_until(port, lambda: _two_hop_trace(collector), "a front->back trace at the collector")

    resources = [(headers, resource) for headers, body in collector.received() for resource in body["resourceSpans"]]
    assert all(headers["x-api-key"] == "test-key-1" for headers, _ in resources)
    per_request = [{a["value"]["stringValue"] for r in body["resourceSpans"] for a in r["resource"]["attributes"]}
                   for _, body in collector.received()]
    assert all(len(names) == len(body["resourceSpans"]) for names, (_, body) in zip(per_request, collector.received()))
    hops = [(service, otlp) for service, otlp in collector.spans() if otlp["traceId"] == trace_id]
    kinds = {(service, otlp["kind"]) for service, otlp in hops}
    assert {("front", 2), ("front", 3), ("back", 2)} <= kinds  # front served and called, back served
    span_ids = {otlp["spanId"] for _, otlp in hops}
    back_inbound = next(otlp for service, otlp in hops if service == "back" and otlp["kind"] == 2)
    assert back_inbound["parentSpanId"] in span_ids

    endpoint, exported, _dropped, _failed = _footer(mesh)
    assert endpoint == collector.url and exported >= len(hops)

    second = Collector()
    try:
        _write(mesh, second.url, port)
        mesh.up()
        _call_until(port, lambda: _two_hop_trace(second), "the changed collector to get traces")
        assert _footer(mesh)[0] == second.url
    finally:
        second.close()


def test_mesh_serves_and_counts_failures_while_the_collector_is_down(mesh):
    port = free_port()
    _write(mesh, "http://127.0.0.1:%d/v1/traces" % free_port(), port)  # nothing listens there
    mesh.up()
    _call_until(port, lambda: _footer(mesh)[3] >= 4, "failed exports to be counted")
    assert mesh.status()["mesh"] == "otlp"
    code, _, body = http_get("http://127.0.0.1:%d/call/back/whoami" % port)
    assert code == 200 and b"back" in body
    assert "Connection refused" in mesh.cli("trace", check=True).stdout
    [log_file] = mesh.home.rglob("agent.log")
    log_text = log_file.read_text()
    assert "OTLP export to http://127.0.0.1:" in log_text and "Connection refused" in log_text
    assert "test-key-1" not in log_text
