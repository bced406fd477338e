"""The sidecar's golden metrics: one registry per process, cheap to record, two read-outs.

Recording is on the hot path, so it does no string work: a request is one dict lookup
by a label tuple to a small mutable list `[count, sum_seconds, bucket_counts]`, then
one `bisect` over precomputed bucket bounds and three in-place additions. Label values
stay as the engine holds them (method bytes, status int); they become text only when
someone reads the registry:

* `exposition()`: the Prometheus text format (served on the admin listener's /metrics);
* `snapshot()`: compact JSON-able numbers the agent polls over the config channel.

Label cardinality is bounded: methods outside `KNOWN_METHODS` count as "other", services
and versions come from the config snapshot, and the busiest-paths table (`RouteTable`) has a
fixed capacity (space-saving top-K, see docs/observability.md).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Mapping

INBOUND = "inbound"
OUTBOUND = "outbound"

# Seconds. Prometheus-style upper bounds (value <= bound), +Inf implicit as the last slot.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)
_BOUNDS = list(LATENCY_BUCKETS)
_SLOTS = len(LATENCY_BUCKETS) + 1

KNOWN_METHODS: dict[bytes, str] = {
    method: method.decode("ascii")
    for method in (b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"PATCH", b"OPTIONS", b"CONNECT", b"TRACE")
}
OTHER_METHOD = "other"

ROUTE_TABLE_CAPACITY = 64
_PATH_TEMPLATE_CACHE_LIMIT = 4096

_REQUEST_LABELS = ("direction", "source_service", "destination_service", "destination_version", "method", "code", "mesh_error")


def _escape(value: str) -> str:
    """A label value as the text format wants it: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: tuple[str, ...], values: tuple, extra: str = "") -> str:
    parts = ['%s="%s"' % (name, _escape(str(value))) for name, value in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}"


def _number(value: float) -> str:
    if isinstance(value, int) or value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _is_id_segment(segment: str) -> bool:
    """Numbers, UUIDs and long hex strings vary per request; they would blow up the table."""
    if not segment:
        return False
    if segment.isdigit():
        return True
    stripped = segment.replace("-", "")
    return len(stripped) >= 16 and all(c in "0123456789abcdefABCDEF" for c in stripped)


def path_template(path: bytes) -> str:
    """`/items/42?x=1` -> `/items/:id`: the query dropped, id-like segments replaced."""
    text = path.partition(b"?")[0].decode("latin-1")
    return "/".join(":id" if _is_id_segment(segment) else segment for segment in text.split("/")) or "/"


class RouteTable:
    """The busiest (service, method, path template), in fixed memory.

    Space-saving top-K (Metwally et al.): while there is room every key gets its own
    entry; when full, a new key takes over the entry with the smallest count and inherits
    that count, so a count is an upper bound and true heavy hitters are never lost.
    An entry is `[count, failures, sum_seconds, max_seconds]`.
    """

    def __init__(self, capacity: int = ROUTE_TABLE_CAPACITY) -> None:
        self.capacity = capacity
        self.entries: dict[tuple[str, str, str], list] = {}
        self._templates: dict[bytes, str] = {}

    def record(self, service: str, method: str, path: bytes, failed: bool, duration: float) -> None:
        template = self._templates.get(path)
        if template is None:
            if len(self._templates) >= _PATH_TEMPLATE_CACHE_LIMIT:
                self._templates.clear()
            template = self._templates[path] = path_template(path)
        key = (service, method, template)
        entry = self.entries.get(key)
        if entry is None:
            entry = self._make_room(key)
        entry[0] += 1
        if failed:
            entry[1] += 1
        entry[2] += duration
        if duration > entry[3]:
            entry[3] = duration

    def _make_room(self, key: tuple[str, str, str]) -> list:
        entries = self.entries
        if len(entries) < self.capacity:
            entry = entries[key] = [0, 0, 0.0, 0.0]
            return entry
        smallest = min(entries, key=lambda k: entries[k][0])
        inherited = entries.pop(smallest)[0]
        entry = entries[key] = [inherited, 0, 0.0, 0.0]
        return entry


class Metrics:
    """The registry of one sidecar; `instance` labels every sample."""

    def __init__(self, instance: str, service: str = "", version: str = "", clock: Callable[[], float] = time.time) -> None:
        self.instance = instance
        self.service = service
        self.version = version
        self.started_at = clock()
        self._clock = clock
        self.requests: dict[tuple, list] = {}
        self.tcp: dict[tuple[str, str], list[int]] = {}  # [opened, closed, bytes_in, bytes_out]
        self.retries: dict[tuple[str, str], int] = {}
        self.timeouts: dict[tuple[str, str], int] = {}
        self.stream_idle_timeouts: dict[tuple[str, str], int] = {}
        self.ejections: dict[tuple[str, str], int] = {}
        self.authz_denied: dict[tuple[str, str], int] = {}
        self.refused: dict[tuple[str, str], int] = {}  # (listener kind, peer uid or "unknown")
        self.certificate_expiry: dict[str, float] = {}
        self.routes = RouteTable()
        self.in_flight_source: Callable[[], Mapping[tuple[str, str], int]] | None = None

    def __repr__(self) -> str:
        return "<Metrics %s: %d request series, %d tcp series>" % (self.instance, len(self.requests), len(self.tcp))

    # -- recording (hot path) ------------------------------------------------------------

    def record_request(
        self,
        direction: str,
        source_service: str,
        destination_service: str,
        destination_version: str,
        method: bytes,
        status: int,
        duration: float,
        mesh_error: bool,
        path: bytes | None = None,
    ) -> None:
        """The one hook the engine calls when an exchange finishes (answered or failed)."""
        method_label = KNOWN_METHODS.get(method, OTHER_METHOD)
        key = (direction, source_service, destination_service, destination_version, method_label, status, mesh_error)
        record = self.requests.get(key)
        if record is None:
            record = self.requests[key] = [0, 0.0, [0] * _SLOTS]
        record[0] += 1
        record[1] += duration
        record[2][bisect_left(_BOUNDS, duration)] += 1
        if path is not None:
            self.routes.record(destination_service, method_label, path, status >= 500 or mesh_error, duration)

    def tcp_opened(self, direction: str, peer_service: str) -> None:
        record = self.tcp.get((direction, peer_service))
        if record is None:
            record = self.tcp[(direction, peer_service)] = [0, 0, 0, 0]
        record[0] += 1

    def tcp_closed(self, direction: str, peer_service: str, bytes_in: int, bytes_out: int) -> None:
        record = self.tcp.get((direction, peer_service))
        if record is None:
            record = self.tcp[(direction, peer_service)] = [0, 0, 0, 0]
        record[1] += 1
        record[2] += bytes_in
        record[3] += bytes_out

    def count_retry(self, destination_service: str, destination_version: str) -> None:
        key = (destination_service, destination_version)
        self.retries[key] = self.retries.get(key, 0) + 1

    def count_timeout(self, destination_service: str, destination_version: str) -> None:
        key = (destination_service, destination_version)
        self.timeouts[key] = self.timeouts.get(key, 0) + 1

    def count_stream_idle_timeout(self, destination_service: str, destination_version: str) -> None:
        key = (destination_service, destination_version)
        self.stream_idle_timeouts[key] = self.stream_idle_timeouts.get(key, 0) + 1

    def count_ejection(self, destination_service: str, destination_version: str) -> None:
        key = (destination_service, destination_version)
        self.ejections[key] = self.ejections.get(key, 0) + 1

    def count_authz_denied(self, source_service: str, destination_service: str) -> None:
        key = (source_service, destination_service)
        self.authz_denied[key] = self.authz_denied.get(key, 0) + 1

    def count_refused(self, listener: str, uid: int | None) -> None:
        key = (listener, str(uid) if uid is not None else "unknown")
        self.refused[key] = self.refused.get(key, 0) + 1

    def set_certificate_expiry(self, service: str, not_after: float) -> None:
        self.certificate_expiry[service] = not_after

    def in_flight(self) -> Mapping[tuple[str, str], int]:
        return self.in_flight_source() if self.in_flight_source is not None else {}

    # -- read-outs -----------------------------------------------------------------------

    def snapshot(self) -> dict:
        """Compact numbers for the agent: lists of label values followed by the counts."""
        return {
            "instance": self.instance,
            "service": self.service,
            "version": self.version,
            "started_at": self.started_at,
            "time": self._clock(),
            "buckets": list(LATENCY_BUCKETS),
            "requests": [[*key, record[0], record[1], list(record[2])] for key, record in self.requests.items()],
            "tcp": [[*key, *record] for key, record in self.tcp.items()],
            "retries": [[*key, n] for key, n in self.retries.items()],
            "timeouts": [[*key, n] for key, n in self.timeouts.items()],
            "stream_idle_timeouts": [[*key, n] for key, n in self.stream_idle_timeouts.items()],
            "ejections": [[*key, n] for key, n in self.ejections.items()],
            "authz_denied": [[*key, n] for key, n in self.authz_denied.items()],
            "refused": [[*key, n] for key, n in self.refused.items()],
            "certificate_expiry": dict(self.certificate_expiry),
            "in_flight": [[*key, n] for key, n in self.in_flight().items()],
            "routes": [[*key, *entry] for key, entry in self.routes.entries.items()],
        }

    def exposition(self) -> str:
        """The Prometheus text format, version 0.0.4."""
        instance = 'instance="%s"' % _escape(self.instance)
        lines: list[str] = []

        def family(name: str, kind: str, help_text: str) -> None:
            lines.append("# HELP %s %s" % (name, help_text))
            lines.append("# TYPE %s %s" % (name, kind))

        def request_label_values(key: tuple) -> tuple:
            return (*key[:6], "true" if key[6] else "false")

        family("mesh_requests_total", "counter", "Requests that finished, by direction, peers, method and status code.")
        for key, record in self.requests.items():
            lines.append("mesh_requests_total%s %d" % (_labels(_REQUEST_LABELS, request_label_values(key), instance), record[0]))

        family("mesh_request_duration_seconds", "histogram", "Time from the request head to the end of the response; for a stream, to its response head.")
        for key, record in self.requests.items():
            values = request_label_values(key)
            cumulative = 0
            for bound, count in zip((*LATENCY_BUCKETS, float("inf")), record[2]):
                cumulative += count
                le = 'le="%s"' % ("+Inf" if bound == float("inf") else repr(bound))
                lines.append("mesh_request_duration_seconds_bucket%s %d" % (_labels(_REQUEST_LABELS, values, instance + "," + le), cumulative))
            labels = _labels(_REQUEST_LABELS, values, instance)
            lines.append("mesh_request_duration_seconds_sum%s %s" % (labels, _number(record[1])))
            lines.append("mesh_request_duration_seconds_count%s %d" % (labels, record[0]))

        family("mesh_requests_in_flight", "gauge", "Requests started and not yet finished.")
        for key, count in self.in_flight().items():
            lines.append("mesh_requests_in_flight%s %d" % (_labels(("direction", "destination_service"), key, instance), count))

        tcp_names = ("direction", "peer_service")
        family("mesh_tcp_connections_opened_total", "counter", "TCP connections accepted (inbound) or opened (outbound).")
        for key, record in self.tcp.items():
            lines.append("mesh_tcp_connections_opened_total%s %d" % (_labels(tcp_names, key, instance), record[0]))
        family("mesh_tcp_connections_closed_total", "counter", "TCP connections closed.")
        for key, record in self.tcp.items():
            lines.append("mesh_tcp_connections_closed_total%s %d" % (_labels(tcp_names, key, instance), record[1]))
        family("mesh_tcp_bytes_total", "counter", "Bytes of closed connections; byte_direction is received or sent by this sidecar.")
        for key, record in self.tcp.items():
            lines.append("mesh_tcp_bytes_total%s %d" % (_labels(tcp_names, key, instance + ',byte_direction="received"'), record[2]))
            lines.append("mesh_tcp_bytes_total%s %d" % (_labels(tcp_names, key, instance + ',byte_direction="sent"'), record[3]))

        destination = ("destination_service", "destination_version")
        for name, help_text, series, names in (
            ("mesh_retries_total", "Retries sent after a failed try.", self.retries, destination),
            ("mesh_timeouts_total", "Requests the mesh ended at their timeout: 504, or cut once the response had begun.", self.timeouts, destination),
            ("mesh_stream_idle_timeouts_total", "Requests the mesh ended after no byte moved for stream_idle_timeout.",
             self.stream_idle_timeouts, destination),
            ("mesh_ejections_total", "Endpoints ejected by outlier detection.", self.ejections, destination),
            ("mesh_authz_denied_total", "Requests denied by authorization policy.", self.authz_denied, ("source_service", "destination_service")),
            ("mesh_refused_connections_total", "Connections closed unserved: the peer process was not of the mesh's uid.", self.refused, ("listener", "peer_uid")),
        ):
            family(name, "counter", help_text)
            for key, count in series.items():
                lines.append("%s%s %d" % (name, _labels(names, key, instance), count))

        family("mesh_certificate_expiry_timestamp_seconds", "gauge", "When the sidecar's leaf certificate expires (unix seconds).")
        for service, not_after in self.certificate_expiry.items():
            lines.append("mesh_certificate_expiry_timestamp_seconds%s %s" % (_labels(("service",), (service,), instance), _number(not_after)))
        return "\n".join(lines) + "\n"
