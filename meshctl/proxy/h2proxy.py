"""The HTTP/2 proxy driver: one downstream h2 connection, each stream proxied upstream.

`H2Proxy` is an asyncio Protocol for one downstream connection (h2c from an app, or h2
over TLS from a peer sidecar once ALPN chose `h2`). Each request stream is mapped to a
stream on an upstream HTTP/2 connection picked by `pick_upstream(headers)`; connections
to the same upstream are shared by all streams of the downstream connection. Headers pass
through without connection-specific fields, data respects both windows, trailers (which
gRPC needs for grpc-status) and resets are forwarded. An upstream that cannot be reached
answers 502 (or, to a gRPC client, a trailers-only UNAVAILABLE). Per stream: a deadline
(route timeout capped by grpc-timeout), a stream idle timeout (proxy.idle), retries of
trailers-only retriable gRPC answers, and one `record` call when it ends. The protocol logic is proxy.h2conn's `H2Endpoint`.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from collections.abc import Callable
from typing import Any

from meshctl.proxy.connect import create_connection
from meshctl.proxy.errors import (
    GRPC_CANCELLED,
    GRPC_DEADLINE_EXCEEDED,
    GRPC_UNAVAILABLE,
    MeshError,
    grpc_error_head,
    grpc_error_trailers,
    h2_error_head,
    http_status,
)
from meshctl.proxy.h1bridge import H1Endpoint
from meshctl.proxy.h2conn import (
    GRPC_RETRIABLE,
    ConnectionEnded,
    Data,
    ErrorCodes,
    Event,
    H2Endpoint,
    H2ProtocolError,
    HeaderList,
    Headers,
    StreamEnded,
    StreamReset,
    Trailers,
    WindowOpened,
    grpc_as_http,
    grpc_status,
    grpc_timeout,
    header,
    is_grpc,
    strip_connection_specific,
)
from meshctl.proxy.h2streams import (
    PickUpstream,
    Record,
    StreamRecord,
    UpstreamChoice,
    as_choice,
    stream_retried,
)
from meshctl.proxy.idle import STREAM_IDLE_TIMEOUT_CODE, IdleCheck, first_check

__all__ = ["H2Proxy"]

log = logging.getLogger("proxy.h2proxy")

CONNECT_TIMEOUT_S = 2.0


_END = object()
MAX_REPLAY_BYTES = 64 * 1024  # request bytes kept per stream so that a retry can resend them


class _Pipe:
    """One direction of one proxied stream: items waiting for the target's send window."""

    __slots__ = ("source", "source_stream", "target", "target_stream", "queue", "closed", "grpc", "acknowledges", "moved")

    def __init__(self, source: _Side, source_stream: int, target: _Side, target_stream: int) -> None:
        self.source = source
        self.source_stream = source_stream
        self.target = target
        self.target_stream = target_stream
        self.queue: collections.deque = collections.deque()
        self.closed = False
        self.grpc = False  # the stream carries gRPC: errors we generate are gRPC statuses
        self.acknowledges = True  # False for a retry's replayed bytes: the source got its window back already
        self.moved = 0  # bytes received from the source, for the stream idle timeout

    def flush(self) -> None:
        """Send what the windows allow; acknowledge to the source only what went out."""
        endpoint = self.target.endpoint
        while self.queue and not self.closed:
            item = self.queue[0]
            if isinstance(item, bytes):
                sent = endpoint.send_data(self.target_stream, item)
                if sent and self.acknowledges:
                    self.source.endpoint.acknowledge(self.source_stream, sent)
                if sent < len(item):
                    if sent:
                        self.queue[0] = item[sent:]
                    break
            elif item is _END:
                endpoint.end_stream(self.target_stream)
                self.closed = True
            else:
                endpoint.send_trailers(self.target_stream, item)
                self.closed = True
            self.queue.popleft()
        if self.closed:
            self.target.forget(self.target_stream)
        self.target.flush()
        self.source.flush()

    def unsent(self) -> int:
        return sum(len(item) for item in self.queue if isinstance(item, bytes))


class _Side(asyncio.Protocol):
    """A connection of the proxy (downstream, or one upstream) with its endpoint and pipes."""

    def __init__(self, proxy: H2Proxy, client_side: bool, label: str, peer_sidecar: bool = False, endpoint: Any = None) -> None:
        self.proxy = proxy
        self.label = label
        self.endpoint = endpoint if endpoint is not None else H2Endpoint(client_side, peer_sidecar)
        self.transport: asyncio.Transport | None = None
        self.outgoing: dict[int, _Pipe] = {}  # our stream id -> the pipe writing to it
        self.incoming: dict[int, _Pipe] = {}  # our stream id -> the pipe reading from it
        self.lost = False

    def __repr__(self) -> str:
        return "<%s %s>" % (type(self).__name__, self.label)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.flush()

    def flush(self) -> None:
        """Write what the endpoint has, or, while a read is being handled, mark it for the end.

        One read can carry many frames, each touching both sides of its stream; writing per
        frame cost ~20 write syscalls (and TLS records) per read. Batching makes it one write
        per side per read.
        """
        proxy = self.proxy
        if proxy.dirty is not None:
            proxy.dirty[self] = None
        else:
            self.write_now()

    def write_now(self) -> None:
        if self.transport is not None and not self.lost:
            endpoint = self.endpoint
            data = endpoint.data_to_send()
            if data:
                self.transport.write(data)
            if endpoint.waiting and endpoint.streams_opened():
                self.window_opened(0)  # a held-back stream went out: its queued body may follow

    def data_received(self, data: bytes) -> None:
        proxy = self.proxy
        outermost = proxy.dirty is None
        if outermost:
            proxy.dirty = {}
        try:
            self._handle(data)
        finally:
            if outermost:
                dirty, proxy.dirty = proxy.dirty, None
                self.write_now()
                for side in dirty or ():
                    side.write_now()

    def _handle(self, data: bytes) -> None:
        try:
            events = self.endpoint.receive(data)
        except H2ProtocolError as exc:
            log.info("%s: HTTP/2 protocol error: %s", self.label, exc)
            self.write_now()
            self.transport.close()  # type: ignore[union-attr]
            return
        for event in events:
            self.proxy.on_event(self, event)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.proxy.side_lost(self)

    def forget(self, stream_id: int) -> None:
        """Drop a stream's bookkeeping once both of its directions are finished."""
        pipe = self.outgoing.get(stream_id)
        if pipe is not None and pipe.closed and stream_id not in self.incoming:
            del self.outgoing[stream_id]

    def window_opened(self, stream_id: int) -> None:
        pipes = self.outgoing.values() if stream_id == 0 else [p for p in (self.outgoing.get(stream_id),) if p]
        for pipe in list(pipes):
            pipe.flush()


class _H1Side(_Side):
    """An upstream HTTP/1.1 connection carrying one stream to an app that speaks only HTTP/1.1 (proxy.h1bridge)."""

    def __init__(self, proxy: H2Proxy, label: str) -> None:
        super().__init__(proxy, client_side=True, label=label, endpoint=H1Endpoint())
        self.endpoint.resume = self._resume_reading

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        endpoint = self.endpoint
        if endpoint.over_window and not endpoint.paused and self.transport is not None and not self.lost:
            endpoint.paused = True  # the HTTP/2 client reads slower than the app answers
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self.transport is not None and not self.lost:
            self.transport.resume_reading()

    def write_now(self) -> None:
        super().write_now()
        if self.endpoint.finished and self.transport is not None and not self.lost:
            self.transport.close()  # one exchange per connection: what is written still goes out

    def eof_received(self) -> bool:
        try:
            events = self.endpoint.receive_eof()
        except H2ProtocolError as exc:
            log.info("%s: %s", self.label, exc)
            events = []
        for event in events:
            self.proxy.on_event(self, event)
        self.proxy.flush()
        return False


class H2Proxy(_Side):
    """The downstream connection's protocol: serves HTTP/2 and proxies each stream upstream.

    Each stream is balanced on its own (`pick_upstream` runs per stream); streams to the
    same (host, port, context) share one upstream connection per downstream connection.
    `record(stream, status, grpc_code, mesh_error)` runs once per stream when it ends, however
    it ends; for gRPC `status` is the HTTP equivalent of grpc-status (`grpc_as_http`).
    `service` names the destination in errors answered before a stream has one (proxy.errors).
    """

    def __init__(
        self, pick_upstream: PickUpstream, loop: asyncio.AbstractEventLoop | None = None, record: Record | None = None,
        on_closed: Callable[[H2Proxy], None] | None = None, peer_sidecar: bool = False, service: str = "-",
        request_ids: Callable[[], bytes] | None = None, echo_request_ids: bool = True,
    ) -> None:
        self.dirty: dict[_Side, None] | None = None  # sides to write once the current read is handled
        super().__init__(self, client_side=False, label="downstream", peer_sidecar=peer_sidecar)
        self.on_closed = on_closed
        self.service = service
        # Give a request without x-request-id one (the ingress, an app's outbound calls), and, at
        # the ingress (`echo_request_ids`), echo it on the app's answer; the mesh's own answers always carry it.
        self.request_ids = request_ids
        self.echo_request_ids = echo_request_ids and request_ids is not None
        self.draining = False
        self.pick_upstream = pick_upstream
        self.loop = loop or asyncio.get_running_loop()
        self.record = record
        self.upstreams: dict[tuple[str, int, int], _Side] = {}
        self.records: dict[int, StreamRecord] = {}  # downstream stream id -> its record
        self.streams = 0  # requests proxied, for tests and metrics
        self.retried = 0
        self.closed = asyncio.Event()

    def on_event(self, side: _Side, event: Event) -> None:
        if isinstance(event, WindowOpened):
            side.window_opened(event.stream_id)
        elif side is self and isinstance(event, Headers):
            self._open_stream(event)
        elif isinstance(event, Headers):
            pipe = side.incoming.get(event.stream_id)
            if pipe is not None:
                record = self.records.get(pipe.target_stream)
                if record is not None and event.end_stream and self._retry_trailers_only(record, side, event):
                    return
                # end_stream here is a trailers-only response: it must stay one HEADERS frame.
                answer = strip_connection_specific(event.headers)
                if self.echo_request_ids and record is not None and header(answer, b"x-request-id") is None:
                    answer.append((b"x-request-id", header(record.headers, b"x-request-id") or b""))
                pipe.target.endpoint.send_response(pipe.target_stream, answer, event.end_stream)
                pipe.closed = event.end_stream
                pipe.target.forget(pipe.target_stream)
                pipe.target.flush()
                if record is not None:
                    record.responded = True
                    record.answered = header(event.headers, b":status")
                    if not event.end_stream and header(event.headers, b"content-length") is None:
                        record.head_at = self.loop.time()  # a stream: its latency is the time to this head
                    if event.end_stream:
                        self._finish(record, event.headers)
        elif isinstance(event, Data):
            pipe = side.incoming.get(event.stream_id)
            padding = event.flow_length - len(event.data)
            side.endpoint.acknowledge(event.stream_id, padding if pipe is not None else event.flow_length)
            if pipe is not None and event.data:
                if side is self:
                    self._keep_for_replay(event.stream_id, event.data)
                pipe.moved += len(event.data)
                pipe.queue.append(event.data)
                pipe.flush()
        elif isinstance(event, Trailers):
            pipe = side.incoming.get(event.stream_id)
            if pipe is not None:
                pipe.queue.append(strip_connection_specific(event.headers))
                pipe.flush()
                record = self.records.get(pipe.target_stream)
                if record is not None:
                    self._finish(record, event.headers)
        elif isinstance(event, StreamEnded):
            pipe = side.incoming.pop(event.stream_id, None)
            if pipe is not None and not pipe.closed:
                if not (pipe.queue and isinstance(pipe.queue[-1], list)):  # trailers end the stream themselves
                    pipe.queue.append(_END)
                pipe.flush()
            if side is self:
                record = self.records.get(event.stream_id)
                if record is not None:
                    record.request_complete = True
            elif pipe is not None:
                record = self.records.get(pipe.target_stream)
                if record is not None and not record.done:
                    self._finish(record, None)
            side.forget(event.stream_id)
        elif isinstance(event, StreamReset):
            self._reset_peer(side, event.stream_id, event.error_code)
        elif isinstance(event, ConnectionEnded):
            if side is not self:
                for stream_id in list(side.incoming):
                    if stream_id > event.last_stream_id:
                        self._reset_peer(side, stream_id, ErrorCodes.REFUSED_STREAM)
                self.upstreams = {key: up for key, up in self.upstreams.items() if up is not side}

    # -- opening streams and retrying them ------------------------------------------------

    def _open_stream(self, event: Headers) -> None:
        if self.draining:  # safe for the client to send again elsewhere (RFC 9113 8.7)
            self.endpoint.reset(event.stream_id, ErrorCodes.REFUSED_STREAM)
            return
        headers = strip_connection_specific(event.headers)
        request_id = None
        if self.request_ids is not None:
            request_id = header(headers, b"x-request-id")
            if request_id is None:
                request_id = self.request_ids()
                headers.append((b"x-request-id", request_id))
        try:
            choice = as_choice(self.pick_upstream(headers))
        except MeshError as exc:
            self._answer_error(event.stream_id, is_grpc(headers), exc.code, exc.detail, exc.status, exc.service, request_id, headers)
            return
        except Exception as exc:  # a bug in routing: answer it on this stream only
            log.exception("routing an HTTP/2 stream failed")
            self._answer_error(event.stream_id, is_grpc(headers), "upstream-connect-failed", str(exc), headers=headers)
            return
        record = StreamRecord(event.stream_id, headers, choice, self.loop.time())
        record.request_complete = event.end_stream
        self.records[event.stream_id] = record
        timeout = choice.timeout
        if record.grpc:
            asked = grpc_timeout(headers)
            if asked is not None and (timeout is None or asked < timeout):
                timeout = asked
        if timeout is not None:
            record.timer = self.loop.call_later(timeout, self._expire, event.stream_id)
        if choice.idle_timeout is not None:
            record.idle_timer = self.loop.call_at(first_check(choice.idle_timeout, record.started), self._idle_check, event.stream_id)
        self.streams += 1
        self._start_attempt(record, [] if event.end_stream else None)

    def _start_attempt(self, record: StreamRecord, replay: list[bytes] | None) -> None:
        """Send the stream's head upstream; `replay` (a retry) is its whole body, already acknowledged."""
        choice = record.choice
        host, port, context = choice.host, choice.port, choice.context
        key = (host, port, id(context))
        upstream = self.upstreams.get(key) if not choice.http1 else None
        if choice.http1:
            upstream = _H1Side(self, "app %s:%d (HTTP/1.1)" % (host, port))
            self.loop.create_task(self._connect(upstream, key, choice))
        elif upstream is None:
            upstream = self.upstreams[key] = _Side(
                self, client_side=True, label="upstream %s:%d" % (host, port), peer_sidecar=context is not None)
            self.loop.create_task(self._connect(upstream, key, choice))
        ends_now = replay is not None and not replay
        up_stream = upstream.endpoint.send_request(record.headers, end_stream=ends_now)
        request = _Pipe(self, record.stream_id, upstream, up_stream)
        response = _Pipe(upstream, up_stream, self, record.stream_id)
        response.grpc = record.grpc
        record.upstream, record.up_stream = upstream, up_stream
        upstream.outgoing[up_stream] = request
        upstream.incoming[up_stream] = response
        self.outgoing[record.stream_id] = response
        if replay is None:
            self.incoming[record.stream_id] = request
        else:
            request.acknowledges = False
            request.queue.extend(replay)
            if replay:
                request.queue.append(_END)
            else:
                request.closed = True
            request.flush()
        upstream.flush()

    def _keep_for_replay(self, stream_id: int, data: bytes) -> None:
        record = self.records.get(stream_id)
        if record is None or record.replay is None:
            return
        record.replay_size += len(data)
        if record.replay_size > MAX_REPLAY_BYTES:
            record.replay = None  # too big to hold: this stream will not be retried
        else:
            record.replay.append(data)

    def _retry_trailers_only(self, record: StreamRecord, side: _Side, event: Headers) -> bool:
        """A trailers-only retriable gRPC answer, nothing sent downstream yet: try again."""
        if not (record.grpc and record.retries_left > 0 and record.replay is not None and record.request_complete):
            return False
        if grpc_status(event.headers) not in GRPC_RETRIABLE or record.responded or record.done:
            return False
        record.retries_left -= 1
        self.retried += 1
        code = grpc_status(event.headers)
        tried = record.choice
        tried.settled(code != GRPC_UNAVAILABLE)
        side.incoming.pop(event.stream_id, None)
        side.outgoing.pop(event.stream_id, None)
        self.outgoing.pop(record.stream_id, None)
        try:
            record.choice = as_choice(self.pick_upstream(record.headers))
        except Exception as exc:
            stream_retried(record, tried, code, self.loop.time(), None)
            self._answer_error(record.stream_id, True, "upstream-connect-failed", str(exc))
            return True
        stream_retried(record, tried, code, self.loop.time(), record.choice.backoff)
        replay = list(record.replay)
        self.loop.call_later(record.choice.backoff, self._retry_now, record, replay)
        return True

    def _retry_now(self, record: StreamRecord, replay: list[bytes]) -> None:
        if not record.done and not self.lost:
            record.try_started = self.loop.time()
            self._start_attempt(record, replay)

    def _idle_check(self, stream_id: int) -> None:
        record = self.records.get(stream_id)
        if record is None or record.done:
            return
        moved = sum(pipe.moved for pipe in (self.incoming.get(stream_id), self.outgoing.get(stream_id)) if pipe is not None)
        now = self.loop.time()
        timeout = record.choice.idle_timeout
        assert timeout is not None  # the check is scheduled only for a stream with an idle timeout
        if record.idle is None:
            record.idle = IdleCheck(timeout, moved, now)
        elif record.idle.expired(moved, now):
            record.idle_timer = None
            self._expire(stream_id, STREAM_IDLE_TIMEOUT_CODE)
            return
        record.idle_timer = self.loop.call_at(record.idle.due, self._idle_check, stream_id)

    def _expire(self, stream_id: int, code: str = "timeout") -> None:
        """The stream's deadline (route timeout or grpc-timeout) passed, or it fell silent: DEADLINE_EXCEEDED.

        Once the response head went out, a gRPC stream ends with DEADLINE_EXCEEDED trailers
        and any other stream is reset: either way the client cannot take it for complete.
        """
        record = self.records.get(stream_id)
        if record is None or record.done:
            return
        if code == "timeout":
            record.timer = None
        record.cut = code
        if record.upstream is not None:
            record.upstream.incoming.pop(record.up_stream, None)
            record.upstream.outgoing.pop(record.up_stream, None)
            record.upstream.endpoint.reset(record.up_stream, ErrorCodes.CANCEL)
            record.upstream.flush()
        if record.responded:
            self.incoming.pop(stream_id, None)
            self.outgoing.pop(stream_id, None)
            if record.grpc:  # the response head went out: the status goes in its trailers
                trailers, _ = grpc_error_trailers(code, self._cut_detail(record, code), 504, self._service_of(record))
                self.endpoint.send_trailers(stream_id, trailers)
            else:
                self.endpoint.reset(stream_id, ErrorCodes.CANCEL)
            self.flush()
            self._done(record, 504, GRPC_DEADLINE_EXCEEDED if record.grpc else None)
            return
        self._answer_error(stream_id, record.grpc, code, self._cut_detail(record, code), 504)

    @staticmethod
    def _cut_detail(record: StreamRecord, code: str) -> str:
        if code == "timeout":
            return "no response within the deadline"
        return "no byte moved either way for %gs" % record.idle.timeout

    async def _connect(self, upstream: _Side, key: tuple, choice: UpstreamChoice) -> None:
        host, port, context = choice.host, choice.port, choice.context
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                transport, _ = await create_connection(
                    self.loop, lambda: upstream, host, port, ssl=context, server_hostname=host if context else None
                )
            if choice.verify is not None:
                choice.verify(transport)
        except (OSError, TimeoutError, ssl.SSLError) as exc:
            log.info("h2 upstream %s:%d: %s", host, port, exc or "connect timed out")
            upstream.lost = True
            if self.upstreams.get(key) is upstream:
                del self.upstreams[key]
            for pipe in list(upstream.incoming.values()):
                self._answer_error(pipe.target_stream, pipe.grpc, "upstream-connect-failed", "%s:%d: %s" % (host, port, exc or "timed out"))
            upstream.incoming.clear()
            upstream.outgoing.clear()
            self.flush()

    # -- answers of our own, and the end of a stream ---------------------------------------

    def _answer_error(
        self, stream_id: int, grpc: bool, code: str, detail: str, status: int | None = None, service: str | None = None,
        request_id: bytes | None = None, headers: HeaderList | None = None,
    ) -> None:
        """Answer one downstream stream ourselves: x-mesh-error, or a gRPC trailers-only status (proxy.errors).

        `headers`: the request's, for a stream refused before it had a StreamRecord (its decision record).
        """
        self.outgoing.pop(stream_id, None)
        self.incoming.pop(stream_id, None)
        if status is None:
            status = http_status(code)
        record = self.records.get(stream_id)
        if service is None:
            service = self._service_of(record)
        if request_id is None and self.request_ids is not None and record is not None:
            request_id = header(record.headers, b"x-request-id")
        grpc_code = None
        body = b""
        if grpc:
            head, grpc_code = grpc_error_head(code, detail, status, service)
        else:
            head, body = h2_error_head(code, detail, status, service)
        if request_id:
            head.append((b"x-request-id", request_id))
        self.endpoint.send_response(stream_id, head, end_stream=grpc)  # gRPC: trailers-only
        if not grpc:
            self.endpoint.send_data(stream_id, body)
            self.endpoint.end_stream(stream_id)
        self.flush()
        if record is not None:
            record.error = code
            self._done(record, status, grpc_code, mesh_error=True)
        elif self.record is not None:
            refused = StreamRecord(stream_id, headers or [], UpstreamChoice("", 0), self.loop.time())
            refused.error = code
            self.record(refused, status, grpc_code, True)

    def _service_of(self, record: StreamRecord | None) -> str:
        """The destination a stream's errors name: its choice's service, else this proxy's."""
        return record.choice.tag[0] if record is not None and isinstance(record.choice.tag, tuple) else self.service

    def _finish(self, record: StreamRecord, final_headers: HeaderList | None) -> None:
        if record.done:
            return
        status_value = header(final_headers, b":status") if final_headers is not None else None
        if status_value is None:
            status_value = record.answered  # the response head's, for a stream ended by data or trailers
        grpc_code = grpc_status(final_headers) if final_headers is not None and record.grpc else None
        if grpc_code is not None:
            status = grpc_as_http(grpc_code)
        else:
            status = int(status_value) if status_value and status_value.isdigit() else 200
        self._done(record, status, grpc_code)

    def _done(self, record: StreamRecord, status: int, grpc_code: int | None, mesh_error: bool = False) -> None:
        if record.done:
            return
        record.done = True
        if record.timer is not None:
            record.timer.cancel()
            record.timer = None
        if record.idle_timer is not None:
            record.idle_timer.cancel()
            record.idle_timer = None
        self.records.pop(record.stream_id, None)
        if status == 499 or status == 504:
            record.choice.settled(None)  # the client left, or a deadline: nothing learnt about the upstream
        elif mesh_error and (status == 502 or status == 503):
            record.choice.settled(False)
        else:
            record.choice.settled(grpc_code != GRPC_UNAVAILABLE if grpc_code is not None else status < 500)
        if self.draining and not self.records:
            self.loop.call_soon(self._goaway_and_close)
        if self.record is not None:
            try:
                self.record(record, status, grpc_code, mesh_error)
            except Exception:
                log.exception("recording an HTTP/2 stream failed")

    def _reset_peer(self, side: _Side, stream_id: int, error_code: int) -> None:
        pipe = side.incoming.pop(stream_id, None) or side.outgoing.get(stream_id)
        side.outgoing.pop(stream_id, None)
        if pipe is None:
            return
        other, other_stream = (pipe.target, pipe.target_stream) if pipe.source is side else (pipe.source, pipe.source_stream)
        other.incoming.pop(other_stream, None)
        other.outgoing.pop(other_stream, None)
        other.endpoint.reset(other_stream, error_code)
        other.flush()
        record = self.records.get(stream_id if side is self else other_stream)
        if record is not None:
            if side is not self:
                record.error = "upstream-reset"
            # The client resetting its stream (a cancelled watch, or a caller's sidecar ending an
            # idle stream) is a 499 as when it leaves: no failure of the upstream, nor of a canary.
            self._done(record, 499 if side is self else 502, GRPC_CANCELLED if record.grpc else None, mesh_error=side is not self)

    def side_lost(self, side: _Side) -> None:
        if side is self:
            for upstream in list(self.upstreams.values()):
                if upstream.transport is not None:
                    upstream.transport.close()
            self.upstreams.clear()
            for record in list(self.records.values()):
                self._done(record, 499, GRPC_CANCELLED if record.grpc else None)
            self.closed.set()
            if self.on_closed is not None:
                self.on_closed(self)
            return
        for stream_id in list(side.incoming) + list(side.outgoing):
            self._reset_peer(side, stream_id, ErrorCodes.CANCEL)
        self.upstreams = {key: up for key, up in self.upstreams.items() if up is not side}

    def drain(self) -> None:
        """Shutdown: refuse new streams, GOAWAY and close once the streams in flight have ended.

        GOAWAY comes last because the h2 library closes its side of the connection when it
        sends or receives one: frames of the streams still in flight would then be protocol
        errors, on our side and on a peer sidecar's. Until then a new stream is reset with
        REFUSED_STREAM, which tells the client that nothing of it was processed.
        """
        if self.draining or self.lost:
            return
        self.draining = True
        if not self.records:
            self._goaway_and_close()

    def _goaway_and_close(self) -> None:
        if self.transport is not None and not self.lost:
            self.endpoint.close()
            self.write_now()
            self.transport.close()

    def close(self) -> None:
        """End the downstream connection now (drain deadline); its upstreams follow in side_lost."""
        if self.transport is not None and not self.lost:
            self.transport.close()
