"""agent.stats: known synthetic load through real proxy.metrics registries, then the numbers."""

from __future__ import annotations

import json

import pytest

from meshctl.agent.stats import STAT_JSON_KEYS, SnapshotRing, add_process_usage, quantile, request_deltas, route_stats, service_stats
from meshctl.proxy.metrics import LATENCY_BUCKETS, Metrics


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _sidecar(instance: str, service: str, version: str, clock: Clock) -> Metrics:
    return Metrics(instance, service, version, clock=clock)


def _load(metrics: Metrics, count: int, status: int, duration: float, mesh_error: bool = False, path: bytes | None = None) -> None:
    for _ in range(count):
        metrics.record_request("inbound", "frontend", metrics.service, metrics.version, b"GET", status, duration, mesh_error, path)


def test_rate_success_and_quantiles_over_a_window() -> None:
    clock = Clock(1000.0)
    cart = _sidecar("cart@v1#0", "cart", "v1", clock)
    _load(cart, 50, 200, 0.004)  # before the window: must not count
    older = cart.snapshot()
    clock.now = 1010.0
    _load(cart, 90, 200, 0.004)  # bucket (0.0025, 0.005]
    _load(cart, 8, 200, 0.2)  # bucket (0.1, 0.25]
    _load(cart, 1, 503, 0.2)
    _load(cart, 1, 404, 0.001, mesh_error=True)  # route-not-found from a sidecar
    (row,) = service_stats([(older, cart.snapshot())])
    assert (row.service, row.version, row.requests, row.rps) == ("cart", "v1", 100, 10.0)
    assert row.success_rate == 0.98
    assert 2.5 <= row.p50_ms <= 5.0
    assert row.p50_ms == pytest.approx(2.5 + 2.5 * (50 - 1) / 90, abs=1e-3)
    assert 100.0 <= row.p95_ms <= 250.0 and 100.0 <= row.p99_ms <= 250.0


def test_replicas_add_up_and_versions_stay_apart() -> None:
    clock = Clock(0.0)
    sidecars = [_sidecar("cart@v1#0", "cart", "v1", clock), _sidecar("cart@v1#1", "cart", "v1", clock), _sidecar("cart@v2#0", "cart", "v2", clock)]
    older = [s.snapshot() for s in sidecars]
    clock.now = 20.0
    _load(sidecars[0], 100, 200, 0.01)
    _load(sidecars[1], 100, 500, 0.01)
    _load(sidecars[2], 40, 200, 0.03)
    rows = service_stats(zip(older, [s.snapshot() for s in sidecars]))
    assert [(r.version, r.requests, r.rps, r.success_rate) for r in rows] == [("v1", 200, 10.0, 0.5), ("v2", 40, 2.0, 1.0)]


def test_restarted_sidecar_counts_from_zero() -> None:
    clock = Clock(100.0)
    before = _sidecar("cart@v1#0", "cart", "v1", clock)
    _load(before, 500, 200, 0.01)
    older = before.snapshot()
    clock.now = 105.0
    after = _sidecar("cart@v1#0", "cart", "v1", clock)  # a new process: new started_at
    clock.now = 110.0
    _load(after, 30, 200, 0.01)
    (row,) = service_stats([(older, after.snapshot())])
    assert row.requests == 30 and row.rps == 6.0


def test_first_poll_rates_since_start_and_empty_window() -> None:
    clock = Clock(0.0)
    cart = _sidecar("cart@v1#0", "cart", "v1", clock)
    clock.now = 4.0
    _load(cart, 8, 200, 0.01)
    (row,) = service_stats([(None, cart.snapshot())])
    assert row.rps == 2.0
    assert service_stats([(cart.snapshot(), cart.snapshot())]) == []


def test_in_flight_and_outbound_view() -> None:
    clock = Clock(0.0)
    cart = _sidecar("cart@v1#0", "cart", "v1", clock)
    cart.in_flight_source = lambda: {("inbound", "cart"): 4, ("outbound", "catalog"): 1}
    older = cart.snapshot()
    clock.now = 1.0
    cart.record_request("outbound", "cart", "catalog", "v2", b"GET", 503, 0.002, True)
    (inbound,) = service_stats([(older, cart.snapshot())])
    assert (inbound.service, inbound.in_flight, inbound.requests) == ("cart", 4, 0)
    (outbound,) = service_stats([(older, cart.snapshot())], direction="outbound")
    assert (outbound.service, outbound.version, outbound.success_rate) == ("catalog", "v2", 0.0)


def test_json_keys_are_the_documented_ones_first() -> None:
    clock = Clock(0.0)
    cart = _sidecar("cart@v1#0", "cart", "v1", clock)
    clock.now = 1.0
    _load(cart, 1, 200, 0.01)
    rows = service_stats([(None, cart.snapshot())])
    add_process_usage(rows, {("cart", "v1"): (3.14159, 25_000_000)})
    data = json.loads(json.dumps([row.to_json() for row in rows]))
    assert tuple(data[0])[: len(STAT_JSON_KEYS)] == STAT_JSON_KEYS
    assert data[0]["sidecar_cpu_percent"] == 3.1 and data[0]["sidecar_rss_bytes"] == 25_000_000


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        (0.5, [10, 0, 0], 0.5),  # bounds (1, 2): all in the first bucket, lower bound 0
        (0.5, [0, 10, 0], 1.5),
        (1.0, [0, 10, 0], 2.0),
        (0.5, [5, 5, 0], 1.0),
        (0.9, [0, 0, 10], 2.0),  # +Inf: the highest finite bound
        (0.5, [0, 0, 0], None),
    ],
)
def test_quantile_interpolates_within_buckets(q: float, buckets: list[int], expected) -> None:
    assert quantile(q, (1.0, 2.0), buckets) == expected


def test_deltas_subtract_each_bucket() -> None:
    clock = Clock(0.0)
    cart = _sidecar("cart@v1#0", "cart", "v1", clock)
    _load(cart, 3, 200, 0.001)
    older = cart.snapshot()
    _load(cart, 2, 200, 0.001)
    _load(cart, 1, 200, 60.0)
    (row,) = request_deltas(older, cart.snapshot())
    assert row[7] == 3 and row[9][0] == 2 and row[9][len(LATENCY_BUCKETS)] == 1


def test_ring_window_picks_the_oldest_snapshot_inside_it() -> None:
    ring = SnapshotRing(capacity=5)
    assert ring.window(10) == (None, None)
    for t in range(0, 70, 10):
        ring.add({"time": float(t)})
    assert len(ring) == 5
    older, newer = ring.window(25)
    assert (older["time"], newer["time"]) == (40.0, 60.0)
    ring = SnapshotRing()
    ring.add({"time": 1.0})
    assert ring.window(10) == (None, {"time": 1.0})


def test_requests_before_the_first_poll_count_while_the_window_reaches_the_start() -> None:
    clock = Clock(1000.0)
    cart = _sidecar("cart@v1#0", "cart", "v1", clock)
    _load(cart, 3, 200, 0.004)  # served before the agent's first poll
    ring = SnapshotRing(capacity=10)
    ring.add(cart.snapshot())
    clock.now = 1001.0
    _load(cart, 7, 200, 0.004)
    ring.add(cart.snapshot())
    (row,) = service_stats([ring.window(120)])
    assert row.requests == 10  # the window covers the sidecar's whole life
    (row,) = service_stats([ring.window(0.5)])
    assert row.requests == 7  # a short window starts at the first poll inside it


def test_busiest_routes() -> None:
    clock = Clock(0.0)
    cart = _sidecar("cart@v1#0", "cart", "v1", clock)
    _load(cart, 5, 200, 0.01, path=b"/items/1")
    older = cart.snapshot()
    clock.now = 10.0
    _load(cart, 20, 200, 0.01, path=b"/items/2")
    _load(cart, 10, 500, 0.05, path=b"/checkout")
    _load(cart, 10, 200, 0.01, path=b"/checkout")
    routes = route_stats([(older, cart.snapshot())], limit=5)
    assert [(r.path, r.requests, r.rps, r.success_rate) for r in routes] == [("/checkout", 20, 2.0, 0.5), ("/items/:id", 20, 2.0, 1.0)]
    assert routes[0].mean_ms == pytest.approx(30.0) and routes[0].worst_ms == 50.0
