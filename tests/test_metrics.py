"""proxy.metrics: exact values through a real Prometheus parser, snapshots, bounded labels."""

from __future__ import annotations

import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshctl.proxy.metrics import LATENCY_BUCKETS, Metrics, RouteTable, path_template


def _samples(text: str) -> dict[str, list]:
    samples: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample)
    return samples


def _one(samples: list, **labels) -> float:
    matching = [s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(matching) == 1, (labels, matching)
    return matching[0]


@pytest.fixture
def loaded() -> Metrics:
    metrics = Metrics("cart@v1#0", "cart", "v1", clock=lambda: 1000.0)
    for duration in (0.003, 0.003, 0.02, 0.2):
        metrics.record_request("inbound", "frontend", "cart", "v1", b"GET", 200, duration, False)
    metrics.record_request("inbound", "frontend", "cart", "v1", b"POST", 503, 1.5, False)
    metrics.record_request("outbound", "cart", "catalog", "v2", b"BREW", 504, 40.0, True)
    metrics.record_request("outbound", "cart", "catalog", "v2", b"PROPFIND", 504, 0.01, True)
    metrics.tcp_opened("inbound", "frontend")
    metrics.tcp_opened("inbound", "frontend")
    metrics.tcp_closed("inbound", "frontend", 300, 1200)
    metrics.count_retry("catalog", "v2")
    metrics.count_retry("catalog", "v2")
    metrics.count_timeout("catalog", "v2")
    metrics.count_stream_idle_timeout("catalog", "v1")
    metrics.count_ejection("catalog", "v2")
    metrics.count_authz_denied("web", "cart")
    metrics.set_certificate_expiry("cart", 1764246400.0)
    metrics.in_flight_source = lambda: {("inbound", "cart"): 3}
    return metrics


def test_exposition_parses_with_exact_values(loaded: Metrics) -> None:
    samples = _samples(loaded.exposition())
    requests = samples["mesh_requests_total"]
    assert _one(requests, method="GET", code="200", destination_version="v1", mesh_error="false", instance="cart@v1#0") == 4
    assert _one(requests, method="POST", code="503") == 1
    assert _one(requests, method="other", code="504", direction="outbound", destination_service="catalog", mesh_error="true") == 2
    buckets = samples["mesh_request_duration_seconds_bucket"]
    get = {s.labels["le"]: s.value for s in buckets if s.labels["method"] == "GET"}
    assert get["0.0025"] == 0 and get["0.005"] == 2 and get["0.025"] == 3 and get["0.25"] == 4 and get["+Inf"] == 4
    other = {s.labels["le"]: s.value for s in buckets if s.labels["method"] == "other"}
    assert other["30.0"] == 1 and other["+Inf"] == 2
    assert _one(samples["mesh_request_duration_seconds_sum"], method="GET") == pytest.approx(0.226)
    assert _one(samples["mesh_request_duration_seconds_count"], method="GET") == 4
    assert _one(samples["mesh_requests_in_flight"], direction="inbound") == 3
    assert _one(samples["mesh_tcp_connections_opened_total"], peer_service="frontend") == 2
    assert _one(samples["mesh_tcp_connections_closed_total"], peer_service="frontend") == 1
    assert _one(samples["mesh_tcp_bytes_total"], byte_direction="received") == 300
    assert _one(samples["mesh_tcp_bytes_total"], byte_direction="sent") == 1200
    assert _one(samples["mesh_retries_total"], destination_service="catalog") == 2
    assert _one(samples["mesh_stream_idle_timeouts_total"], destination_version="v1") == 1
    assert _one(samples["mesh_timeouts_total"], destination_version="v2") == 1
    assert _one(samples["mesh_ejections_total"], destination_service="catalog") == 1
    assert _one(samples["mesh_authz_denied_total"], source_service="web") == 1
    assert _one(samples["mesh_certificate_expiry_timestamp_seconds"], service="cart") == 1764246400


def test_exposition_declares_every_family_once(loaded: Metrics) -> None:
    families = {f.name: f.type for f in text_string_to_metric_families(loaded.exposition())}
    assert families == {
        "mesh_requests": "counter",
        "mesh_request_duration_seconds": "histogram",
        "mesh_requests_in_flight": "gauge",
        "mesh_tcp_connections_opened": "counter",
        "mesh_tcp_connections_closed": "counter",
        "mesh_tcp_bytes": "counter",
        "mesh_retries": "counter",
        "mesh_timeouts": "counter",
        "mesh_stream_idle_timeouts": "counter",
        "mesh_ejections": "counter",
        "mesh_authz_denied": "counter",
        "mesh_refused_connections": "counter",
        "mesh_certificate_expiry_timestamp_seconds": "gauge",
    }


def test_empty_registry_is_valid_exposition() -> None:
    families = list(text_string_to_metric_families(Metrics("x@v1#0").exposition()))
    assert all(not family.samples for family in families)


@pytest.mark.parametrize("value", ['quote"d', "back\\slash", "new\nline", "ünïcode"])
def test_label_values_are_escaped(value: str) -> None:
    metrics = Metrics(value)
    metrics.record_request("inbound", value, "cart", "v1", b"GET", 200, 0.001, False)
    samples = _samples(metrics.exposition())
    assert _one(samples["mesh_requests_total"], source_service=value, instance=value) == 1


@pytest.mark.parametrize(
    ("duration", "bucket"),
    [(0.0, 0), (0.001, 0), (0.0010001, 1), (0.01, 3), (30.0, len(LATENCY_BUCKETS) - 1), (30.1, len(LATENCY_BUCKETS))],
)
def test_bucket_is_the_first_bound_not_below_the_value(duration: float, bucket: int) -> None:
    metrics = Metrics("a")
    metrics.record_request("inbound", "", "a", "v1", b"GET", 200, duration, False)
    (record,) = metrics.requests.values()
    assert record[2].index(1) == bucket


def test_methods_are_bounded() -> None:
    metrics = Metrics("a")
    for index in range(100):
        metrics.record_request("inbound", "", "a", "v1", b"X%d" % index, 200, 0.001, False)
    assert [key[4] for key in metrics.requests] == ["other"]


def test_snapshot_is_json_and_compact(loaded: Metrics) -> None:
    snapshot = json.loads(json.dumps(loaded.snapshot()))
    assert snapshot["instance"] == "cart@v1#0" and snapshot["time"] == 1000.0
    assert snapshot["buckets"] == list(LATENCY_BUCKETS)
    row = next(r for r in snapshot["requests"] if r[4] == "GET")
    assert row[:7] == ["inbound", "frontend", "cart", "v1", "GET", 200, False]
    assert row[7] == 4 and row[8] == pytest.approx(0.226) and sum(row[9]) == 4
    assert snapshot["tcp"] == [["inbound", "frontend", 2, 1, 300, 1200]]
    assert snapshot["in_flight"] == [["inbound", "cart", 3]]


@pytest.mark.parametrize(
    ("path", "template"),
    [
        (b"/items/42", "/items/:id"),
        (b"/items/42?x=1", "/items/:id"),
        (b"/carts/0b9e8f5c-1d2a-4c3b-9a8e-7f6d5c4b3a21/items", "/carts/:id/items"),
        (b"/", "/"),
        (b"", "/"),
        (b"/api/v2/checkout", "/api/v2/checkout"),
        (b"/deadbeefdeadbeef", "/:id"),
    ],
)
def test_path_template(path: bytes, template: str) -> None:
    assert path_template(path) == template


def test_route_table_is_bounded_and_keeps_heavy_hitters() -> None:
    table = RouteTable(capacity=8)
    for index in range(1000):
        table.record("cart", "GET", b"/heavy", False, 0.01)
        table.record("cart", "GET", b"/rare/x%d" % index, index % 2 == 0, 0.02)
    assert len(table.entries) == 8
    heavy = table.entries[("cart", "GET", "/heavy")]
    assert heavy[0] == 1000 and heavy[1] == 0 and heavy[3] == 0.01


def test_record_request_with_path_feeds_the_route_table() -> None:
    metrics = Metrics("a")
    metrics.record_request("inbound", "", "cart", "v1", b"GET", 500, 0.1, False, b"/items/7")
    metrics.record_request("inbound", "", "cart", "v1", b"GET", 200, 0.3, False, b"/items/8?q")
    assert metrics.snapshot()["routes"] == [["cart", "GET", "/items/:id", 2, 1, pytest.approx(0.4), 0.3]]
