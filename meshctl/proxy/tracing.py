"""Trace context: read W3C and B3 headers, decide sampling, write the next hop's headers.

Pure and stdlib only. Each sidecar hop is one span: it takes the incoming span id as its
parent, makes a new span id, and sends that id onwards, so

    ingress (starts the trace) -> cart's inbound sidecar -> cart app
        -> cart's outbound sidecar -> catalog's inbound sidecar -> catalog app

is a chain of parent links. The hop from an app's inbound request to its outbound calls
is only linked when the app copies the trace headers across (the demo services do); a
sidecar cannot know which outgoing call an incoming request caused.

Formats read, in order of preference: `traceparent` (+ `tracestate`), single-header
`b3`, then `x-b3-traceid`/`x-b3-spanid`/`x-b3-sampled`/`x-b3-flags`. The next hop always
gets `traceparent`, plus the B3 form that arrived (`b3` when the trace starts here), so
apps instrumented for either keep working.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping

TRACE_HEADERS = (
    b"traceparent",
    b"tracestate",
    b"b3",
    b"x-b3-traceid",
    b"x-b3-spanid",
    b"x-b3-parentspanid",
    b"x-b3-sampled",
    b"x-b3-flags",
)
W3C = "w3c"
B3_SINGLE = "b3"
B3_MULTI = "b3multi"
INBOUND = "inbound"
OUTBOUND = "outbound"

_HEX = frozenset("0123456789abcdef")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
MAX_TRACESTATE = 512


def _is_hex(value: str, length: int) -> bool:
    return len(value) == length and set(value) <= _HEX


def new_trace_id() -> str:
    return os.urandom(16).hex()


def new_span_id() -> str:
    return os.urandom(8).hex()


class Incoming:
    """The trace context a request arrived with; `span_id` is the caller's span."""

    __slots__ = ("trace_id", "span_id", "sampled", "tracestate", "format")

    def __init__(self, trace_id: str, span_id: str, sampled: bool | None, tracestate: str | None, format: str) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.sampled = sampled  # None: the caller left the decision to us
        self.tracestate = tracestate
        self.format = format

    def __repr__(self) -> str:
        return "<Incoming %s %s/%s sampled=%s>" % (self.format, self.trace_id, self.span_id, self.sampled)


def parse_traceparent(value: str) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) of a valid W3C traceparent, else None."""
    parts = value.strip().lower().split("-")
    if len(parts) < 4:
        return None
    version, trace_id, span_id, flags = parts[0], parts[1], parts[2], parts[3]
    if not _is_hex(version, 2) or version == "ff":
        return None
    if version == "00" and len(parts) != 4:
        return None
    if not _is_hex(trace_id, 32) or trace_id == _ZERO_TRACE:
        return None
    if not _is_hex(span_id, 16) or span_id == _ZERO_SPAN:
        return None
    if not _is_hex(flags, 2):
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def _b3_trace_id(value: str) -> str | None:
    value = value.lower()
    if len(value) == 16:
        value = "0" * 16 + value  # 64-bit B3 ids are the low half of a W3C id
    return value if _is_hex(value, 32) and value != _ZERO_TRACE else None


def _b3_sampled(value: str | None) -> bool | None:
    if value is None or value == "":
        return None
    if value in ("1", "d", "true"):
        return True
    if value in ("0", "false"):
        return False
    return None


def parse_b3_single(value: str) -> tuple[str, str, bool | None] | None:
    """(trace id, span id, sampled) of `b3: {trace}-{span}[-{sampled}[-{parent}]]`, else None.

    A bare sampling decision (`b3: 0`) carries no ids and yields None; the caller's
    decision is still honoured through `sampling_only_b3`.
    """
    parts = value.strip().split("-")
    if len(parts) < 2 or len(parts) > 4:
        return None
    trace_id = _b3_trace_id(parts[0])
    span_id = parts[1].lower()
    if trace_id is None or not _is_hex(span_id, 16):
        return None
    sampled = _b3_sampled(parts[2]) if len(parts) >= 3 else None
    if len(parts) >= 3 and parts[2] not in ("0", "1", "d"):
        return None
    return trace_id, span_id, sampled


def sampling_only_b3(value: str) -> bool | None:
    return _b3_sampled(value.strip()) if value.strip() in ("0", "1", "d") else None


def extract(get: Callable[[bytes], bytes | None]) -> Incoming | None:
    """The incoming trace context; `get(name)` returns a header value (lower-case names)."""
    traceparent = get(b"traceparent")
    if traceparent is not None:
        parsed = parse_traceparent(traceparent.decode("latin-1"))
        if parsed is not None:
            tracestate = get(b"tracestate")
            state = tracestate.decode("latin-1")[:MAX_TRACESTATE] if tracestate else None
            return Incoming(parsed[0], parsed[1], parsed[2], state, W3C)
    b3 = get(b"b3")
    if b3 is not None:
        parsed_b3 = parse_b3_single(b3.decode("latin-1"))
        if parsed_b3 is not None:
            return Incoming(parsed_b3[0], parsed_b3[1], parsed_b3[2], None, B3_SINGLE)
    trace_id = get(b"x-b3-traceid")
    span_id = get(b"x-b3-spanid")
    if trace_id is not None and span_id is not None:
        trace = _b3_trace_id(trace_id.decode("latin-1"))
        span = span_id.decode("latin-1").lower()
        if trace is not None and _is_hex(span, 16):
            flags = get(b"x-b3-flags")
            sampled_header = get(b"x-b3-sampled")
            sampled = True if flags == b"1" else _b3_sampled(sampled_header.decode("latin-1") if sampled_header else None)
            return Incoming(trace, span, sampled, None, B3_MULTI)
    return None


def headers_from_mapping(headers: Mapping[str, str]) -> Callable[[bytes], bytes | None]:
    """Adapts a str mapping (tests, the agent) to `extract`'s byte getter."""
    lowered = {name.lower(): value for name, value in headers.items()}

    def get(name: bytes) -> bytes | None:
        value = lowered.get(name.decode("latin-1"))
        return value.encode("latin-1") if value is not None else None

    return get


class Sampler:
    """Head sampling for traces that start here; a caller's decision always wins."""

    def __init__(self, rate: float, rng: Callable[[], float] = random.random) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError("sampling rate must be within 0..1, got %r" % rate)
        self.rate = rate
        self._rng = rng

    def decide(self, incoming: Incoming | None) -> bool:
        if incoming is not None and incoming.sampled is not None:
            return incoming.sampled
        return self.rate >= 1.0 or (self.rate > 0.0 and self._rng() < self.rate)


class Hop:
    """This sidecar's span for one request, and the headers for the next hop."""

    __slots__ = ("trace_id", "span_id", "parent_id", "sampled", "tracestate", "format")

    def __init__(self, trace_id: str, span_id: str, parent_id: str | None, sampled: bool, tracestate: str | None, format: str) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.sampled = sampled
        self.tracestate = tracestate
        self.format = format

    def __repr__(self) -> str:
        return "<Hop %s/%s parent=%s sampled=%s>" % (self.trace_id, self.span_id, self.parent_id, self.sampled)

    def headers(self) -> list[tuple[bytes, bytes]]:
        """Replace every incoming trace header (TRACE_HEADERS) with these."""
        flag = b"01" if self.sampled else b"00"
        trace = self.trace_id.encode("ascii")
        span = self.span_id.encode("ascii")
        out = [(b"traceparent", b"00-%s-%s-%s" % (trace, span, flag))]
        if self.tracestate:
            out.append((b"tracestate", self.tracestate.encode("latin-1")))
        sampled = b"1" if self.sampled else b"0"
        if self.format == B3_MULTI:
            out.append((b"x-b3-traceid", trace))
            out.append((b"x-b3-spanid", span))
            if self.parent_id:
                out.append((b"x-b3-parentspanid", self.parent_id.encode("ascii")))
            out.append((b"x-b3-sampled", sampled))
        elif self.format == B3_SINGLE:
            value = b"%s-%s-%s" % (trace, span, sampled)
            if self.parent_id:
                value += b"-" + self.parent_id.encode("ascii")
            out.append((b"b3", value))
        return out


def next_hop(incoming: Incoming | None, sampler: Sampler, span_id: str | None = None, trace_id: str | None = None) -> Hop:
    """Continue the incoming trace, or start one (then B3 single is sent alongside W3C)."""
    sampled = sampler.decide(incoming)
    span = span_id or new_span_id()
    if incoming is None:
        return Hop(trace_id or new_trace_id(), span, None, sampled, None, B3_SINGLE)
    return Hop(incoming.trace_id, span, incoming.span_id, sampled, incoming.tracestate, incoming.format)


class Span:
    """A finished hop, compact for batching to the agent (`to_wire` is a JSON list)."""

    __slots__ = ("trace_id", "span_id", "parent_id", "service", "instance", "name", "start", "duration", "status", "direction")

    def __init__(
        self,
        trace_id: str,
        span_id: str,
        parent_id: str | None,
        service: str,
        instance: str,
        name: str,
        start: float,
        duration: float,
        status: int,
        direction: str,
    ) -> None:
        self.trace_id = trace_id
        self.span_id = span_id
        self.parent_id = parent_id
        self.service = service
        self.instance = instance
        self.name = name  # "GET /items/:id"
        self.start = start  # unix seconds
        self.duration = duration  # seconds
        self.status = status
        self.direction = direction

    def __repr__(self) -> str:
        return "<Span %s %s %s %d %.1fms>" % (self.span_id, self.service, self.name, self.status, self.duration * 1000)

    def to_wire(self) -> list:
        return [self.trace_id, self.span_id, self.parent_id, self.service, self.instance, self.name, self.start, self.duration, self.status, self.direction]

    @classmethod
    def from_wire(cls, row: list) -> Span:
        return cls(*row)


class SpanBuffer:
    """Finished spans waiting for the next flush to the agent; bounded, drops the newest."""

    def __init__(self, capacity: int = 2048) -> None:
        self.capacity = capacity
        self.spans: list[Span] = []
        self.dropped = 0

    def __repr__(self) -> str:
        return "<SpanBuffer %d/%d, %d dropped>" % (len(self.spans), self.capacity, self.dropped)

    def add(self, span: Span) -> None:
        if len(self.spans) >= self.capacity:
            self.dropped += 1
            return
        self.spans.append(span)

    def drain(self) -> list[list]:
        """The wire rows of every buffered span; the buffer is empty afterwards."""
        spans, self.spans = self.spans, []
        return [span.to_wire() for span in spans]
