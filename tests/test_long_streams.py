"""Long-lived requests through real sidecars (issue 23, meshctl/proxy/policy.md "Long-lived requests").

With the default policy (no whole-request timeout, a 5 minute stream idle timeout) a 20 s
event stream through the ingress, a 20 s gRPC server stream through two sidecars and a
WebSocket held open 20 s all arrive whole. With `stream_idle_timeout: 1s` a stream that
falls silent for 3 s is cut so that the client can tell (no last chunk; gRPC
DEADLINE_EXCEEDED) and the cut is counted with its code; with `timeout: 1s` a slow
response still gets 504. The 20 s are the scenarios' content: nothing waits on time.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import time
import urllib.request
from concurrent import futures

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.meshharness import Mesh, free_port, http_get, wait_for
from tests.test_protocols_mesh import GrpcChannel, h2_app_server, mesh_pair
from tests.test_protocols_websocket import OP_TEXT, handshake, read_frame, read_head, start as start_websocket
from tests.test_upgrade import encode_frame

MESH = """
mesh: streams
observability: {{access_log: errors}}
services:
  feed:
    health: {{http: /healthz}}
    versions:
      v1: {{command: {PY} {APPS}/echo.py}}
    routes:
      - {{match: {{path: {{prefix: /events/quiet}}}}, version: v1, stream_idle_timeout: 1s}}
      - {{match: {{path: {{prefix: /sleep}}}}, version: v1, timeout: 1s}}
ingress:
  port: {port}
  routes: [{{path: /, service: feed}}]
"""
STREAM_EVENTS = 40  # one every 0.5 s: 20 s, beyond the 15 s whole-request timeout meshctl used to have
READ_TIMEOUT_S = 30.0


@pytest.fixture(scope="module")
def feed(tmp_path_factory):
    """A mesh: the ingress in front of `feed` (tests/apps/echo.py), default policy but for two routes."""
    mesh = Mesh(tmp_path_factory.mktemp("streams"))
    try:
        port = free_port()
        mesh.write_manifest(MESH.format(port=port, PY="{PY}", APPS="{APPS}"))
        mesh.up()
        yield mesh, port
    finally:
        mesh.cleanup()


def read_event_stream(port: int, path: str) -> tuple[bytes, list[bytes], bool]:
    """GET `path` and read its chunked body: (head, the events, whether the last chunk came)."""
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S) as sock:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: feed\r\nAccept: text/event-stream\r\n\r\n" % path.encode())
        head, buffer = read_head(sock), b""
        events: list[bytes] = []
        while True:
            while b"\r\n" not in buffer:
                chunk = _recv(sock)
                if not chunk:
                    return head, events, False
                buffer += chunk
            size_line, _, rest = buffer.partition(b"\r\n")
            size = int(size_line, 16)
            while len(rest) < size + 2:
                chunk = _recv(sock)
                if not chunk:
                    return head, events, False
                rest += chunk
            if size == 0:
                return head, events, True
            events.append(rest[:size])
            buffer = rest[size + 2:]


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""  # an abort is a cut as well


def _metric(mesh: Mesh, name: str, **labels: str) -> float:
    url = mesh.cli("metrics", check=True).stdout.strip()
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items())
    )


def test_a_20s_event_stream_through_the_ingress_arrives_whole(feed):
    mesh, port = feed
    head, events, complete = read_event_stream(port, "/events?n=%d&every_ms=500" % STREAM_EVENTS)
    assert head.startswith(b"HTTP/1.1 200 ") and b"text/event-stream" in head.lower()
    assert events == [b"data: event %d\n\n" % index for index in range(STREAM_EVENTS)]
    assert complete


def test_a_silent_stream_is_cut_with_stream_idle_timeout(feed):
    mesh, port = feed
    head, events, complete = read_event_stream(port, "/events/quiet?n=4&every_ms=100&pause_after=1&pause_ms=3000")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert events == [b"data: event 0\n\n", b"data: event 1\n\n"]
    assert not complete  # closed without the last chunk: the client knows the stream was cut

    def access_lines():
        lines = mesh.cli("logs", "--access", check=True).stdout.splitlines()
        cut = [json.loads(line) for line in lines if "stream-idle-timeout" in line]
        return cut or None

    [line, *_] = wait_for(access_lines, timeout=20, what="the cut in the access log")
    assert line["mesh_error"] == "stream-idle-timeout" and line["path"].startswith("/events/quiet")
    wait_for(lambda: _metric(mesh, "mesh_stream_idle_timeouts_total", destination_service="feed") >= 1,
             timeout=20, what="mesh_stream_idle_timeouts_total for feed")


def test_a_route_timeout_still_answers_504(feed):
    mesh, port = feed
    status, headers, body = http_get("http://127.0.0.1:%d/sleep?ms=3000" % port)
    assert status == 504
    assert {key.lower(): value for key, value in headers.items()}["x-mesh-error"] == "timeout"
    assert body.startswith(b"timeout: feed")


# -- gRPC and WebSocket through two sidecars ---------------------------------------------------


def ticking_server():
    """A gRPC server whose Ticks method streams `n` messages `every_ms` apart, silent `pause_ms` after the first two."""

    def ticks(request: bytes, context: grpc.ServicerContext):
        count, every_ms, pause_ms = (int(part) for part in request.split(b","))
        for index in range(count):
            yield b"tick-%d" % index
            time.sleep((pause_ms if index == 1 and pause_ms else every_ms) / 1000)  # the stream's pace

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
    kinds = {"request_deserializer": None, "response_serializer": None}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "recommend.Recommend", {"Ticks": grpc.unary_stream_rpc_method_handler(ticks, **kinds)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


class _Stopped:
    def __init__(self, server: grpc.Server) -> None:
        self.server = server

    def stop(self) -> None:
        self.server.stop(grace=None).wait(10)


@pytest.fixture
def ticking(cleanup):
    server, port = ticking_server()
    cleanup(_Stopped(server))
    return port


def test_a_20s_grpc_server_stream_through_two_sidecars_arrives_whole(cleanup, ca, ticking):
    outer, _ = mesh_pair(cleanup, ca, ["127.0.0.1", ticking], "grpc")
    channel = GrpcChannel(outer.ports["out"])
    cleanup(channel)
    replies = list(channel.method("Ticks", "unary_stream")(b"%d,500,0" % STREAM_EVENTS, timeout=READ_TIMEOUT_S))
    assert replies == [b"tick-%d" % index for index in range(STREAM_EVENTS)]


def test_a_silent_grpc_stream_ends_deadline_exceeded(cleanup, ca, ticking):
    outer, _ = mesh_pair(cleanup, ca, ["127.0.0.1", ticking], "grpc", stream_idle_timeout=1.0)
    channel = GrpcChannel(outer.ports["out"])
    cleanup(channel)
    call = channel.method("Ticks", "unary_stream")(b"4,100,3000", timeout=READ_TIMEOUT_S)
    received = []
    with pytest.raises(grpc.RpcError) as info:
        for reply in call:
            received.append(reply)
    assert received == [b"tick-0", b"tick-1"]
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert ("x-mesh-error", "stream-idle-timeout") in info.value.trailing_metadata()


def head_and_silence(server: h2.connection.H2Connection, request: h2.events.RequestReceived) -> None:
    """An HTTP/2 app's answer that starts and then says nothing more."""
    server.send_headers(request.stream_id, [(":status", "200"), ("content-type", "text/plain")])
    server.send_data(request.stream_id, b"first")


def test_a_silent_http2_stream_is_reset_after_its_head(cleanup, ca):
    outer, _ = mesh_pair(cleanup, ca, ["127.0.0.1", h2_app_server(cleanup, head_and_silence)], "grpc", stream_idle_timeout=1.0)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    client.initiate_connection()
    client.send_headers(1, [(":method", "GET"), (":scheme", "http"), (":authority", "svc"), (":path", "/watch")], end_stream=True)
    seen: list = []
    with socket.create_connection(("127.0.0.1", outer.ports["out"]), timeout=READ_TIMEOUT_S) as sock:
        sock.sendall(client.data_to_send())
        while not any(isinstance(event, (h2.events.StreamReset, h2.events.StreamEnded)) for event in seen):
            data = sock.recv(65536)
            assert data, "connection closed; events so far: %r" % seen
            seen.extend(event for event in client.receive_data(data) if getattr(event, "stream_id", 0) == 1)
            sock.sendall(client.data_to_send())
    kinds = [type(event) for event in seen]
    assert kinds[0] is h2.events.ResponseReceived and dict(seen[0].headers)[":status"] == "200"
    assert b"".join(event.data for event in seen if isinstance(event, h2.events.DataReceived)) == b"first"
    assert kinds[-1] is h2.events.StreamReset and h2.events.StreamEnded not in kinds  # cut, not complete


def test_a_websocket_held_open_20s_still_works(cleanup, ca):
    _, port = start_websocket(cleanup, ca, "echo")
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT_S) as sock:
        sock.sendall(handshake(base64.b64encode(os.urandom(16))))
        assert read_head(sock).startswith(b"HTTP/1.1 101 ")
        assert read_frame(sock) == (OP_TEXT, b"welcome")
        for index in range(STREAM_EVENTS):
            sock.sendall(encode_frame(OP_TEXT, b"ping %d" % index, mask=True))
            assert read_frame(sock) == (OP_TEXT, b"ping %d" % index)
            time.sleep(0.5)  # the conversation's pace: 20 s in all
