"""Traffic policy through a real sidecar process: splits, header routes, sticky hashing,
outlier ejection, retry budgets, limits, faults, mirroring, HTTP/1.0 and CONNECT tunnels."""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.proxy_harness import Upstream, raw_exchange, read_responses, refused_port, service, wait_for


@pytest.fixture
def upstreams():
    started: list[Upstream] = []

    def start(name: str) -> Upstream:
        up = Upstream(name)
        started.append(up)
        return up

    try:
        yield start
    finally:
        for up in started:
            up.stop()


def outbound(sidecars, endpoints: list[tuple[str, Upstream]], **policy) -> int:
    """An outbound sidecar for service svc straight to the given upstreams; its port."""
    block = service([(version, up.address) for version, up in endpoints], **policy)
    sidecar = sidecars([{"name": "out", "kind": "outbound", "service": "svc"}], {"svc": block}).start()
    return sidecar.ports["out"]


def get(port: int, path: str = "/", headers: dict | None = None) -> tuple[int, dict, bytes]:
    lines = "".join("%s: %s\r\n" % item for item in (headers or {}).items())
    return raw_exchange(port, ("GET %s HTTP/1.1\r\nhost: svc\r\n%sconnection: close\r\n\r\n" % (path, lines)).encode())[0]


def who(body: bytes) -> str:
    return json.loads(body)["upstream"]


def pipelined(port: int, count: int, request: bytes) -> list[tuple[int, dict, bytes]]:
    """`count` copies of `request` pipelined on one keep-alive connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sender = threading.Thread(target=sock.sendall, args=(request * count,))
        sender.start()
        try:
            return read_responses(sock, count)
        finally:
            sender.join()


def test_split_distribution_over_10000_requests(sidecars, upstreams):
    v1, v2 = upstreams("v1"), upstreams("v2")
    port = outbound(sidecars, [("v1", v1), ("v2", v2)], split={"v1": 70, "v2": 30})
    request = b"GET /s HTTP/1.1\r\nhost: svc\r\n\r\n"
    with ThreadPoolExecutor(8) as pool:
        batches = list(pool.map(lambda _: pipelined(port, 1250, request), range(8)))
    counts = Counter(who(body) for batch in batches for status, _, body in batch if status == 200)
    assert sum(counts.values()) == 10000
    assert abs(counts["v2"] / 10000 - 0.30) <= 0.02, counts


def test_header_match_routes_canary_requests_to_v2(sidecars, upstreams):
    v1, v2 = upstreams("v1"), upstreams("v2")
    port = outbound(
        sidecars, [("v1", v1), ("v2", v2)], split={"v1": 100}, routes=[{"match": {"headers": {"x-canary": "true"}}, "version": "v2"}]
    )
    assert {who(get(port, headers={"x-canary": "true"})[2]) for _ in range(20)} == {"v2"}
    assert {who(get(port, headers={"x-canary": "false"})[2]) for _ in range(20)} == {"v1"}


@pytest.mark.parametrize(
    "balancer, header_for",
    [
        ({"kind": "consistent_hash", "header": "x-user"}, lambda key: {"x-user": key}),
        ({"kind": "consistent_hash", "cookie": "session"}, lambda key: {"cookie": "theme=dark; session=%s" % key}),
    ],
)
def test_consistent_hash_is_sticky_and_spreads_keys(sidecars, upstreams, balancer, header_for):
    ends = [upstreams("e%d" % index) for index in range(3)]
    port = outbound(sidecars, [("v1", up) for up in ends], load_balancer=balancer)

    def endpoints_for(key: str, count: int) -> set[str]:
        head = "".join("%s: %s\r\n" % item for item in header_for(key).items())
        request = ("GET /k HTTP/1.1\r\nhost: svc\r\n%s\r\n" % head).encode()
        return {who(body) for _, _, body in pipelined(port, count, request)}

    assert len(endpoints_for("alice", 200)) == 1
    assert len(endpoints_for("bob", 200)) == 1
    seen = set()
    for index in range(40):
        seen |= endpoints_for("user-%d" % index, 1)
    assert len(seen) >= 2


def test_outlier_ejection_moves_traffic_and_the_endpoint_comes_back(sidecars, upstreams):
    good, bad = upstreams("good"), upstreams("bad")
    bad.fail_status = 500
    outlier = {"consecutive_errors": 3, "interval": 0.2, "base_ejection_time": 1.0, "max_ejection_percent": 50}
    port = outbound(sidecars, [("v1", good), ("v1", bad)], outlier_detection=outlier)
    wait_for(lambda: get(port)[0] == 500 and len(bad.requests) >= 3, what="three failures on the bad endpoint")
    before = len(bad.requests)
    statuses = [get(port)[0] for _ in range(20)]
    if len(bad.requests) > before:  # the third failure raced with the first of these calls
        before = len(bad.requests)
        statuses = [get(port)[0] for _ in range(20)]
    assert statuses == [200] * 20 and len(bad.requests) == before
    bad.fail_status = None
    wait_for(lambda: get(port)[0] == 200 and len(bad.requests) > before, what="the ejected endpoint back in rotation")


def test_retry_budget_stops_retries(sidecars, upstreams):
    failing = upstreams("failing")
    failing.fail_status = 503
    retries = {"attempts": 3, "retry_on": ["5xx"], "backoff": 0.001, "max_backoff": 0.002, "budget": {"ratio": 0.1, "min_per_second": 0}}
    port = outbound(sidecars, [("v1", failing)], retries=retries, outlier_detection={"enabled": False})
    statuses = [status for status, _, _ in pipelined(port, 50, b"GET /r HTTP/1.1\r\nhost: svc\r\n\r\n")]
    assert statuses == [503] * 50
    assert 50 <= len(failing.requests) <= 50 + 10, len(failing.requests)


def test_failed_connects_are_retried_on_another_endpoint_without_a_retries_block(sidecars, upstreams):
    live = upstreams("live")
    block = service([("v1", ["127.0.0.1", refused_port()]), ("v1", live.address)])  # round robin, retries: None
    port = sidecars([{"name": "out", "kind": "outbound", "service": "svc"}], {"svc": block}).start().ports["out"]
    post = b"POST /order HTTP/1.1\r\nhost: svc\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"

    answers = [get(port) for _ in range(10)] + [raw_exchange(port, post)[0] for _ in range(10)]

    # Half the picks are the refused endpoint: nothing was sent there, so even a POST goes to the other.
    assert [status for status, _, _ in answers] == [200] * 20
    assert {who(body) for _, _, body in answers} == {"live"}
    assert [method for method, _, _, _ in live.requests].count("POST") == 10


def test_limits_queue_in_order_then_answer_circuit_open(sidecars, upstreams):
    slow = upstreams("slow")
    port = outbound(sidecars, [("v1", slow)], limits={"max_connections": 1, "max_pending": 2})
    socks = []
    try:
        for path in ("/slow", "/queued-1", "/queued-2"):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            socks.append(sock)
            sock.sendall(b"GET %s HTTP/1.1\r\nhost: svc\r\n\r\n" % path.encode())
            if path == "/slow":
                assert slow.slow_started.wait(10)
        wait_for(lambda: get(port)[1].get("x-mesh-error") == "circuit-open", what="circuit-open once the queue is full")
        status, headers, _ = get(port)
        assert (status, headers["x-mesh-error"]) == (503, "circuit-open")
        slow.release.set()
        assert [read_responses(sock, 1)[0][0] for sock in socks] == [200, 200, 200]
        assert [path for _, path, _, _ in slow.requests] == ["/slow", "/queued-1", "/queued-2"]
    finally:
        for sock in socks:
            sock.close()


def test_fault_abort_and_delay(sidecars, upstreams):
    up = upstreams("up")
    routes = [
        {"match": {"path": {"prefix": "/abort"}}, "version": "v1", "fault": {"abort": {"status": 429, "percent": 100}}},
        {"match": {"path": {"prefix": "/delay"}}, "version": "v1", "fault": {"delay": {"fixed": 0.05, "percent": 100}}},
    ]
    port = outbound(sidecars, [("v1", up)], routes=routes)
    for _ in range(10):
        status, headers, _ = get(port, "/abort")
        assert (status, headers["x-mesh-error"]) == (429, "fault-abort")
    assert not up.requests
    assert [get(port, "/delay")[0] for _ in range(5)] == [200] * 5


def test_mirror_gets_a_shadow_copy_and_the_client_sees_only_the_primary(sidecars, upstreams):
    v1, v2 = upstreams("v1"), upstreams("v2")
    routes = [{"match": {"path": {"prefix": "/"}}, "version": "v1", "mirror": {"version": "v2", "percent": 100}}]
    port = outbound(sidecars, [("v1", v1), ("v2", v2)], routes=routes)
    status, _, body = get(port, "/m")
    assert status == 200 and who(body) == "v1"
    body_request = b"POST /post HTTP/1.1\r\nhost: svc:8080\r\ncontent-length: 5\r\n\r\nhello"
    status, _, body = raw_exchange(port, body_request)[0]
    assert status == 200 and who(body) == "v1"
    wait_for(lambda: len(v2.requests) == 2, what="both copies at the mirror")
    (_, path, headers, _), (_, _, post_headers, post_body) = v2.requests
    assert path == "/m" and headers["host"] == "svc-shadow" and headers["x-mesh-mirror"] == "1"
    assert post_headers["host"] == "svc-shadow:8080" and post_body == b"hello"
    assert all("x-mesh-mirror" not in headers for _, _, headers, _ in v1.requests)


@pytest.mark.parametrize("mirror_fault", ["hang", "refused"])
def test_a_broken_mirror_does_not_affect_the_primary(sidecars, upstreams, mirror_fault):
    v1 = upstreams("v1")
    mirror_address: list = refused_port()  # type: ignore[assignment]
    endpoints = [("v1", v1.address)]
    if mirror_fault == "hang":
        hanging = upstreams("v2")
        hanging.hang = True
        endpoints.append(("v2", hanging.address))
    else:
        endpoints.append(("v2", ["127.0.0.1", mirror_address]))
    routes = [{"match": {"path": {"prefix": "/"}}, "version": "v1", "mirror": {"version": "v2", "percent": 100}}]
    block = service(endpoints, routes=routes)
    sidecar = sidecars([{"name": "out", "kind": "outbound", "service": "svc"}], {"svc": block}).start()
    results = pipelined(sidecar.ports["out"], 30, b"GET /p HTTP/1.1\r\nhost: svc\r\n\r\n")
    assert [(status, who(body)) for status, _, body in results] == [(200, "v1")] * 30


def test_http_1_0_keep_alive(sidecars, upstreams):
    up = upstreams("up")
    port = outbound(sidecars, [("v1", up)])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        for _ in range(3):
            sock.sendall(b"GET /ka HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            status, headers, body = read_responses(sock, 1)[0]
            assert status == 200 and headers["connection"].lower() == "keep-alive" and who(body) == "up"
        sock.sendall(b"GET /last HTTP/1.0\r\n\r\n")
        status, headers, _ = read_responses(sock, 1)[0]
        assert status == 200 and headers["connection"].lower() == "close"
        assert sock.recv(1) == b""
    assert up.connections == 1  # the upstream leg was kept alive too
    assert all(headers["connection"] == "keep-alive" for _, _, headers, _ in up.requests)


@pytest.fixture
def echo_server():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                while chunk := conn.recv(65536):
                    conn.sendall(chunk)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        server.close()
        thread.join(10)


def test_connect_tunnels_to_an_egress_host_and_refuses_others(sidecars, upstreams, echo_server):
    up = upstreams("svc")
    proxy = sidecars(
        [{"name": "proxy", "kind": "forward"}], {"svc": service([("v1", up.address)])}, egress=["127.0.0.1:%d" % echo_server]
    ).start()
    port = proxy.ports["proxy"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nhost: 127.0.0.1:%d\r\n\r\nearly " % (echo_server, echo_server))
        received = b""
        while b"\r\n\r\n" not in received:
            received += sock.recv(65536)
        head, _, rest = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200")
        payload = b"x" * 300_000
        sender = threading.Thread(target=sock.sendall, args=(payload,))
        sender.start()
        while len(rest) < len(b"early ") + len(payload):
            chunk = sock.recv(65536)
            assert chunk
            rest += chunk
        sender.join()
        assert rest == b"early " + payload
    denied = raw_exchange(port, b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n" % refused_port())[0]
    assert (denied[0], denied[1]["x-mesh-error"]) == (403, "egress-denied")
    mesh = raw_exchange(port, b"CONNECT svc.mesh:443 HTTP/1.1\r\n\r\n")[0]
    assert (mesh[0], mesh[1]["x-mesh-error"]) == (400, "bad-request") and b"plain HTTP" in mesh[2]


def test_a_connect_tunnel_passes_half_close_and_a_refused_host_is_a_502(sidecars, upstreams, echo_server):
    up = upstreams("svc")
    closed = refused_port()
    proxy = sidecars(
        [{"name": "proxy", "kind": "forward"}], {"svc": service([("v1", up.address)])},
        egress=["127.0.0.1:%d" % echo_server, "127.0.0.1:%d" % closed],
    ).start()
    port = proxy.ports["proxy"]
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        # The client's half-close reaches the echo server, whose close after echoing reaches the client.
        sock.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\nbefore the 200, " % echo_server)
        sock.sendall(b"and after")
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received == b"HTTP/1.1 200 Connection Established\r\n\r\nbefore the 200, and after"
    status, headers, body = raw_exchange(port, b"CONNECT 127.0.0.1:%d HTTP/1.1\r\n\r\n" % closed)[0]
    assert (status, headers["x-mesh-error"]) == (502, "upstream-connect-failed")
    assert b"egress 127.0.0.1:%d" % closed in body
