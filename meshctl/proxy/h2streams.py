"""What an H2Proxy and its caller tell each other about one stream.

The caller (proxy.dispatch) decides where each stream goes: its `pick_upstream(headers)`
returns an `UpstreamChoice` or raises proxy.errors.MeshError (answered on that stream); the proxy keeps a `StreamRecord` per
downstream stream and hands it to the caller's `record` callback once, when the stream ends.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any

from meshctl.proxy.h2conn import HeaderList, is_grpc

__all__ = ["PickUpstream", "Record", "StreamRecord", "UpstreamChoice", "as_choice"]

log = logging.getLogger("proxy.h2proxy")


class UpstreamChoice:
    """Where one stream goes, as `pick_upstream(headers)` decides (a plain 3-tuple also works).

    `context` is the mesh's TLS context when the upstream is a peer sidecar (whose headers are
    then not validated again, see H2Endpoint); `verify(transport)` checks the upstream's
    identity after the TLS handshake (raises to refuse it); `timeout` caps the stream together with grpc-timeout;
    `idle_timeout` ends it once no byte moved either way for that long (proxy.idle); `retries` is how many
    more tries a trailers-only retriable gRPC answer may get; `tag` comes back to `record`.
    `settle(ok)` runs once when this choice's try ends (the balancer's in-flight count and
    outlier detection): ok False for a failed connect, UNAVAILABLE or a 502/503, None when
    the try says nothing about the upstream (the client went away, a deadline). `http1`: the
    upstream is an app that speaks only HTTP/1.1, reached through proxy.h1bridge. `service`,
    `action` and `endpoint` are the routing decision (proxy.snapshot.Service, proxy.routing.RouteAction,
    proxy.balance.Endpoint), kept by reference for the stream's decision record (proxy.decisions).
    """

    __slots__ = ("host", "port", "context", "verify", "timeout", "idle_timeout", "retries", "backoff", "tag", "settle", "http1",
                 "service", "action", "endpoint")

    def __init__(
        self, host: str, port: int, context: ssl.SSLContext | None = None, verify: Callable | None = None,
        timeout: float | None = None, retries: int = 0, backoff: float = 0.025, tag: object = None,
        settle: Callable[[bool | None], None] | None = None, idle_timeout: float | None = None, http1: bool = False,
        service: Any = None, action: Any = None, endpoint: Any = None,
    ) -> None:
        self.host = host
        self.port = port
        self.context = context
        self.verify = verify
        self.timeout = timeout
        self.idle_timeout = idle_timeout
        self.retries = retries
        self.backoff = backoff
        self.tag = tag
        self.settle = settle
        self.http1 = http1
        self.service = service
        self.action = action
        self.endpoint = endpoint

    def settled(self, ok: bool | None) -> None:
        settle, self.settle = self.settle, None
        if settle is not None:
            try:
                settle(ok)
            except Exception:
                log.exception("settling an HTTP/2 upstream choice failed")


PickUpstream = Callable[[HeaderList], "UpstreamChoice | tuple"]


class StreamRecord:
    """One downstream stream for metrics, retries, its deadline and its decision record."""

    __slots__ = ("stream_id", "headers", "choice", "started", "grpc", "responded", "answered", "replay", "replay_size",
                 "request_complete", "retries_left", "timer", "done", "upstream", "up_stream", "idle_timer", "idle", "head_at", "cut",
                 "error", "try_started", "trail")

    def __init__(self, stream_id: int, headers: HeaderList, choice: UpstreamChoice, started: float) -> None:
        self.stream_id = stream_id
        self.headers = headers
        self.choice = choice
        self.started = started
        self.grpc = is_grpc(headers)
        self.responded = False  # a response head went downstream: no retry any more
        self.answered: bytes | None = None  # that head's :status
        self.replay: list[bytes] | None = [] if choice.retries else None
        self.replay_size = 0
        self.request_complete = False
        self.retries_left = choice.retries
        self.timer: asyncio.TimerHandle | None = None
        self.done = False
        self.upstream: Any = None  # the upstream side of h2proxy carrying the current try
        self.up_stream = 0
        self.idle_timer: asyncio.TimerHandle | None = None
        self.idle: Any = None  # a proxy.idle.IdleCheck from the first idle check on
        self.head_at = 0.0  # when a response without a declared length (a stream) began: its latency
        self.cut: str | None = None  # "timeout" or "stream-idle-timeout" when the proxy ended the stream
        self.error: str | None = None  # the x-mesh-error code when the proxy answered or ended the stream itself
        self.try_started = started
        self.trail: list | None = None  # the tries retried before the current one (proxy.decisions), rare


Record = Callable[[StreamRecord, int, "int | None", bool], None]


def as_choice(picked: UpstreamChoice | tuple) -> UpstreamChoice:
    return picked if isinstance(picked, UpstreamChoice) else UpstreamChoice(*picked)


def stream_retried(stream: StreamRecord, tried: UpstreamChoice, grpc_code: int | None, now: float, backoff: float | None) -> None:
    """A trailers-only retriable gRPC answer on `tried` is retried after `backoff` (None: no endpoint left to pick)."""
    trail = stream.trail
    if trail is None:
        trail = stream.trail = []
    trail.append((tried.endpoint, stream.try_started, now, grpc_code, backoff))
