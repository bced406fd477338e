"""Golden signals per service@version from the sidecars' metric snapshots (pure).

Each sidecar answers `{"type": "stats?"}` with `proxy.metrics.Metrics.snapshot()`. The agent
keeps a short `SnapshotRing` per sidecar; the difference between the oldest and the newest
snapshot in the window gives, per service@version:

* `requests` in the window and `rps`;
* `success_rate`: share of requests with status < 500 that the mesh did not answer itself
  (a 404 `route-not-found` from a sidecar is a failure, a 404 from the app is not);
* p50/p95/p99 in milliseconds, interpolated linearly inside the histogram bucket that holds
  the rank, as Prometheus `histogram_quantile` does (so accurate to the bucket resolution);
* `in_flight` from the newest snapshot's gauge.

Counters restart at zero when a sidecar restarts: a snapshot with another `started_at`, or
a count lower than before, counts from zero (Prometheus' reset rule).

By default a service is seen from its own sidecars' *inbound* side, which is what the
service served. `direction="outbound"` instead shows what callers saw, including the
errors their sidecars generated before any request reached the service.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

STAT_JSON_KEYS = ("service", "version", "rps", "success_rate", "p50_ms", "p95_ms", "p99_ms", "requests")

# Row layout of snapshot["requests"] (proxy.metrics.Metrics.snapshot).
_DIRECTION, _SOURCE, _DESTINATION, _VERSION, _METHOD, _CODE, _MESH_ERROR, _COUNT, _SUM, _BUCKETS = range(10)


@dataclass
class ServiceStats:
    service: str
    version: str
    rps: float
    success_rate: float | None  # None when there were no requests
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    requests: int
    in_flight: int = 0
    sidecar_cpu_percent: float | None = None
    sidecar_rss_bytes: int | None = None

    def to_json(self) -> dict:
        """The documented `meshctl stat -o json` keys first, the extras after."""
        data = asdict(self)
        return {**{key: data[key] for key in STAT_JSON_KEYS}, **{k: v for k, v in data.items() if k not in STAT_JSON_KEYS}}


def with_quiet(rows: list[ServiceStats], running: set[tuple[str, str]]) -> list[ServiceStats]:
    """`rows` plus a zero row for every running service@version that had no traffic.

    A quiet service shows as quiet (0 rps, no percentiles) instead of vanishing.
    """
    seen = {(row.service, row.version) for row in rows}
    quiet = [
        ServiceStats(service, version, rps=0.0, success_rate=None, p50_ms=None, p95_ms=None, p99_ms=None, requests=0)
        for service, version in sorted(running - seen)
    ]
    return rows + quiet


@dataclass
class RouteStats:
    service: str
    method: str
    path: str
    requests: int
    rps: float
    success_rate: float | None
    mean_ms: float | None
    worst_ms: float


class SnapshotRing:
    """The last snapshots of one sidecar, oldest first, bounded by count."""

    def __init__(self, capacity: int = 120) -> None:
        self._snapshots: deque[dict] = deque(maxlen=capacity)

    def __len__(self) -> int:
        return len(self._snapshots)

    def add(self, snapshot: dict) -> None:
        self._snapshots.append(snapshot)

    def window(self, seconds: float) -> tuple[dict | None, dict | None]:
        """(oldest snapshot at most `seconds` older than the newest, newest).

        None as the older one means "count from zero": the window reaches back to the
        sidecar's start and every snapshot since is still here, so the requests it served
        before the agent's first poll are counted too.
        """
        if not self._snapshots:
            return None, None
        newest = self._snapshots[-1]
        first = self._snapshots[0]
        complete = len(self._snapshots) < (self._snapshots.maxlen or 0) and not _restarted(first, newest)
        if complete and newest["time"] - float(newest.get("started_at") or 0.0) <= seconds:
            return None, newest
        for snapshot in self._snapshots:
            if snapshot is not newest and newest["time"] - snapshot["time"] <= seconds:
                return snapshot, newest
        # No poll inside a window this short: the one before the newest is the baseline.
        return (self._snapshots[-2] if len(self._snapshots) > 1 else None), newest


def quantile(q: float, bounds: Sequence[float], buckets: Sequence[int]) -> float | None:
    """The q-quantile of a histogram with non-cumulative `buckets` (last one is +Inf)."""
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    cumulative = 0
    for index, count in enumerate(buckets):
        previous = cumulative
        cumulative += count
        if cumulative >= rank and count > 0:
            if index >= len(bounds):
                return bounds[-1]  # in +Inf: the highest finite bound, as Prometheus does
            lower = bounds[index - 1] if index > 0 else 0.0
            upper = bounds[index]
            return lower + (upper - lower) * (rank - previous) / count
    return bounds[-1]


def _restarted(older: dict | None, newer: dict) -> bool:
    return older is None or older.get("started_at") != newer.get("started_at") or older.get("instance") != newer.get("instance")


def request_deltas(older: dict | None, newer: dict) -> list[list]:
    """The `requests` rows of `newer` minus those of `older` (count, sum and each bucket)."""
    if _restarted(older, newer):
        return [list(row) for row in newer["requests"]]
    previous = {tuple(row[:_COUNT]): row for row in older["requests"]}  # type: ignore[index]
    out = []
    for row in newer["requests"]:
        before = previous.get(tuple(row[:_COUNT]))
        if before is None or row[_COUNT] < before[_COUNT]:
            out.append(list(row))
            continue
        count = row[_COUNT] - before[_COUNT]
        if count:
            buckets = [max(0, now - then) for now, then in zip(row[_BUCKETS], before[_BUCKETS])]
            out.append([*row[:_COUNT], count, row[_SUM] - before[_SUM], buckets])
    return out


def _success(row: Sequence) -> bool:
    return row[_CODE] < 500 and not row[_MESH_ERROR]


def _interval(older: dict | None, newer: dict) -> float:
    if _restarted(older, newer):
        return max(newer["time"] - newer.get("started_at", newer["time"]), 0.0)
    return max(newer["time"] - older["time"], 0.0)  # type: ignore[index]


def service_stats(windows: Iterable[tuple[dict | None, dict]], direction: str = "inbound") -> list[ServiceStats]:
    """One row per destination service@version over all sidecars' (older, newer) pairs, by name.

    `rps` sums each sidecar's own rate (requests / its own interval), so sidecars polled at
    slightly different moments still add up correctly.
    """
    totals: dict[tuple[str, str], dict] = {}
    bounds: Sequence[float] = ()
    for older, newer in windows:
        bounds = newer["buckets"]
        interval = _interval(older, newer)
        for row in request_deltas(older, newer):
            if row[_DIRECTION] != direction:
                continue
            entry = totals.setdefault((row[_DESTINATION], row[_VERSION]), _empty(len(bounds)))
            entry["requests"] += row[_COUNT]
            entry["rps"] += row[_COUNT] / interval if interval > 0 else 0.0
            if _success(row):
                entry["ok"] += row[_COUNT]
            entry["buckets"] = [a + b for a, b in zip(entry["buckets"], row[_BUCKETS])]
        if direction == "inbound":
            # A sidecar's inbound gauge is for its own service and version.
            key = (newer.get("service", ""), newer.get("version", ""))
            for gauge_direction, _service, count in newer.get("in_flight", []):
                if gauge_direction == direction and count:
                    totals.setdefault(key, _empty(len(bounds)))["in_flight"] += count
    out = []
    for (service, version), entry in totals.items():
        requests = entry["requests"]
        out.append(
            ServiceStats(
                service=service,
                version=version,
                rps=round(entry["rps"], 3),
                success_rate=round(entry["ok"] / requests, 4) if requests else None,
                p50_ms=_ms(quantile(0.50, bounds, entry["buckets"])),
                p95_ms=_ms(quantile(0.95, bounds, entry["buckets"])),
                p99_ms=_ms(quantile(0.99, bounds, entry["buckets"])),
                requests=requests,
                in_flight=entry["in_flight"],
            )
        )
    return sorted(out, key=lambda s: (s.service, s.version))


def edge_rates(windows: Iterable[tuple[dict | None, dict]]) -> dict[tuple[str, str], float]:
    """Requests per second from each caller to each service over the window, from the callers' outbound rows."""
    rates: dict[tuple[str, str], float] = {}
    for older, newer in windows:
        interval = _interval(older, newer)
        if interval <= 0:
            continue
        for row in request_deltas(older, newer):
            if row[_DIRECTION] == "outbound":
                key = (row[_SOURCE], row[_DESTINATION])
                rates[key] = rates.get(key, 0.0) + row[_COUNT] / interval
    return rates


def _empty(slots: int) -> dict:
    return {"requests": 0, "ok": 0, "rps": 0.0, "in_flight": 0, "buckets": [0] * (slots + 1)}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def route_stats(windows: Iterable[tuple[dict | None, dict]], limit: int = 10) -> list[RouteStats]:
    """The busiest (service, method, path template) in the window, busiest first.

    The sidecars' route tables are space-saving top-K sketches: an entry that was evicted
    and came back may show a smaller count than before; such a delta counts as the whole
    newer entry, so counts are upper bounds, as the sketch's own counts are.
    """
    totals: dict[tuple[str, str, str], list] = {}
    for older, newer in windows:
        interval = _interval(older, newer)
        previous = {} if _restarted(older, newer) else {tuple(row[:3]): row for row in older.get("routes", [])}  # type: ignore[union-attr]
        for row in newer.get("routes", []):
            key = tuple(row[:3])
            count, failures, total_seconds, worst = row[3:7]
            before = previous.get(key)
            if before is not None and before[3] <= count:
                count, failures, total_seconds = count - before[3], max(0, failures - before[4]), total_seconds - before[5]
            if count <= 0:
                continue
            entry = totals.setdefault(key, [0, 0, 0.0, 0.0, 0.0])
            entry[0] += count
            entry[1] += failures
            entry[2] += total_seconds
            entry[3] = max(entry[3], worst)
            entry[4] += count / interval if interval > 0 else 0.0
    ranked = sorted(totals.items(), key=lambda item: (-item[1][0], item[0]))[:limit]
    return [
        RouteStats(
            service=service,
            method=method,
            path=path,
            requests=count,
            rps=round(rate, 3),
            success_rate=round(1 - failures / count, 4) if count else None,
            mean_ms=_ms(total_seconds / count) if count else None,
            worst_ms=round(worst * 1000, 3),
        )
        for (service, method, path), (count, failures, total_seconds, worst, rate) in ranked
    ]


def add_process_usage(rows: list[ServiceStats], usage: Mapping[tuple[str, str], tuple[float, int]]) -> None:
    """Sidecar CPU % and RSS summed per service@version (the agent measures them with psutil)."""
    for row in rows:
        measured = usage.get((row.service, row.version))
        if measured is not None:
            row.sidecar_cpu_percent = round(measured[0], 1)
            row.sidecar_rss_bytes = int(measured[1])

