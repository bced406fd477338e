"""Protocols through real sidecar processes with mTLS between them (docs/protocols-l7.md).

Two sidecars per test, as in a mesh: the caller's outbound listener and the callee's
inbound listener, with certificates from a test CA. gRPC (grpcio client and server),
a plain HTTP/2 client (the h2 library), opaque TCP (an echo server, a server-first
banner, Redis when installed), and protocol detection that must not hang.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket
import subprocess
import threading
from concurrent import futures
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from meshctl.agent.ca import spiffe_id
from tests.proxy_harness import Sidecar, Upstream, service, wait_for
from tests.tlspeers import TRUST_DOMAIN, tls_block

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 10.0


def mesh_pair(cleanup, ca, app: list, protocol: str, authz=None, **policy) -> tuple[Sidecar, Sidecar]:
    """(caller sidecar with outbound listener `out`, callee sidecar in front of `app`)."""
    inner = Sidecar([{"name": "inbound", "kind": "inbound", "app": app, "protocol": protocol}])
    cleanup(inner)
    inner.start(tls=tls_block(ca, "svc"), trust_domain=TRUST_DOMAIN, authz=authz)
    block = service([("v1", inner.endpoint())], protocol=protocol, tls={"identity": spiffe_id(TRUST_DOMAIN, "svc")}, **policy)
    outer = Sidecar([{"name": "out", "kind": "outbound", "service": "svc", "protocol": protocol}], {"svc": block})
    cleanup(outer)
    outer.start(tls=tls_block(ca, "front"), trust_domain=TRUST_DOMAIN)
    return outer, inner


# -- gRPC ------------------------------------------------------------------------------------


def load_recommend():
    spec = importlib.util.spec_from_file_location("recommend_demo", ROOT / "demo-services" / "recommend.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


class GrpcServer:
    def __init__(self, server: grpc.Server, port: int) -> None:
        self.server, self.port = server, port

    def stop(self) -> None:
        self.server.stop(grace=None).wait(DEADLINE_S)


class GrpcChannel:
    def __init__(self, port: int) -> None:
        self.channel = grpc.insecure_channel("127.0.0.1:%d" % port, options=[("grpc.enable_http_proxy", 0)])

    def method(self, name: str, kind: str = "unary_unary"):
        return getattr(self.channel, kind)("/recommend.Recommend/" + name, request_serializer=None, response_deserializer=None)

    def stop(self) -> None:
        self.channel.close()


@pytest.fixture
def recommend(cleanup):
    server, port = load_recommend().build_server(0)
    cleanup(GrpcServer(server, port))
    return port


RETRIES = {
    "attempts": 3, "per_try_timeout": None, "retry_on": ["connect-failure"], "backoff": 0.01, "max_backoff": 0.05,
    "non_idempotent": False, "budget": {"ratio": 0.2, "min_per_second": 10.0},
}


def test_grpc_unary_and_streaming_through_the_mesh(cleanup, ca, recommend):
    outer, _ = mesh_pair(cleanup, ca, ["127.0.0.1", recommend], "grpc")
    channel = GrpcChannel(outer.ports["out"])
    cleanup(channel)
    response, call = channel.method("ForItem").with_call(b"sku1", timeout=DEADLINE_S)
    assert response == b"sku1-a,sku1-b,sku1-c" and call.code() == grpc.StatusCode.OK
    assert ("x-served-by", "recommend@v1#0") in call.trailing_metadata()
    replies = list(channel.method("Stream", "unary_stream")(b"300", timeout=DEADLINE_S))
    assert replies == [b"rec-%d" % i for i in range(300)]
    messages = [b"m" * 16384 for _ in range(100)]  # 1.6 MB, over the stream windows of both hops
    assert channel.method("Collect", "stream_unary")(iter(messages), timeout=DEADLINE_S) == b"100"


def test_grpc_deadline_expires_through_the_mesh(cleanup, ca, recommend):
    outer, _ = mesh_pair(cleanup, ca, ["127.0.0.1", recommend], "grpc")
    channel = GrpcChannel(outer.ports["out"])
    cleanup(channel)
    with pytest.raises(grpc.RpcError) as info:
        channel.method("Slow")(b"", timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert channel.method("ForItem")(b"after", timeout=DEADLINE_S) == b"after-a,after-b,after-c"


def test_grpc_error_status_passes_through(cleanup, ca, recommend):
    outer, _ = mesh_pair(cleanup, ca, ["127.0.0.1", recommend], "grpc")
    channel = GrpcChannel(outer.ports["out"])
    cleanup(channel)
    with pytest.raises(grpc.RpcError) as info:
        channel.method("Fail")(b"", timeout=DEADLINE_S)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == "recommendations are warming up"


def flaky_server(failures: int):
    """A gRPC server whose Flaky method answers UNAVAILABLE `failures` times, then OK."""
    calls = []

    def flaky(request: bytes, context: grpc.ServicerContext) -> bytes:
        calls.append(request)
        if len(calls) <= failures:
            context.abort(grpc.StatusCode.UNAVAILABLE, "try again")
        return b"ok after %d" % len(calls)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)])
    kinds = {"request_deserializer": None, "response_serializer": None}
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "recommend.Recommend", {"Flaky": grpc.unary_unary_rpc_method_handler(flaky, **kinds)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port, calls


def test_grpc_retry_on_unavailable(cleanup, ca):
    server, port, calls = flaky_server(failures=2)
    cleanup(GrpcServer(server, port))
    outer, _ = mesh_pair(cleanup, ca, ["127.0.0.1", port], "grpc", retries=RETRIES)
    channel = GrpcChannel(outer.ports["out"])
    cleanup(channel)
    assert channel.method("Flaky")(b"x", timeout=DEADLINE_S) == b"ok after 3"
    assert calls == [b"x", b"x", b"x"]


def test_grpc_without_retries_sees_unavailable(cleanup, ca):
    server, port, calls = flaky_server(failures=1)
    cleanup(GrpcServer(server, port))
    outer, _ = mesh_pair(cleanup, ca, ["127.0.0.1", port], "grpc")
    channel = GrpcChannel(outer.ports["out"])
    cleanup(channel)
    with pytest.raises(grpc.RpcError) as info:
        channel.method("Flaky")(b"x", timeout=DEADLINE_S)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and len(calls) == 1


def test_grpc_authorization_per_stream(cleanup, ca, recommend):
    authz = {"default": "allow", "allow": None, "deny": [{"from": ["front"], "paths": ["/recommend.Recommend/Stream"]}]}
    outer, _ = mesh_pair(cleanup, ca, ["127.0.0.1", recommend], "grpc", authz=authz)
    channel = GrpcChannel(outer.ports["out"])
    cleanup(channel)
    assert channel.method("ForItem")(b"a", timeout=DEADLINE_S) == b"a-a,a-b,a-c"
    with pytest.raises(grpc.RpcError) as info:
        list(channel.method("Stream", "unary_stream")(b"3", timeout=DEADLINE_S))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


# -- HTTP/2 detected on an http service's outbound listener -----------------------------------------



def test_grpc_streams_take_connection_slots(cleanup, ca, recommend):
    """max_connections counts streams: one in flight fills a limit of 1, the next is UNAVAILABLE circuit-open."""
    outer, _ = mesh_pair(cleanup, ca, ["127.0.0.1", recommend], "grpc", limits={"max_connections": 1, "max_pending": 5})
    channel = GrpcChannel(outer.ports["out"])
    cleanup(channel)
    held = [channel.method("Slow").future(b"", timeout=60)]

    def refused() -> grpc.RpcError | None:
        try:
            channel.method("ForItem")(b"x", timeout=DEADLINE_S)
        except grpc.RpcError as exc:
            return exc
        return None

    def refused_while_held() -> grpc.RpcError | None:
        if held[0].done():  # ForItem reached the sidecar first and took the slot: hold it again
            held[0] = channel.method("Slow").future(b"", timeout=60)
        return refused()

    try:
        error = wait_for(refused_while_held, DEADLINE_S, "a second stream refused while the first holds the only slot")
        assert error.code() == grpc.StatusCode.UNAVAILABLE
        assert ("x-mesh-error", "circuit-open") in error.trailing_metadata()
    finally:
        held[0].cancel()
    wait_for(lambda: refused() is None, DEADLINE_S, "the slot given back when the held stream ends")

def h2_get(port: int, paths: list[str]) -> dict[str, tuple[int, bytes]]:
    """GET each path on one h2c (prior knowledge) connection, all streams at once."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
    streams: dict[int, str] = {}
    for path in paths:
        stream_id = conn.get_next_available_stream_id()
        conn.send_headers(stream_id, [(":method", "GET"), (":scheme", "http"), (":authority", "svc"), (":path", path)], end_stream=True)
        streams[stream_id] = path
    sock.sendall(conn.data_to_send())
    results: dict[str, list] = {path: [0, b""] for path in paths}
    finished: set[int] = set()
    try:
        while len(finished) < len(paths):
            data = sock.recv(65536)
            assert data, "connection closed with streams open"
            for event in conn.receive_data(data):
                if isinstance(event, h2.events.ResponseReceived):
                    results[streams[event.stream_id]][0] = int(dict(event.headers)[":status"])
                elif isinstance(event, h2.events.DataReceived):
                    results[streams[event.stream_id]][1] += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    finished.add(event.stream_id)
            sock.sendall(conn.data_to_send())
    finally:
        sock.close()
    return {path: (status, body) for path, (status, body) in results.items()}


def answer_with_path(server: h2.connection.H2Connection, request: h2.events.RequestReceived) -> None:
    body = dict(request.headers)[":path"].encode()
    server.send_headers(request.stream_id, [(":status", "200"), ("content-length", str(len(body)))])
    server.send_data(request.stream_id, body, end_stream=True)


def h2_app_server(cleanup, answer=answer_with_path) -> int:
    """An h2c server calling `answer(connection, request)` for each request (stands in for an HTTP/2 app)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve(conn: socket.socket) -> None:
        h2conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
        h2conn.initiate_connection()
        conn.sendall(h2conn.data_to_send())
        with conn:
            while not stop.is_set():
                data = conn.recv(65536)
                if not data:
                    return
                for event in h2conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        answer(h2conn, event)
                conn.sendall(h2conn.data_to_send())

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()

    class Handle:
        def stop(self) -> None:
            stop.set()
            thread.join(DEADLINE_S)
            listener.close()

    cleanup(Handle())
    return listener.getsockname()[1]


def test_http2_client_detected_on_an_http_listener(cleanup, ca):
    """h2c from the app, h2 over mTLS between sidecars, h2c to an HTTP/2 app (declared grpc)."""
    port = h2_app_server(cleanup)
    inner = Sidecar([{"name": "inbound", "kind": "inbound", "app": ["127.0.0.1", port], "protocol": "grpc"}])
    cleanup(inner)
    inner.start(tls=tls_block(ca, "svc"), trust_domain=TRUST_DOMAIN)
    block = service([("v1", inner.endpoint())], tls={"identity": spiffe_id(TRUST_DOMAIN, "svc")})
    outer = Sidecar([{"name": "out", "kind": "outbound", "service": "svc"}], {"svc": block})
    cleanup(outer)
    outer.start(tls=tls_block(ca, "front"), trust_domain=TRUST_DOMAIN)
    paths = ["/a", "/b?x=1", "/c/d"] * 10
    results = h2_get(outer.ports["out"], sorted(set(paths)))
    assert results == {path: (200, path.encode()) for path in set(paths)}


def test_http1_still_works_on_a_detecting_listener(cleanup, ca):
    app = Upstream()
    cleanup(app)
    outer, _ = mesh_pair(cleanup, ca, list(app.address), "http")
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", outer.ports["out"], timeout=DEADLINE_S)
    try:
        conn.request("GET", "/hello")
        assert conn.getresponse().status == 200
    finally:
        conn.close()


# -- opaque TCP ------------------------------------------------------------------------------------


class TcpServer:
    """Echo (uppercased, so the test sees it went through the server), or a banner first."""

    def __init__(self, banner: bytes | None = None) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.banner = banner
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.accept()
            except socket.timeout:
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            if self.banner is not None:
                conn.sendall(self.banner)
            while True:
                data = conn.recv(65536)
                if not data:
                    return
                conn.sendall(data.upper())

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(DEADLINE_S)
        self.listener.close()


def recv_exactly(sock: socket.socket, size: int) -> bytes:
    out = b""
    while len(out) < size:
        chunk = sock.recv(size - len(out))
        assert chunk, "closed after %r" % out
        out += chunk
    return out


@pytest.mark.parametrize("protocol", ["tcp", "http"])
def test_tcp_echo_through_the_mesh_with_mtls(cleanup, ca, protocol):
    """Binary bytes: relayed opaque, on a tcp listener from the start, on an http one after detection."""
    echo = TcpServer()
    cleanup(echo)
    outer, inner = mesh_pair(cleanup, ca, ["127.0.0.1", echo.port], protocol)
    payload = bytes(range(256)) * 4096  # 1 MiB, starting with bytes no protocol claims
    with socket.create_connection(("127.0.0.1", outer.ports["out"]), timeout=DEADLINE_S) as sock:
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        assert recv_exactly(sock, len(payload)) == payload.upper()
        sender.join(DEADLINE_S)
    with socket.create_connection(("127.0.0.1", inner.ports["inbound"]), timeout=DEADLINE_S) as plain:
        plain.sendall(b"\x00plaintext")  # strict mTLS: the inbound side refuses anything else
        assert plain.recv(100) in (b"",)


@pytest.mark.parametrize("protocol", ["tcp", "http"])
def test_server_first_protocol_does_not_hang(cleanup, ca, protocol):
    """A banner before any client byte: at once when declared tcp, after detection gives up otherwise."""
    server = TcpServer(banner=b"220 smtp.test ready\r\n")
    cleanup(server)
    outer, _ = mesh_pair(cleanup, ca, ["127.0.0.1", server.port], protocol)
    with socket.create_connection(("127.0.0.1", outer.ports["out"]), timeout=DEADLINE_S) as sock:
        assert recv_exactly(sock, 21) == b"220 smtp.test ready\r\n"
        sock.sendall(b"ehlo x\r\n")
        assert recv_exactly(sock, 8) == b"EHLO X\r\n"


def test_tcp_authorization_by_source_identity(cleanup, ca):
    echo = TcpServer()
    cleanup(echo)
    authz = {"default": "allow", "allow": [{"from": ["other"]}], "deny": []}
    outer, _ = mesh_pair(cleanup, ca, ["127.0.0.1", echo.port], "tcp", authz=authz)
    with socket.create_connection(("127.0.0.1", outer.ports["out"]), timeout=DEADLINE_S) as sock:
        sock.sendall(b"hello")
        assert sock.recv(100) == b""  # front is not allowed: the connection is closed, nothing relayed


@pytest.fixture
def redis(cleanup, tmp_path):
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed: `make test-deps` installs it as root with apt-get (its log: .state/test-deps.log)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )

    class Handle:
        def stop(self) -> None:
            proc.terminate()
            proc.wait(DEADLINE_S)

    cleanup(Handle())

    def ready() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(10) == b"+PONG\r\n"
        except OSError:
            return False

    wait_for(ready, DEADLINE_S, "redis")
    return port


def test_real_redis_through_the_mesh(cleanup, ca, redis):
    outer, _ = mesh_pair(cleanup, ca, ["127.0.0.1", redis], "tcp")
    with socket.create_connection(("127.0.0.1", outer.ports["out"]), timeout=DEADLINE_S) as sock:
        sock.sendall(b"*3\r\n$3\r\nSET\r\n$4\r\nmesh\r\n$2\r\nok\r\n*2\r\n$3\r\nGET\r\n$4\r\nmesh\r\n")
        assert recv_exactly(sock, len(b"+OK\r\n$2\r\nok\r\n")) == b"+OK\r\n$2\r\nok\r\n"



def test_tcp_relays_take_connection_slots(cleanup, ca):
    """max_connections counts relays: with one open and a limit of 1, the next connection is closed unrelayed."""
    echo = TcpServer()
    cleanup(echo)
    outer, _ = mesh_pair(cleanup, ca, ["127.0.0.1", echo.port], "tcp", limits={"max_connections": 1, "max_pending": 5})
    first = socket.create_connection(("127.0.0.1", outer.ports["out"]), timeout=DEADLINE_S)
    try:
        first.sendall(b"one")
        assert recv_exactly(first, 3) == b"ONE"
        with socket.create_connection(("127.0.0.1", outer.ports["out"]), timeout=DEADLINE_S) as second:
            second.sendall(b"two")
            try:
                assert second.recv(100) == b""
            except ConnectionResetError:
                pass  # closed with our bytes unread: the kernel resets instead
    finally:
        first.close()

    def relayed() -> bool:
        with socket.create_connection(("127.0.0.1", outer.ports["out"]), timeout=DEADLINE_S) as again:
            try:
                again.sendall(b"three")
                return again.recv(100) == b"THREE"
            except ConnectionResetError:
                return False  # still refused: the first relay's end has not reached the sidecar yet

    wait_for(relayed, DEADLINE_S, "the slot given back when the first relay closed")


# -- drain: SIGTERM with a stream or a relay open --------------------------------------------------


class GatedStream:
    """A gRPC server whose one method streams b"first", waits for `release`, then b"second"."""

    def __init__(self) -> None:
        self.release = threading.Event()

        def stream(request, context):
            yield b"first"
            self.release.wait(DEADLINE_S)
            yield b"second"

        handler = grpc.method_handlers_generic_handler("gated.Gated", {"Stream": grpc.unary_stream_rpc_method_handler(stream)})
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        self.server.add_generic_rpc_handlers((handler,))
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def stop(self) -> None:
        self.release.set()
        self.server.stop(grace=None).wait(DEADLINE_S)


def terminate_and_see_draining(*sidecars: Sidecar) -> None:
    for sidecar in sidecars:
        sidecar.terminate()
    for sidecar in sidecars:
        wait_for(lambda: any("draining" in line for line in sidecar.stderr_lines), DEADLINE_S, "drain to start")
        assert sidecar.proc.poll() is None  # held open by what is in flight


def test_sigterm_drains_an_open_grpc_stream_then_exits_0(cleanup, ca):
    gated = GatedStream()
    cleanup(gated)
    outer, inner = mesh_pair(cleanup, ca, ["127.0.0.1", gated.port], "grpc")
    channel = GrpcChannel(outer.ports["out"])
    cleanup(channel)
    call = channel.channel.unary_stream("/gated.Gated/Stream")(b"", timeout=DEADLINE_S)
    assert next(call) == b"first"
    terminate_and_see_draining(outer, inner)
    gated.release.set()
    assert list(call) == [b"second"] and call.code() == grpc.StatusCode.OK
    assert outer.wait(DEADLINE_S) == 0 and inner.wait(DEADLINE_S) == 0


def test_sigterm_drains_an_open_tcp_relay_then_exits_0(cleanup, ca):
    echo = TcpServer()
    cleanup(echo)
    outer, inner = mesh_pair(cleanup, ca, ["127.0.0.1", echo.port], "tcp")
    with socket.create_connection(("127.0.0.1", outer.ports["out"]), timeout=DEADLINE_S) as sock:
        sock.sendall(b"before")
        assert recv_exactly(sock, 6) == b"BEFORE"
        terminate_and_see_draining(outer, inner)
        sock.sendall(b"during drain")
        assert recv_exactly(sock, 12) == b"DURING DRAIN"
    assert outer.wait(DEADLINE_S) == 0 and inner.wait(DEADLINE_S) == 0
