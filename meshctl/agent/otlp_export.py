"""Continuous OTLP export: every span the agent receives, batched, to a collector.

`observability.tracing.otlp` in the manifest (meshctl/agent/schema_observability.py) names the
collector. The agent's event loop only ever calls `OtlpExporter.offer()`, which appends to
a bounded queue under a lock and returns; one worker thread per exporter takes batches and
posts them with `agent.traces.export_otlp`, so a slow or dead collector never blocks the
loop. The parts:

* `SpanBatcher` (pure): the bounded queue and the decision when a batch is due. When the
  queue is full new spans are dropped and counted: memory stays bounded whatever the
  collector does. A batch that fails is not retried (its spans count as failed), so a
  collector that is down costs one quick attempt per interval, not a growing backlog.
* `ErrorLimiter` (pure): one log line per distinct error per minute.
* `OtlpExporter`: the worker thread; `stop()` asks it to flush what is queued and exit,
  `join(timeout)` waits for that (the agent does so off the loop at shutdown).

Header values may carry API keys: they are sent, never logged; logs name the endpoint
without user info or query.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.parse
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

from meshctl.agent.model import OtlpExport
from meshctl.agent.traces import SpanRecord, export_otlp

log = logging.getLogger(__name__)

BATCH_SPANS = 512  # a post is due at this many spans ...
BATCH_INTERVAL_S = 1.0  # ... or this long after the previous one
QUEUE_SPANS = 8192  # beyond this, spans are dropped
ERROR_LOG_PERIOD_S = 60.0
ERROR_KEYS = 256  # distinct errors remembered by the limiter


@dataclass
class ExportCounts:
    exported: int = 0  # spans the collector accepted
    dropped: int = 0  # spans never sent: the queue was full
    failed: int = 0  # spans in batches the collector refused or never answered
    queued: int = 0
    last_error: str | None = None

    def to_json(self) -> dict:
        return dict(vars(self))


class SpanBatcher:
    """A bounded queue of spans and when to send the next batch; no I/O, no clock of its own."""

    def __init__(self, capacity: int = QUEUE_SPANS, batch: int = BATCH_SPANS, interval_s: float = BATCH_INTERVAL_S) -> None:
        self.capacity = capacity
        self.batch = batch
        self.interval_s = interval_s
        self.pending: deque[SpanRecord] = deque()
        self.counts = ExportCounts()
        self.last_sent = float("-inf")

    def __repr__(self) -> str:
        return "<SpanBatcher %d/%d queued, %d exported, %d dropped, %d failed>" % (
            len(self.pending), self.capacity, self.counts.exported, self.counts.dropped, self.counts.failed)

    def offer(self, spans: Sequence[SpanRecord]) -> int:
        """Queue what fits; count the rest as dropped. Returns how many were queued."""
        room = max(0, self.capacity - len(self.pending))
        self.pending.extend(spans[:room])
        self.counts.dropped += max(0, len(spans) - room)
        return min(room, len(spans))

    def wait_s(self, now: float) -> float | None:
        """Seconds until a batch is due (0: now), or None while nothing is queued."""
        if not self.pending:
            return None
        if len(self.pending) >= self.batch:
            return 0.0
        return max(0.0, self.last_sent + self.interval_s - now)

    def take(self, now: float) -> list[SpanRecord]:
        """The next batch (oldest first); the interval restarts from `now`."""
        self.last_sent = now
        return [self.pending.popleft() for _ in range(min(self.batch, len(self.pending)))]

    def drop_all(self) -> None:
        self.counts.dropped += len(self.pending)
        self.pending.clear()

    def sent(self, count: int) -> None:
        self.counts.exported += count

    def failed(self, count: int, error: str) -> None:
        self.counts.failed += count
        self.counts.last_error = error

    def snapshot(self) -> ExportCounts:
        return ExportCounts(**{**vars(self.counts), "queued": len(self.pending)})


class ErrorLimiter:
    """Whether to log an error now: each distinct text at most once per period."""

    def __init__(self, period_s: float = ERROR_LOG_PERIOD_S, keys: int = ERROR_KEYS) -> None:
        self.period_s = period_s
        self.keys = keys
        self.logged: dict[str, float] = {}

    def allow(self, error: str, now: float) -> bool:
        last = self.logged.get(error)
        if last is not None and now - last < self.period_s:
            return False
        if len(self.logged) >= self.keys:
            self.logged = {key: at for key, at in self.logged.items() if now - at < self.period_s}
            if len(self.logged) >= self.keys:
                return False
        self.logged[error] = now
        return True


def public_endpoint(url: str) -> str:
    """The endpoint as logs may show it: no user info, no query (either may hold a key)."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = "[%s]" % host
    try:
        port = parts.port
    except ValueError:
        port = None
    return "%s://%s%s%s" % (parts.scheme, host, ":%d" % port if port else "", parts.path)


def describe_error(error: BaseException) -> str:
    """A short, secret-free text for an export failure (never the request's headers)."""
    if isinstance(error, urllib.error.HTTPError):
        return "HTTP %d %s" % (error.code, error.reason)
    if isinstance(error, urllib.error.URLError):
        reason = error.reason
        return getattr(reason, "strerror", None) or str(reason)
    if isinstance(error, TimeoutError):
        return "timed out"
    return getattr(error, "strerror", None) or type(error).__name__


class OtlpExporter:
    """Posts queued spans to one collector from a worker thread; the event loop only offers."""

    def __init__(self, settings: OtlpExport, batcher: SpanBatcher | None = None) -> None:
        self.settings = settings
        self.batcher = batcher or SpanBatcher()
        self.limiter = ErrorLimiter()
        self._wake = threading.Condition()
        self._stopping = False
        self._give_up_at = float("inf")
        self._thread = threading.Thread(target=self._run, name="otlp-export", daemon=True)

    def __repr__(self) -> str:
        return "<OtlpExporter %s %r>" % (public_endpoint(self.settings.endpoint), self.batcher)

    def start(self) -> None:
        self._thread.start()
        log.info("exporting spans to %s", public_endpoint(self.settings.endpoint))

    def offer(self, spans: Sequence[SpanRecord]) -> None:
        if not spans:
            return
        with self._wake:
            self.batcher.offer(spans)
            if self.batcher.wait_s(time.monotonic()) == 0.0:
                self._wake.notify()

    def counts(self) -> dict:
        with self._wake:
            counts = self.batcher.snapshot()
        return {"endpoint": public_endpoint(self.settings.endpoint), **counts.to_json()}

    def stop(self, flush_s: float = 3.0) -> None:
        """Send what is queued for up to `flush_s`, then end the worker; returns at once (see `join`)."""
        with self._wake:
            self._stopping = True
            self._give_up_at = time.monotonic() + flush_s
            self._wake.notify()

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` for the worker to finish; whether it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _next_batch(self) -> list[SpanRecord] | None:
        """Block until a batch is due; None once stopping with nothing left."""
        with self._wake:
            while True:
                wait = self.batcher.wait_s(time.monotonic())
                if self._stopping:
                    if wait is not None and time.monotonic() >= self._give_up_at:
                        self.batcher.drop_all()
                    return self.batcher.take(time.monotonic()) if self.batcher.pending else None
                if wait == 0.0:
                    return self.batcher.take(time.monotonic())
                self._wake.wait(wait)

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            try:
                export_otlp(batch, self.settings.endpoint, self.settings.timeout_s, dict(self.settings.headers))
            except Exception as error:  # the collector's problem must never end the worker
                self._failed(len(batch), describe_error(error), error)
            else:
                with self._wake:
                    self.batcher.sent(len(batch))

    def _failed(self, count: int, text: str, error: BaseException) -> None:
        with self._wake:
            self.batcher.failed(count, text)
        if self.limiter.allow(text, time.monotonic()):
            expected = isinstance(error, (OSError, ValueError))  # URLError, HTTPError, timeouts are OSErrors
            log.warning("OTLP export to %s failed: %s (%d spans lost; this error is logged once a minute)",
                        public_endpoint(self.settings.endpoint), text, count, exc_info=not expected)
