"""The two ends of the hop between sidecars that bench/peer_hop.py measures, and the adapter.

Each end runs in its own process, started by bench/peer_hop.py (`serve` and `drive`), with
the sidecar's own code (proxy.tls, proxy.http1, proxy.h2conn) on uvloop:

* the adapter: pure conversions between HTTP/1.1 heads and h2 header lists, what carrying
  the sidecars' HTTP/1.1 requests as h2 streams would add at both ends.
* the hop server (the inbound sidecar's end): proxy.tls.InboundAcceptor in strict mode with
  a TLSConfig built from leaves of our own CA (meshctl/agent/ca.py), ALPN picks the protocol as on
  the inbound listener. HTTP/1.1: proxy.http1.Parser reads each request, the app's answer
  (a 200 with a 13-byte body, parsed once) is written as the sidecar forwards it, raw.
  h2: an H2Endpoint (peer_sidecar=True) turns each stream into the HTTP/1.1 request the app
  would get and the app's answer into h2 headers + data + end.
* the hop client (the outbound sidecar's end) keeps C requests in flight for N requests.
  The app's request (a GET with a few headers) is parsed once; per request it gets
  x-forwarded-for/forwarded/x-request-id as the sidecar adds them. HTTP/1.1: C pooled
  mTLS connections, `rebuild_head` per request, responses read with proxy.http1. h2: the
  same C requests as streams over K connections (the client context offering only h2),
  each head converted to h2 fields and each response converted back to HTTP/1.1 bytes.

Both talk JSON lines on stdout and read commands on stdin: the server answers `cpu` with
its own getrusage() time; the client says `ready` after its warm-up and runs the measured
phase on `go`. Both leave when their stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import os
import resource
import signal
import socket
import sys
import time
from typing import Any

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH_DIR)
for _path in (REPO, BENCH_DIR):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from procs import BenchError  # noqa: E402
from meshctl.proxy.h2conn import CONNECTION_SPECIFIC, ConnectionEnded, Data as H2Data, H2Endpoint, Headers, StreamEnded, StreamReset  # noqa: E402
from meshctl.proxy.http1 import END, Data as H1Data, Head, Parser, rebuild_head  # noqa: E402
from meshctl.proxy.tls import ClientTLS, InboundAcceptor, TLSConfig  # noqa: E402

SERVER_NAME = "web.mesh"
RESPONSE_BODY = b"hello, mesh!\n"
APP_REQUEST = (b"GET /api/items?page=2 HTTP/1.1\r\nHost: web\r\nUser-Agent: python-requests/2.31.0\r\n"
               b"Accept-Encoding: gzip, deflate\r\nAccept: */*\r\nConnection: keep-alive\r\n\r\n")
APP_RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 15:20:00 GMT\r\n"
                b"Content-Type: text/plain\r\nContent-Length: 13\r\nConnection: keep-alive\r\n\r\n") + RESPONSE_BODY
FORWARDED = b"x-forwarded-for: 127.0.0.1\r\nforwarded: for=127.0.0.1"
FORWARDED_FIELDS = [(b"x-forwarded-for", b"127.0.0.1"), (b"forwarded", b"for=127.0.0.1")]
REQUEST_ID_PREFIX = b"7f3a9c2e"
PHASE_TIMEOUT_S = 120.0
_REASONS = {status.value: status.phrase.encode() for status in http.HTTPStatus}

HeaderList = list[tuple[bytes, bytes]]


# -- the adapter: pure conversions between HTTP/1.1 heads and h2 header lists -------------


def parse_head(raw: bytes, is_request: bool) -> Head:
    """The head of one complete message in `raw`, read by the sidecar's parser."""
    parser = Parser(is_request=is_request)
    parser.feed(raw)
    head = parser.next_event()
    if not isinstance(head, Head):
        raise BenchError("not a complete HTTP/1.1 head: %r" % raw[:60])
    return head


def _forwardable(head: Head) -> HeaderList:
    """The head's fields minus those that describe one connection (RFC 9113 8.2.2)."""
    named = head.connection_tokens
    return [
        (name, value)
        for name, value in head.headers
        if name not in CONNECTION_SPECIFIC and name not in named and (name != b"te" or value.strip().lower() == b"trailers")
    ]


def h2_request_fields(head: Head, add: HeaderList) -> HeaderList:
    """An HTTP/1.1 request head (plus the sidecar's `add` fields) as h2 request fields."""
    authority = head.get(b"host") or b""
    return [(b":method", head.method), (b":scheme", b"http"), (b":authority", authority), (b":path", head.target),
            *_forwardable(head), *add]


def h2_response_fields(head: Head) -> HeaderList:
    """An HTTP/1.1 response head as h2 response fields (its body must be length-delimited)."""
    return [(b":status", b"%d" % head.status), *_forwardable(head)]


def h1_request_bytes(fields: HeaderList, end_stream: bool) -> bytes:
    """h2 request fields as the HTTP/1.1 request head the app would get."""
    pseudo = {}
    lines = [b""]
    has_length = False
    for name, value in fields:
        if name[:1] == b":":
            pseudo[name] = value
        else:
            lines.append(name + b": " + value)
            has_length = has_length or name == b"content-length"
    lines[0] = b"%s %s HTTP/1.1\r\nhost: %s" % (pseudo.get(b":method", b"GET"), pseudo.get(b":path", b"/"), pseudo.get(b":authority", b""))
    if not end_stream and not has_length:
        lines.append(b"transfer-encoding: chunked")
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


def h1_response_head(fields: HeaderList, end_stream: bool) -> tuple[bytes, bool]:
    """h2 response fields as an HTTP/1.1 response head; True when the body must be chunked."""
    status = 0
    lines = [b""]
    has_length = False
    for name, value in fields:
        if name == b":status":
            status = int(value)
        elif name[:1] != b":":
            lines.append(name + b": " + value)
            has_length = has_length or name == b"content-length"
    lines[0] = b"HTTP/1.1 %d %s" % (status, _REASONS.get(status, b""))
    chunked = not end_stream and not has_length and status not in (204, 304)
    if chunked:
        lines.append(b"transfer-encoding: chunked")
    elif end_stream and not has_length:
        lines.append(b"content-length: 0")
    lines.append(b"\r\n")
    return b"\r\n".join(lines), chunked


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


# -- the hop server (the inbound sidecar's end) -----------------------------------------------


class H1Inbound(asyncio.Protocol):
    """One HTTP/1.1 connection from the peer sidecar: parse each request, answer it."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.parser = Parser(is_request=True)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        parser.feed(data)
        while True:
            event = parser.next_event()
            if event is END:
                # The request head would go to the app as it came (Head.raw); its answer comes back.
                self.transport.write(self.answer)  # type: ignore[union-attr]
                parser.start_next_cycle()
            elif type(event) is not Head and type(event) is not H1Data:
                return  # NEED_DATA


class H2Inbound(asyncio.Protocol):
    """One h2 connection from the peer sidecar: each stream becomes an app request and is answered."""

    def __init__(self, app_head: Head) -> None:
        self.app_head = app_head
        self.endpoint = H2Endpoint(client_side=False, peer_sidecar=True)
        self.transport: asyncio.Transport | None = None
        self.to_app = 0  # bytes the converted requests would have sent to the app

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self.endpoint.data_to_send())  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        endpoint = self.endpoint
        for event in endpoint.receive(data):
            kind = type(event)
            if kind is Headers:
                self.to_app += len(h1_request_bytes(event.headers, event.end_stream))  # type: ignore[union-attr]
            elif kind is H2Data:
                endpoint.acknowledge(event.stream_id, event.flow_length)  # type: ignore[union-attr]
            elif kind is StreamEnded:
                stream_id = event.stream_id  # type: ignore[union-attr]
                endpoint.send_response(stream_id, h2_response_fields(self.app_head))
                endpoint.send_data(stream_id, RESPONSE_BODY)
                endpoint.end_stream(stream_id)
        out = endpoint.data_to_send()
        if out:
            self.transport.write(out)  # type: ignore[union-attr]


class AlpnSwitch(asyncio.Protocol):
    """Hands an accepted mTLS connection to the protocol its ALPN names, as the inbound listener does."""

    def __init__(self, app_head: Head) -> None:
        self.app_head = app_head

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        alpn = transport.get_extra_info("ssl_object").selected_alpn_protocol()
        inner: asyncio.Protocol = H2Inbound(self.app_head) if alpn == "h2" else H1Inbound(APP_RESPONSE)
        transport.set_protocol(inner)  # type: ignore[attr-defined]
        inner.connection_made(transport)


def own_cpu_seconds() -> float:
    """User + system time of this process, to the microsecond (/proc/<pid>/stat counts 10 ms ticks)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class Control(asyncio.Protocol):
    """The harness's pipe into the server: `cpu` asks for its CPU time; EOF (the harness gone) stops it."""

    def __init__(self, stop: asyncio.Future) -> None:
        self.stop = stop
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            if line.strip() == b"cpu":
                _say({"cpu": own_cpu_seconds()})

    def eof_received(self) -> None:
        if not self.stop.done():
            self.stop.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof_received()


def _load_tls(path: str) -> tuple[TLSConfig, str]:
    """This end's contexts, built by the sidecar's code from a `tls` block, and the peer's identity."""
    with open(path) as source:
        raw = json.load(source)
    return TLSConfig(raw, None), raw["peer_identity"]


async def serve(tls_path: str) -> None:
    """Listen on a port the kernel picks, say which, answer until stdin closes or a signal comes."""
    loop = asyncio.get_running_loop()
    tls, _ = _load_tls(tls_path)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    sock.setblocking(False)
    app_head = parse_head(APP_RESPONSE, is_request=False)
    acceptor = InboundAcceptor(loop, sock, lambda: AlpnSwitch(app_head), lambda: tls)
    stop = loop.create_future()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, lambda: stop.done() or stop.set_result(None))
    await loop.connect_read_pipe(lambda: Control(stop), sys.stdin)
    _say({"port": sock.getsockname()[1]})
    try:
        await stop
    finally:
        acceptor.close()
        sock.close()


# -- the hop client (the outbound sidecar's end) -----------------------------------------------


class Phase:
    """Counts one batch of requests: how many to start, how many came back, how many were wrong."""

    def __init__(self, loop: asyncio.AbstractEventLoop, total: int) -> None:
        self.total = total
        self.issued = 0
        self.completed = 0
        self.errors = 0
        self.to_app = 0  # response bytes the outbound sidecar would write to its app
        self.done = loop.create_future()

    def take(self) -> int | None:
        """A request number to send, or None when all are out."""
        if self.issued >= self.total:
            return None
        self.issued += 1
        return self.issued

    def finished(self, ok: bool, response: bytes) -> None:
        self.completed += 1
        self.to_app += len(response)
        if not ok:
            self.errors += 1
        if self.completed >= self.total and not self.done.done():
            self.done.set_result(None)

    def broken(self, outstanding: int) -> None:
        """A connection died with `outstanding` requests on it: they count as errors."""
        for _ in range(outstanding):
            self.finished(False, b"")


class Lane(asyncio.Protocol):
    """A client connection; `launch(n)` starts n requests on it, each answered one starts the next."""

    phase: Phase
    request_head: Head

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.in_flight = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.in_flight:
            self.phase.broken(self.in_flight)
            self.in_flight = 0


class H1Lane(Lane):
    """One pooled keep-alive connection with one request at a time, as proxy.pool lends it."""

    def __init__(self) -> None:
        super().__init__()
        self.parser = Parser(is_request=False)
        self.status = 0
        self.parts: list[bytes] = []

    def launch(self, count: int) -> None:
        number = self.phase.take() if count else None
        if number is not None:
            self._send(number)

    def _send(self, number: int) -> None:
        self.in_flight = 1
        add = [FORWARDED, b"x-request-id: %s%012x" % (REQUEST_ID_PREFIX, number)]
        self.transport.write(rebuild_head(self.request_head, add))  # type: ignore[union-attr]

    def data_received(self, data: bytes) -> None:
        parser = self.parser
        parser.feed(data)
        parts = self.parts
        while True:
            event = parser.next_event()
            kind = type(event)
            if kind is H1Data:
                parts.append(event.data)  # type: ignore[union-attr]
            elif kind is Head:
                self.status = event.status  # type: ignore[union-attr]
                parts.append(event.raw)  # type: ignore[union-attr]
            elif event is END:
                parser.start_next_cycle()
                response = b"".join(parts)
                parts.clear()
                self.in_flight = 0
                phase = self.phase
                phase.finished(self.status == 200 and response.endswith(RESPONSE_BODY), response)
                number = phase.take()
                if number is not None:
                    self._send(number)
            else:
                return


class H2Lane(Lane):
    """One h2 connection carrying many of the sidecar's HTTP/1.1 requests as streams."""

    def __init__(self) -> None:
        super().__init__()
        self.endpoint = H2Endpoint(client_side=True, peer_sidecar=True)
        self.responses: dict[int, list[Any]] = {}  # stream id -> [status ok, chunked, parts]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        transport.write(self.endpoint.data_to_send())  # type: ignore[attr-defined]

    def launch(self, count: int) -> None:
        for _ in range(count):
            number = self.phase.take()
            if number is None:
                break
            self._open(number)
        self.transport.write(self.endpoint.data_to_send())  # type: ignore[union-attr]

    def _open(self, number: int) -> None:
        endpoint = self.endpoint
        add = [*FORWARDED_FIELDS, (b"x-request-id", b"%s%012x" % (REQUEST_ID_PREFIX, number))]
        stream_id = endpoint.send_request(h2_request_fields(self.request_head, add), end_stream=True)
        self.responses[stream_id] = [False, False, []]
        self.in_flight += 1

    def data_received(self, data: bytes) -> None:
        endpoint = self.endpoint
        responses = self.responses
        for event in endpoint.receive(data):
            kind = type(event)
            if kind is Headers:
                head, chunked = h1_response_head(event.headers, event.end_stream)  # type: ignore[union-attr]
                response = responses[event.stream_id]  # type: ignore[union-attr]
                response[0] = head.startswith(b"HTTP/1.1 200 ")
                response[1] = chunked
                response[2].append(head)
            elif kind is H2Data:
                response = responses[event.stream_id]  # type: ignore[union-attr]
                response[2].append(chunk(event.data) if response[1] else event.data)  # type: ignore[union-attr]
                endpoint.acknowledge(event.stream_id, event.flow_length)  # type: ignore[union-attr]
            elif kind is StreamEnded or kind is StreamReset:
                ok, chunked, parts = responses.pop(event.stream_id)  # type: ignore[union-attr]
                if chunked:
                    parts.append(b"0\r\n\r\n")
                body = b"".join(parts)
                self.in_flight -= 1
                phase = self.phase
                phase.finished(kind is StreamEnded and ok and body.endswith(RESPONSE_BODY), body)
                number = phase.take()
                if number is not None:
                    self._open(number)
            elif kind is ConnectionEnded:
                self.transport.close()  # type: ignore[union-attr]
        out = endpoint.data_to_send()
        if out:
            self.transport.write(out)  # type: ignore[union-attr]


def spread(concurrency: int, lanes: int) -> list[int]:
    """How many of `concurrency` requests each of `lanes` connections carries (differ by at most one)."""
    return [concurrency // lanes + (1 if index < concurrency % lanes else 0) for index in range(lanes)]


async def _run_phase(loop: asyncio.AbstractEventLoop, lanes: list[Lane], requests: int, concurrency: int) -> dict[str, Any]:
    phase = Phase(loop, requests)
    for lane in lanes:
        lane.phase = phase
    cpu = own_cpu_seconds()
    started = time.perf_counter()
    for lane, count in zip(lanes, spread(concurrency, len(lanes))):
        lane.launch(count)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.shield(phase.done), PHASE_TIMEOUT_S)
    seconds = time.perf_counter() - started
    cpu = own_cpu_seconds() - cpu
    lost = requests - phase.completed
    return {"requests": requests, "completed": phase.completed, "errors": phase.errors + lost, "seconds": seconds,
            "client_cpu": cpu, "bytes_to_app": phase.to_app}


def _say(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def drive(port: int, tls_path: str, mode: str, connections: int, concurrency: int, requests: int, warmup: int) -> None:
    """Connect, warm up, say ready; on `go` run the measured phase and report it; on EOF, leave."""
    loop = asyncio.get_running_loop()
    tls, expected = _load_tls(tls_path)
    client = ClientTLS(tls.client_context, expected, SERVER_NAME, tls.h2_client_context)
    lane_class = H2Lane if mode == "h2" else H1Lane
    lane_class.request_head = parse_head(APP_REQUEST, is_request=True)
    context = client.h2_context if mode == "h2" else client.context
    lanes: list[Lane] = []
    for _ in range(connections):
        transport, lane = await loop.create_connection(lane_class, "127.0.0.1", port, ssl=context, server_hostname=SERVER_NAME)
        client.verify(transport)
        alpn = transport.get_extra_info("ssl_object").selected_alpn_protocol()
        if alpn != ("h2" if mode == "h2" else "http/1.1"):
            raise BenchError("ALPN chose %r for mode %s" % (alpn, mode))
        lanes.append(lane)
    warm = await _run_phase(loop, lanes, warmup, concurrency)
    _say({"ready": True, "warmup_errors": warm["errors"]})
    command = await loop.run_in_executor(None, sys.stdin.readline)
    if command.strip() != "go":
        return
    _say(await _run_phase(loop, lanes, requests, concurrency))
    await loop.run_in_executor(None, sys.stdin.readline)
    for lane in lanes:
        lane.transport.close()  # type: ignore[union-attr]
