"""The agent's observability hub: polls sidecars, keeps rings and traces, serves metrics.

Every second the hub sends `{"type": "stats?"}` on each sidecar's config channel; the
answers go into one `agent.stats.SnapshotRing` per instance. Sidecars also send, unasked,
`spans` batches (into one `agent.traces.TraceStore`), `access` lines (into a bounded
ring, streamed by `meshctl logs --access`), `tap-event`s and `record-event`s for the taps
and recordings opened, and `shadow-results` (handed to agent.control_shadow).

All sidecars' metrics are served merged at `http://127.0.0.1:PORT/metrics`, once a manifest
is applied: PORT is the manifest's `observability.metrics.port`, by default 9464 (taken by
something else: a free port, and a warning), so a Prometheus scrape target survives agent
restarts. Each sidecar's newest snapshot is turned back into a `proxy.metrics.Metrics` and
its exposition merged family by family, so every family has one HELP and one TYPE. Every
poll also rewrites `prometheus-targets.json` in the state directory when the sidecars'
admin endpoints changed: a Prometheus `file_sd` list for scraping each sidecar directly.

With `observability.tracing.otlp` in the manifest, every span received is also offered to
an `agent.otlp_export.OtlpExporter`.

`ask()` sends one read-out request to every sidecar and gathers their answers (`why` and
`why-plan`, matched by id), waiting at most ASK_TIMEOUT_S for a sidecar that is slow. The hub reconciles the running exporter with the
manifest whenever spans arrive and once a poll: a changed collector starts a new exporter
and lets the old one flush and end on its own; `close()` flushes the last one, bounded by
`EXPORT_FLUSH_S`, in a worker thread so the loop never waits on the collector.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from meshctl.agent.errors import AgentError
from meshctl.agent.model import OtlpExport
from meshctl.agent.otlp_export import OtlpExporter
from meshctl.agent.stats import SnapshotRing, route_stats, service_stats
from meshctl.agent.traces import SpanRecord, TraceStore
from meshctl.proxy.metrics import Metrics

if TYPE_CHECKING:
    from meshctl.agent.sidecar import SidecarHandle

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 1.0
RING_CAPACITY = 120
ACCESS_RING = 1000
STALE_AFTER_S = 30.0
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
DEFAULT_METRICS_PORT = 9464  # the port OpenTelemetry's Prometheus exporters use
FILE_SD_NAME = "prometheus-targets.json"
ASK_TIMEOUT_S = 2.0
ANSWER_TYPES = ("why", "why-plan")
EXPORT_FLUSH_S = 3.0  # how long `close()` waits for queued spans to reach the collector

Listener = Callable[[dict], None]


class MetricsPortTaken(AgentError):
    code = "metrics-port-taken"


def metrics_from_snapshot(snapshot: dict) -> Metrics:
    """A registry holding a sidecar snapshot's numbers, for its exposition."""
    metrics = Metrics(snapshot["instance"], snapshot.get("service", ""), snapshot.get("version", ""))
    metrics.requests = {tuple(row[:7]): [row[7], row[8], list(row[9])] for row in snapshot["requests"]}
    metrics.tcp = {tuple(row[:2]): list(row[2:]) for row in snapshot["tcp"]}
    for name in ("retries", "timeouts", "stream_idle_timeouts", "ejections", "authz_denied", "refused"):
        setattr(metrics, name, {tuple(row[:2]): row[2] for row in snapshot.get(name, ())})
    metrics.certificate_expiry = dict(snapshot["certificate_expiry"])
    in_flight = {tuple(row[:2]): row[2] for row in snapshot["in_flight"]}
    metrics.in_flight_source = lambda: in_flight
    return metrics


def merge_expositions(texts: Iterable[str]) -> str:
    """Several sidecars' text expositions as one: each family's HELP/TYPE once, then all samples."""
    order: list[str] = []
    headers: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for text in texts:
        family = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                family = line.split(" ", 3)[2]
                if family not in headers:
                    order.append(family)
                    headers[family] = []
                    samples[family] = []
                if len(headers[family]) < 2:
                    headers[family].append(line)
            elif line and family is not None:
                samples[family].append(line)
    out = []
    for family in order:
        out.extend(headers[family])
        out.extend(samples[family])
    return "\n".join(out) + "\n"


class Observability:
    def __init__(self, sidecars: Callable[[], list[tuple[str, SidecarHandle]]]) -> None:
        self._sidecars = sidecars
        self.rings: dict[str, SnapshotRing] = {}
        self.last_seen: dict[str, float] = {}
        self.traces = TraceStore()
        self.access: deque[dict] = deque(maxlen=ACCESS_RING)
        self.access_followers: set[Listener] = set()
        self.taps: dict[int, Listener] = {}
        self._tap_ids = itertools.count(1)
        self._asks: dict[int, tuple[int, list[dict], asyncio.Future]] = {}  # id -> (answers wanted, answers, done)
        self._ask_ids = itertools.count(1)
        self.server: asyncio.Server | None = None
        self.port: int | None = None
        self._poller: asyncio.Task | None = None
        # Called once per poll: CPU % needs two readings a known interval apart.
        self.sample_usage: Callable[[], None] | None = None
        # The manifest's OTLP collector, or None (agent.control_obs sets it).
        self.export_settings: Callable[[], OtlpExport | None] = lambda: None
        self.exporter: OtlpExporter | None = None
        # file_sd target groups of the running sidecars, and where to write them (control_obs).
        self.scrape_targets: Callable[[], list[dict]] = list
        self.file_sd_path: str | None = None
        self._written_targets: list[dict] | None = None
        # Where `shadow-results` batches go (agent.control_shadow sets it).
        self.on_shadow_results: Callable[[list[dict]], None] = lambda results: None

    def __repr__(self) -> str:
        return "<Observability %d sidecars, %r, %d taps>" % (len(self.rings), self.traces, len(self.taps))

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._poller = asyncio.get_running_loop().create_task(self._poll(), name="stats-poll")

    async def serve_metrics(self, wanted: int | None) -> str | None:
        """Serve the merged metrics on `wanted` (None: the default port, or any free one).

        Returns a warning for the user when the default port was taken. An explicit port
        that is taken raises MetricsPortTaken before anything else of the apply happens.
        """
        if self.server is not None and (wanted is None or wanted == 0 or wanted == self.port):
            return None
        warning = None
        try:
            server = await self._listen(DEFAULT_METRICS_PORT if wanted is None else wanted)
        except OSError as error:
            if error.errno != errno.EADDRINUSE:
                raise
            if wanted is not None:
                raise MetricsPortTaken(
                    "observability.metrics.port %d is in use by another process: choose another "
                    "port, or 0 for any free one" % wanted
                ) from None
            server = await self._listen(0)
            warning = "metrics: port %d is in use, serving on %d instead (set observability.metrics.port)" % (
                DEFAULT_METRICS_PORT, server.sockets[0].getsockname()[1])
            log.warning("%s", warning)
        old, self.server = self.server, server
        self.port = server.sockets[0].getsockname()[1]
        if old is not None:
            old.close()
        return warning

    async def _listen(self, port: int) -> asyncio.Server:
        return await asyncio.start_server(self._serve_http, "127.0.0.1", port)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        exporter, self.exporter = self.exporter, None
        if exporter is not None:
            exporter.stop(EXPORT_FLUSH_S)
            if not await asyncio.to_thread(exporter.join, EXPORT_FLUSH_S):
                log.warning("OTLP export: %d spans still queued at exit", exporter.counts()["queued"])

    def reconcile_export(self) -> None:
        """Run an exporter for the manifest's collector, if any; stop one for another."""
        wanted = self.export_settings()
        running = self.exporter.settings if self.exporter is not None else None
        if wanted == running:
            return
        if self.exporter is not None:
            self.exporter.stop(EXPORT_FLUSH_S)  # flushes what it holds and ends by itself
            self.exporter = None
        if wanted is not None:
            self.exporter = OtlpExporter(wanted)
            self.exporter.start()

    def export_counts(self) -> dict | None:
        """Exported, dropped and failed spans of the running exporter, or None without one."""
        return self.exporter.counts() if self.exporter is not None else None

    @property
    def url(self) -> str | None:
        return None if self.port is None else "http://127.0.0.1:%d/metrics" % self.port

    def write_file_sd(self) -> None:
        """Rewrite the file_sd list when the sidecars changed (atomically: Prometheus may read it)."""
        if self.file_sd_path is None:
            return
        targets = self.scrape_targets()
        if targets == self._written_targets:
            return
        temporary = self.file_sd_path + ".tmp"
        try:
            with open(temporary, "w", encoding="utf-8") as out:
                json.dump(targets, out, indent=1)
            os.replace(temporary, self.file_sd_path)
        except OSError as error:
            log.warning("cannot write %s: %s", self.file_sd_path, error.strerror or error)
            return
        self._written_targets = targets

    async def _poll(self) -> None:
        while True:
            for _name, handle in self._sidecars():
                handle.send({"type": "stats?"})
            if self.sample_usage is not None:
                self.sample_usage()
            self.reconcile_export()
            self.write_file_sd()
            now = time.monotonic()
            for instance in [i for i, seen in self.last_seen.items() if now - seen > STALE_AFTER_S]:
                self.rings.pop(instance, None)
                self.last_seen.pop(instance, None)
            await asyncio.sleep(POLL_INTERVAL_S)

    # -- messages from sidecars ------------------------------------------------------------

    def on_message(self, message: dict) -> None:
        kind = message.get("type")
        if kind == "stats":
            data = message["data"]
            self.rings.setdefault(data["instance"], SnapshotRing(RING_CAPACITY)).add(data)
            self.last_seen[data["instance"]] = time.monotonic()
        elif kind == "spans":
            spans = [SpanRecord.from_wire(row) for row in message.get("spans") or ()]
            self.traces.add(spans)
            self.reconcile_export()
            if self.exporter is not None:
                self.exporter.offer(spans)
        elif kind == "access":
            for event in message.get("events") or ():
                self.access.append(event)
                for follower in list(self.access_followers):
                    follower(event)
        elif kind == "shadow-results":
            self.on_shadow_results(message.get("results") or [])
        elif kind in ANSWER_TYPES:
            pending = self._asks.get(message.get("id"))  # type: ignore[arg-type]
            if pending is not None:
                wanted, answers, done = pending
                answers.append(message)
                if len(answers) >= wanted and not done.done():
                    done.set_result(None)
        elif kind == "tap-event" or kind == "record-event":
            tap_id = message.get("id")
            listener = self.taps.get(tap_id) if isinstance(tap_id, int) else None
            if listener is not None:
                listener(message["event"])

    # -- read-outs -------------------------------------------------------------------------

    def windows(self, seconds: float) -> list[tuple[dict | None, dict]]:
        out = []
        for ring in self.rings.values():
            older, newer = ring.window(seconds)
            if newer is not None:
                out.append((older, newer))
        return out

    def stat(self, seconds: float, direction: str = "inbound", routes: bool = False) -> dict[str, Any]:
        windows = self.windows(seconds)
        result: dict[str, Any] = {"services": [row.to_json() for row in service_stats(windows, direction)]}
        if routes:
            result["routes"] = [vars(route) for route in route_stats(windows)]
        return result

    # The canary promotion loop reads live numbers through this (agent.promote.StatsSource).
    def version_stats(self, service: str, version: str, window_s: float) -> tuple[int, int, float] | None:
        """(requests, errors, p99 ms) that `service@version` served over the window, or None."""
        for row in service_stats(self.windows(window_s), "inbound"):
            if row.service == service and row.version == version:
                errors = 0 if row.success_rate is None else row.requests - round(row.success_rate * row.requests)
                return row.requests, errors, row.p99_ms or 0.0
        return None

    def exposition(self) -> str:
        newest = [ring.window(0)[1] for ring in self.rings.values()]
        return merge_expositions(metrics_from_snapshot(snapshot).exposition() for snapshot in newest if snapshot is not None)

    async def ask(self, request: dict, only: Callable[[str], bool] = lambda name: True, timeout: float = ASK_TIMEOUT_S) -> list[dict]:
        """Send `request` to every sidecar whose name `only` accepts; their answers, as they came."""
        ask_id = next(self._ask_ids)
        handles = [handle for name, handle in self._sidecars() if only(name) and handle.acked_version and handle.running]
        if not handles:
            return []
        done: asyncio.Future = asyncio.get_running_loop().create_future()
        answers: list[dict] = []
        self._asks[ask_id] = (len(handles), answers, done)
        try:
            for handle in handles:
                handle.send({**request, "id": ask_id})
            await asyncio.wait_for(done, timeout)
        except asyncio.TimeoutError:
            log.info("%d of %d sidecars answered %s in time", len(answers), len(handles), request.get("type"))
        finally:
            del self._asks[ask_id]
        return list(answers)

    def open_listener(self, listener: Listener) -> int:
        """An id whose `tap-event`s and `record-event`s go to `listener` (a tap, a recording)."""
        tap_id = next(self._tap_ids)
        self.taps[tap_id] = listener
        return tap_id

    def close_listener(self, tap_id: int) -> None:
        self.taps.pop(tap_id, None)

    def open_tap(self, filter_: dict, listener: Listener) -> int:
        tap_id = self.open_listener(listener)
        for _name, handle in self._sidecars():
            handle.send({"type": "tap", "id": tap_id, "filter": filter_})
        return tap_id

    def close_tap(self, tap_id: int) -> None:
        self.close_listener(tap_id)
        for _name, handle in self._sidecars():
            handle.send({"type": "untap", "id": tap_id})

    async def _serve_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
            if target.partition(b"?")[0] == b"/metrics":
                status, body, kind = "200 OK", self.exposition().encode(), PROMETHEUS_TEXT
            else:
                status, body, kind = "404 Not Found", b"try /metrics\n", "text/plain"
            writer.write(("HTTP/1.1 %s\r\ncontent-type: %s\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % (
                status, kind, len(body))).encode() + body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()
