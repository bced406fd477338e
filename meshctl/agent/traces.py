"""Recent traces in the agent: a bounded store, trace trees, a terminal waterfall, OTLP export.

Sidecars batch finished spans (proxy.tracing.Span wire rows) to the agent over the config
channel. The agent keeps the most recently touched `max_traces` traces, each capped at
`max_spans` spans, so memory stays bounded whatever the load. A trace tree links spans by
parent id; a span whose parent never arrived (the app did not forward the headers, or the
parent was dropped) becomes a root of its own, so a partial trace still renders.

`otlp_payload` builds an OTLP/HTTP JSON request body (ExportTraceServiceRequest);
`export_otlp` posts it with one urllib call to a configured collector URL (on demand, or
continuously from agent.otlp_export's worker thread).
"""

from __future__ import annotations

import json
import urllib.request
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from rich.table import Table
from rich.text import Text

DEFAULT_MAX_TRACES = 1000
DEFAULT_MAX_SPANS = 256
WIRE_FIELDS = ("trace_id", "span_id", "parent_id", "service", "instance", "name", "start", "duration", "status", "direction")
_OTLP_SPAN_KIND = {"inbound": 2, "outbound": 3}  # SERVER, CLIENT
_OTLP_STATUS_ERROR = 2


@dataclass(frozen=True)
class SpanRecord:
    trace_id: str
    span_id: str
    parent_id: str | None
    service: str
    instance: str
    name: str
    start: float
    duration: float
    status: int
    direction: str

    @classmethod
    def from_wire(cls, row: Sequence) -> SpanRecord:
        if len(row) != len(WIRE_FIELDS):
            raise ValueError("a span row has %d fields, expected %d" % (len(row), len(WIRE_FIELDS)))
        return cls(*row)

    @property
    def failed(self) -> bool:
        return self.status >= 500


@dataclass
class SpanNode:
    span: SpanRecord
    children: list[SpanNode] = field(default_factory=list)


class TraceStore:
    """The recent traces, least recently touched evicted first."""

    def __init__(self, max_traces: int = DEFAULT_MAX_TRACES, max_spans: int = DEFAULT_MAX_SPANS) -> None:
        self.max_traces = max_traces
        self.max_spans = max_spans
        self._traces: OrderedDict[str, dict[str, SpanRecord]] = OrderedDict()
        self.dropped_spans = 0

    def __repr__(self) -> str:
        return "<TraceStore %d/%d traces>" % (len(self._traces), self.max_traces)

    def __len__(self) -> int:
        return len(self._traces)

    def add_wire(self, rows: Iterable[Sequence]) -> None:
        self.add(SpanRecord.from_wire(row) for row in rows)

    def add(self, spans: Iterable[SpanRecord]) -> None:
        traces = self._traces
        for span in spans:
            trace = traces.get(span.trace_id)
            if trace is None:
                trace = traces[span.trace_id] = {}
                if len(traces) > self.max_traces:
                    traces.popitem(last=False)
            else:
                traces.move_to_end(span.trace_id)
            if len(trace) >= self.max_spans and span.span_id not in trace:
                self.dropped_spans += 1
                continue
            trace[span.span_id] = span

    def spans(self, trace_id: str) -> list[SpanRecord]:
        return sorted(self._traces.get(trace_id, {}).values(), key=lambda s: s.start)

    def find(self, prefix: str) -> list[str]:
        """Trace ids starting with `prefix` (users paste the 8 characters logs show)."""
        prefix = prefix.lower()
        return [trace_id for trace_id in self._traces if trace_id.startswith(prefix)]

    def summaries(self, limit: int = 20, service: str | None = None) -> list[dict]:
        """The newest traces first: root name, services, span count, duration, errors."""
        out = []
        for trace_id in reversed(self._traces):
            spans = self.spans(trace_id)
            if service is not None and all(span.service != service for span in spans):
                continue
            start = spans[0].start
            end = max(span.start + span.duration for span in spans)
            roots = build_tree(spans)
            out.append(
                {
                    "trace_id": trace_id,
                    "root": "%s %s" % (roots[0].span.service, roots[0].span.name),
                    "services": sorted({span.service for span in spans}),
                    "spans": len(spans),
                    "start": start,
                    "duration_ms": round((end - start) * 1000, 3),
                    "errors": sum(1 for span in spans if span.failed),
                }
            )
            if len(out) >= limit:
                break
        return out

    def tree(self, trace_id: str) -> list[SpanNode]:
        return build_tree(self.spans(trace_id))


def build_tree(spans: Sequence[SpanRecord]) -> list[SpanNode]:
    """Roots (spans without a known parent) with their children, each level by start time."""
    nodes = {span.span_id: SpanNode(span) for span in spans}
    roots = []
    for node in sorted(nodes.values(), key=lambda n: n.span.start):
        parent = nodes.get(node.span.parent_id) if node.span.parent_id else None
        if parent is None or parent is node:
            roots.append(node)
        else:
            parent.children.append(node)
    return roots


def _walk(nodes: Sequence[SpanNode], depth: int = 0) -> Iterable[tuple[int, SpanRecord]]:
    for node in nodes:
        yield depth, node.span
        yield from _walk(node.children, depth + 1)


def render_waterfall(roots: Sequence[SpanNode], bar_width: int = 30) -> Table:
    """One row per span: indented service and name, status, duration, and a bar on the trace's time axis."""
    rows = list(_walk(roots))
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("SPAN", no_wrap=True, overflow="ellipsis", ratio=1)
    table.add_column("CODE", justify="right", no_wrap=True)
    table.add_column("MS", justify="right", no_wrap=True)
    table.add_column("TIMELINE", no_wrap=True, width=bar_width)
    if not rows:
        return table
    start = min(span.start for _, span in rows)
    end = max(span.start + span.duration for _, span in rows)
    total = max(end - start, 1e-9)
    for depth, span in rows:
        offset = int((span.start - start) / total * bar_width)
        length = max(1, round(span.duration / total * bar_width))
        offset = min(offset, bar_width - 1)
        length = min(length, bar_width - offset)
        style = "red" if span.failed else ("cyan" if span.direction == "inbound" else "magenta")
        bar = Text(" " * offset) + Text("█" * length, style=style)
        arrow = "→" if span.direction == "outbound" else "←"
        label = Text("  " * depth + arrow + " ") + Text(span.service, style="bold") + Text(" " + span.name)
        code = Text(str(span.status), style="red" if span.failed else "")
        table.add_row(label, code, "%.1f" % (span.duration * 1000), bar)
    return table


def _nanos(seconds: float) -> str:
    return str(int(round(seconds * 1e9)))


def otlp_payload(spans: Iterable[SpanRecord]) -> dict:
    """An OTLP/JSON ExportTraceServiceRequest: one resourceSpans entry per service (ids as hex)."""
    by_service: dict[str, list[dict]] = {}
    for span in spans:
        otlp = {
            "traceId": span.trace_id,
            "spanId": span.span_id,
            "name": span.name,
            "kind": _OTLP_SPAN_KIND.get(span.direction, 1),
            "startTimeUnixNano": _nanos(span.start),
            "endTimeUnixNano": _nanos(span.start + span.duration),
            "attributes": [
                {"key": "http.response.status_code", "value": {"intValue": str(span.status)}},
                {"key": "mesh.instance", "value": {"stringValue": span.instance}},
                {"key": "mesh.direction", "value": {"stringValue": span.direction}},
            ],
            "status": {"code": _OTLP_STATUS_ERROR} if span.failed else {},
        }
        if span.parent_id:
            otlp["parentSpanId"] = span.parent_id
        by_service.setdefault(span.service, []).append(otlp)
    return {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": service}}]},
                "scopeSpans": [{"scope": {"name": "meshctl"}, "spans": otlp_spans}],
            }
            for service, otlp_spans in by_service.items()
        ]
    }


def export_otlp(spans: Iterable[SpanRecord], url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> int:
    """POST the spans to an OTLP/HTTP collector (`http://host:4318/v1/traces`); the HTTP status.

    `headers` (an API key, say) are added to the request; a status >= 400 raises HTTPError.
    """
    body = json.dumps(otlp_payload(spans), separators=(",", ":")).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={**(headers or {}), "content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        response.read()  # the connection closes cleanly once the body is consumed
        return response.status
