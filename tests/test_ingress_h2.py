"""HTTP/2 and gRPC through the ingress, and the mesh's own errors as gRPC statuses.

Real sidecar processes as the agent runs them: an ingress sidecar (the mesh's front door,
h2c and HTTP/1.1 on one plain port, or TLS with ALPN) in front of a service's sidecar with
mTLS between them, and real clients: grpcio, the h2 library, curl, h2load.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from meshctl.agent.ca import spiffe_id
from meshctl.proxy.detect import DETECT_TIMEOUT_S
from tests.proxy_harness import Sidecar, Upstream, service
from tests.test_protocols_mesh import GrpcServer, load_recommend
from tests.tlspeers import TRUST_DOMAIN, tls_block, user_certificate

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 10.0
GRPC_ROUTE = "/recommend.Recommend/"


def service_sidecar(cleanup, ca, name: str, app: list, protocol: str, authz=None) -> Sidecar:
    inner = Sidecar([{"name": "inbound", "kind": "inbound", "app": app, "protocol": protocol}])
    cleanup(inner)
    inner.start(tls=tls_block(ca, name), trust_domain=TRUST_DOMAIN, authz=authz, service=name)
    return inner


def ingress(cleanup, ca, services: dict, routes: list, ingress_tls: dict | None = None) -> Sidecar:
    """The ingress sidecar; `services` maps a name to (its service sidecar or None for no endpoints, protocol, policy)."""
    blocks = {}
    for name, (inner, protocol, policy) in services.items():
        endpoints = [("v1", inner.endpoint())] if inner is not None else []
        blocks[name] = service(endpoints, protocol=protocol, tls={"identity": spiffe_id(TRUST_DOMAIN, name)}, **policy)
    front = Sidecar([{"name": "ingress", "kind": "ingress", "routes": routes}], blocks)
    cleanup(front)
    extra = {"ingress_tls": ingress_tls} if ingress_tls is not None else {}
    front.start(tls=tls_block(ca, "ingress"), trust_domain=TRUST_DOMAIN, service="None", **extra)
    return front


class Channel:
    def __init__(self, channel: grpc.Channel) -> None:
        self.channel = channel

    def method(self, name: str, kind: str = "unary_unary", service_name: str = "recommend.Recommend"):
        return getattr(self.channel, kind)("/%s/%s" % (service_name, name), request_serializer=None, response_deserializer=None)

    def stop(self) -> None:
        self.channel.close()


def plain_channel(cleanup, port: int) -> Channel:
    channel = Channel(grpc.insecure_channel("127.0.0.1:%d" % port, options=[("grpc.enable_http_proxy", 0)]))
    cleanup(channel)
    return channel


@pytest.fixture
def recommend(cleanup):
    server, port = load_recommend().build_server(0)
    cleanup(GrpcServer(server, port))
    return port


@pytest.fixture
def shop(cleanup, ca, recommend):
    """An ingress routing /recommend.Recommend/ to a gRPC service and / to an HTTP/1.1 app."""
    app = Upstream("web")
    cleanup(app)
    rec = service_sidecar(cleanup, ca, "recommend", ["127.0.0.1", recommend], "grpc")
    web = service_sidecar(cleanup, ca, "web", list(app.address), "http")
    front = ingress(cleanup, ca, {"recommend": (rec, "grpc", {}), "web": (web, "http", {})},
                    [{"path": GRPC_ROUTE, "service": "recommend"}, {"path": "/", "service": "web"}])
    return front, app


def test_grpc_unary_and_streaming_through_the_ingress(cleanup, shop):
    front, _ = shop
    channel = plain_channel(cleanup, front.ports["ingress"])
    response, call = channel.method("ForItem").with_call(b"sku1", timeout=DEADLINE_S)
    assert response == b"sku1-a,sku1-b,sku1-c" and call.code() == grpc.StatusCode.OK
    assert ("x-served-by", "recommend@v1#0") in call.trailing_metadata()  # trailers pass through
    replies = list(channel.method("Stream", "unary_stream")(b"300", timeout=DEADLINE_S))
    assert replies == [b"rec-%d" % i for i in range(300)]
    messages = [b"m" * 16384 for _ in range(100)]  # 1.6 MB, over the stream windows of both hops
    assert channel.method("Collect", "stream_unary")(iter(messages), timeout=DEADLINE_S) == b"100"


def test_grpc_deadline_expires_through_the_ingress(cleanup, shop):
    front, _ = shop
    channel = plain_channel(cleanup, front.ports["ingress"])
    with pytest.raises(grpc.RpcError) as info:
        channel.method("Slow")(b"", timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert channel.method("ForItem")(b"after", timeout=DEADLINE_S) == b"after-a,after-b,after-c"


def h2_call(port: int, headers: list[tuple[str, str]], body: bytes = b"") -> tuple[dict, bytes, dict]:
    """One request on a fresh h2c connection: (response headers, body, trailers)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    stream_id = conn.get_next_available_stream_id()
    conn.send_headers(stream_id, headers, end_stream=not body)
    if body:
        conn.send_data(stream_id, body, end_stream=True)
    response: dict = {}
    trailers: dict = {}
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        sock.sendall(conn.data_to_send())
        ended = False
        while not ended:
            chunk = sock.recv(65536)
            assert chunk, "connection closed before the stream ended"
            for event in conn.receive_data(chunk):
                if isinstance(event, h2.events.ResponseReceived):
                    response = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived):
                    data += event.data
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, h2.events.TrailersReceived):
                    trailers = dict(event.headers)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    ended = True
            sock.sendall(conn.data_to_send())
    return response, data, trailers


def grpc_request(path: str, timeout: str | None = None) -> list[tuple[str, str]]:
    headers = [(":method", "POST"), (":scheme", "http"), (":authority", "shop"), (":path", path),
               ("content-type", "application/grpc"), ("te", "trailers")]
    return headers + ([("grpc-timeout", timeout)] if timeout else [])


def test_grpc_timeout_is_the_deadline_at_the_ingress(shop):
    """grpc-timeout, not the route's 15 s, bounds the call: the ingress answers DEADLINE_EXCEEDED itself."""
    front, _ = shop
    response, _, trailers = h2_call(front.ports["ingress"], grpc_request(GRPC_ROUTE + "Slow", "200m"), b"\x00\x00\x00\x00\x00")
    answer = {**response, **trailers}  # trailers-only, or trailers if the app's head went out first
    assert answer["grpc-status"] == "4" and answer["x-mesh-error"] == "timeout"
    assert answer["grpc-message"].startswith("timeout: recommend: ")


def test_http1_still_works_on_the_ingress_port(shop):
    front, app = shop
    conn = http.client.HTTPConnection("127.0.0.1", front.ports["ingress"], timeout=DEADLINE_S)
    try:
        for path in ("/hello", "/world?x=1"):
            conn.request("GET", path)
            reply = conn.getresponse()
            assert reply.status == 200 and path.encode() in reply.read()
    finally:
        conn.close()
    assert [request[1] for request in app.requests] == ["/hello", "/world?x=1"]


def test_a_slow_http1_client_is_not_mistaken_for_another_protocol(shop):
    """Bytes that arrive slower than the detection wait are still parsed as HTTP/1.1 on the ingress."""
    front, app = shop
    with socket.create_connection(("127.0.0.1", front.ports["ingress"]), timeout=DEADLINE_S) as sock:
        sock.sendall(b"GE")
        time.sleep(DETECT_TIMEOUT_S + 0.2)  # the client is this slow on purpose: detection gives up waiting meanwhile
        sock.sendall(b"T /patient-client HTTP/1.1\r\nhost: shop\r\nconnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
    assert app.requests[-1][1] == "/patient-client"


# -- the mesh's own errors, as gRPC statuses -------------------------------------------------


def assert_mesh_status(error: grpc.RpcError, status: grpc.StatusCode, code: str, service_name: str) -> None:
    assert error.code() == status, (error.code(), error.details())
    assert ("x-mesh-error", code) in error.trailing_metadata()
    assert error.details().startswith(code + ": " + service_name + ": "), error.details()


def call_error(method, request: bytes = b"x", timeout: float = DEADLINE_S) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        method(request, timeout=timeout)
    return info.value


def test_mesh_errors_reach_grpc_clients_as_statuses(cleanup, ca, recommend):
    """forbidden, route-not-found, timeout and no-healthy-endpoints, each as its gRPC status."""
    deny = {"default": "allow", "allow": None, "deny": [{"from": ["ingress"], "paths": [GRPC_ROUTE + "Stream"]}]}
    rec = service_sidecar(cleanup, ca, "recommend", ["127.0.0.1", recommend], "grpc", authz=deny)
    slow = service_sidecar(cleanup, ca, "slow", ["127.0.0.1", recommend], "grpc")
    front = ingress(cleanup, ca, {
        "recommend": (rec, "grpc", {}),
        "slow": (slow, "grpc", {"timeout": 0.3}),
        "empty": (None, "grpc", {}),
    }, [{"path": GRPC_ROUTE, "service": "recommend"}, {"path": GRPC_ROUTE + "Slow", "service": "slow"},
        {"path": "/empty.Recommend/", "service": "empty"}])
    channel = plain_channel(cleanup, front.ports["ingress"])
    assert channel.method("ForItem")(b"a", timeout=DEADLINE_S) == b"a-a,a-b,a-c"
    with pytest.raises(grpc.RpcError) as info:
        list(channel.method("Stream", "unary_stream")(b"3", timeout=DEADLINE_S))
    assert_mesh_status(info.value, grpc.StatusCode.PERMISSION_DENIED, "forbidden", "recommend")
    error = call_error(channel.method("ForItem", service_name="nowhere.Service"))
    assert_mesh_status(error, grpc.StatusCode.UNIMPLEMENTED, "route-not-found", "ingress")
    error = call_error(channel.method("Slow"))  # the longest prefix: service slow, whose route times out
    assert_mesh_status(error, grpc.StatusCode.DEADLINE_EXCEEDED, "timeout", "slow")
    error = call_error(channel.method("ForItem", service_name="empty.Recommend"))
    assert_mesh_status(error, grpc.StatusCode.UNAVAILABLE, "no-healthy-endpoints", "empty")


# -- HTTP/2 clients to an HTTP/1.1 app -------------------------------------------------------


def test_curl_http2_prior_knowledge_through_the_ingress(shop):
    front, app = shop
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    done = subprocess.run(
        ["curl", "-sS", "--http2-prior-knowledge", "-D", "-", "-X", "POST", "--data-binary", "hello body",
         "http://127.0.0.1:%d/echo?q=1" % front.ports["ingress"]],
        capture_output=True, timeout=DEADLINE_S, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("HTTP/2 200"), done.stdout
    method, path, headers, body = app.requests[-1]  # the app got HTTP/1.1, body and all
    assert (method, path, body) == ("POST", "/echo?q=1", b"hello body")
    assert headers["host"] == "127.0.0.1:%d" % front.ports["ingress"]
    # The ingress gives the request an id, the app sees it and the client gets it back.
    answered = dict(line.split(": ", 1) for line in done.stdout.split("\n\n")[0].splitlines()[1:])
    assert answered["x-request-id"] and answered["x-request-id"] == headers["x-request-id"]
    kept = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "-D", "-", "-o", "/dev/null", "-H", "x-request-id: mine-1",
                           "http://127.0.0.1:%d/echo" % front.ports["ingress"]], capture_output=True, timeout=DEADLINE_S, text=True)
    assert "x-request-id: mine-1\n" in kept.stdout and app.requests[-1][2]["x-request-id"] == "mine-1"
    chunked = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "http://127.0.0.1:%d/chunked-response" % front.ports["ingress"]],
                             capture_output=True, timeout=DEADLINE_S)
    assert chunked.stdout == b"hello world", chunked.stdout + chunked.stderr  # the chunk framing stays in HTTP/1.1
    big = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "http://127.0.0.1:%d/big?n=3000000" % front.ports["ingress"]],
                         capture_output=True, timeout=DEADLINE_S)
    assert len(big.stdout) == 3000000, big.stderr  # many stream windows: the bridge pauses and resumes the app


def test_h2load_through_the_ingress(shop):
    front, app = shop
    if shutil.which("h2load") is None:
        pytest.skip("h2load is not installed (make test-deps installs nghttp2-client)")
    done = subprocess.run(["h2load", "-n", "200", "-c", "4", "-m", "10", "http://127.0.0.1:%d/h2load" % front.ports["ingress"]],
                          capture_output=True, timeout=60, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "200 succeeded, 0 failed, 0 errored" in done.stdout, done.stdout
    assert sum(1 for request in app.requests if request[1] == "/h2load") == 200


# -- TLS on the ingress: ALPN h2 beside http/1.1 ---------------------------------------------------


def test_tls_ingress_offers_h2_by_alpn_and_keeps_http1(cleanup, ca, recommend):
    app = Upstream("web")
    cleanup(app)
    cert_pem, key_pem = user_certificate("localhost", dns_names=("localhost",))
    rec = service_sidecar(cleanup, ca, "recommend", ["127.0.0.1", recommend], "grpc")
    web = service_sidecar(cleanup, ca, "web", list(app.address), "http")
    front = ingress(cleanup, ca, {"recommend": (rec, "grpc", {}), "web": (web, "http", {})},
                    [{"path": GRPC_ROUTE, "service": "recommend"}, {"path": "/", "service": "web"}],
                    ingress_tls={"cert_pem": cert_pem, "key_pem": key_pem})
    port = front.ports["ingress"]
    context = ssl.create_default_context(cadata=cert_pem)
    for offered, chosen in ((["h2", "http/1.1"], "h2"), (["http/1.1"], "http/1.1")):
        context.set_alpn_protocols(offered)
        with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.selected_alpn_protocol() == chosen
    channel = Channel(grpc.secure_channel("localhost:%d" % port, grpc.ssl_channel_credentials(cert_pem.encode()),
                                          options=[("grpc.enable_http_proxy", 0)]))
    cleanup(channel)
    assert channel.method("ForItem")(b"tls", timeout=DEADLINE_S) == b"tls-a,tls-b,tls-c"
    assert list(channel.method("Stream", "unary_stream")(b"3", timeout=DEADLINE_S)) == [b"rec-0", b"rec-1", b"rec-2"]
    conn = http.client.HTTPSConnection("localhost", port, timeout=DEADLINE_S, context=ssl.create_default_context(cadata=cert_pem))
    try:
        conn.request("GET", "/over-tls")
        assert conn.getresponse().status == 200
    finally:
        conn.close()
    if shutil.which("curl") is not None:
        done = subprocess.run(["curl", "-sS", "--http2", "--cacert", "/dev/stdin", "-o", "/dev/null", "-w", "%{http_version} %{http_code}",
                               "https://localhost:%d/curl-h2" % port], input=cert_pem, capture_output=True, text=True, timeout=DEADLINE_S)
        assert done.stdout == "2 200", done.stdout + done.stderr
    assert [request[1] for request in app.requests] == ["/over-tls"] + (["/curl-h2"] if shutil.which("curl") else [])


# -- the demo: a gRPC client outside the mesh, through a real mesh's ingress ---------------------------

DEMO = """
mesh: {name}
services:
  recommend:
    command: {PY} %s
    protocol: grpc
  web:
    command: {PY} {APPS}/echo.py
    health: {{http: /healthz}}
ingress:
  port: {port}
  routes: [{{path: /, service: web}}, {{path: /recommend.Recommend/, service: recommend}}]
""" % (ROOT / "demo-services" / "recommend.py")


def test_recommend_client_reaches_recommend_through_the_ingress(mesh):
    from tests.meshharness import free_port

    port = free_port()
    mesh.write_manifest(DEMO.format(name="grpcingress", port=port, PY="{PY}", APPS="{APPS}"))
    mesh.up()
    done = subprocess.run([sys.executable, str(ROOT / "demo-services" / "recommend_client.py"), "--url", "http://127.0.0.1:%d" % port,
                           "mug-01"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert "served by recommend@v1#0" in done.stdout and done.stdout.count(",") == 2, done.stdout
    if shutil.which("curl") is not None:  # HTTP/2 on the same port reaches an HTTP/1.1 app
        plain = subprocess.run(["curl", "-sS", "--http2-prior-knowledge", "http://127.0.0.1:%d/whoami" % port],
                               capture_output=True, text=True, timeout=30)
        assert plain.returncode == 0 and json.loads(plain.stdout)["service"] == "web", plain.stdout + plain.stderr
