"""The sidecar as a real process: forwarding, keep-alive, errors, timeouts, config, drain."""

from __future__ import annotations

import http.client
import json
import socket
import threading

import psutil
import pytest

from tests.proxy_harness import LOOPS, Sidecar, Upstream, raw_exchange, read_responses, refused_port, service, wait_for


@pytest.fixture
def connect():
    """Open http.client connections to a port; all are closed when the test ends."""
    opened: list[http.client.HTTPConnection] = []

    def open_connection(port: int) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        opened.append(conn)
        return conn

    try:
        yield open_connection
    finally:
        for conn in opened:
            conn.close()


@pytest.fixture(params=LOOPS)
def loop(request):
    return request.param


def pair(sidecars, upstream: Upstream, loop: str, **policy) -> tuple[Sidecar, Sidecar]:
    """app -> outbound sidecar -> inbound sidecar -> upstream app."""
    inner = sidecars([{"name": "inbound", "kind": "inbound", "app": upstream.address}], loop=loop).start()
    outer = sidecars(
        [{"name": "out", "kind": "outbound", "service": "svc"}], {"svc": service([("v1", inner.endpoint())], **policy)}, loop=loop
    ).start()
    return outer, inner


def request(port: int, method: str = "GET", path: str = "/", body=None, headers=None, conn=None):
    """One request; on a new connection (closed afterwards) unless `conn` is given."""
    own = conn is None
    conn = conn or http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {}, encode_chunked=not isinstance(body, (bytes, type(None))))
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        if own:
            conn.close()


def test_get_and_post_through_a_sidecar_pair(sidecars, upstream, loop, connect):
    outer, _ = pair(sidecars, upstream, loop)
    conn = connect(outer.ports["out"])
    status, _, body = request(0, path="/hello?q=1", conn=conn)
    echo = json.loads(body)
    assert status == 200 and echo["path"] == "/hello?q=1"
    names = [name for name, _ in echo["headers"]]
    assert "x-request-id" in names and "x-forwarded-for" in names and "forwarded" in names
    status, _, body = request(0, "POST", "/post", body=b"x" * 1000, conn=conn)
    assert json.loads(body)["body"] == "x" * 1000
    status, _, body = request(0, "POST", "/chunked", body=iter([b"abc", b"defg"]), conn=conn)
    assert json.loads(body)["body"] == "abcdefg"
    status, headers, body = request(0, path="/chunked-response", conn=conn)
    assert (status, body) == (200, b"hello world")
    status, headers, body = request(0, "HEAD", "/head", conn=conn)
    assert status == 200 and body == b"" and int(headers["content-length"]) > 0
    status, _, _ = request(0, path="/after-head", conn=conn)
    assert status == 200


def test_existing_request_id_is_kept_and_hop_by_hop_headers_are_dropped(sidecars, upstream):
    outer, _ = pair(sidecars, upstream, "uvloop")
    _, _, body = request(
        outer.ports["out"], headers={"x-request-id": "abc", "Connection": "x-private", "X-Private": "1", "TE": "trailers", "Keep-Alive": "5"}
    )
    headers = json.loads(body)["headers"]
    names = [name for name, _ in headers]
    assert ["x-request-id", "abc"] in headers and names.count("x-request-id") == 1
    assert not {"connection", "x-private", "te", "keep-alive"} & set(names)


def test_keep_alive_connections_are_reused_end_to_end(sidecars, upstream, loop, connect):
    outer, _ = pair(sidecars, upstream, loop)
    for _ in range(3):
        conn = connect(outer.ports["out"])
        for _ in range(10):
            assert request(0, conn=conn)[0] == 200
        conn.close()
    assert upstream.connections == 1


def test_pipelined_requests_are_answered_in_order(sidecars, upstream, loop):
    outer, _ = pair(sidecars, upstream, loop)
    data = b"".join(b"GET /p%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(20))
    data += b"POST /p20 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
    responses = raw_exchange(outer.ports["out"], data, responses=21)
    assert [json.loads(body)["path"] for _, _, body in responses] == ["/p%d" % i for i in range(21)]


@pytest.mark.parametrize(
    "raw,status,code",
    [
        (b"GET / HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n", 400, "bad-request"),
        (b"GET / HTTP/1.1\r\nX: a\r\n b\r\n\r\n", 400, "bad-request"),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n", 431, "header-too-large"),
        (b"POST / HTTP/1.1\r\nContent-Length: 2000\r\n\r\n", 413, "body-too-large"),
        (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", 400, "bad-request"),
    ],
)
def test_malformed_requests_get_an_error_and_a_close(sidecars, upstream, raw, status, code):
    outer, _ = pair(sidecars, upstream, "uvloop")
    outer.send(outer.config(http={"max_header_bytes": 65536, "max_body_bytes": 1000, "header_timeout": 10.0, "idle_timeout": 60.0}))
    [(got_status, headers, body)] = raw_exchange(outer.ports["out"], raw)
    assert (got_status, headers["x-mesh-error"], headers.get("connection")) == (status, code, "close")
    assert body.startswith(code.encode()) and body.endswith(b"\n")
    assert request(outer.ports["out"])[0] == 200  # the process is fine


def test_upstream_connect_failed_is_a_named_502(sidecars, loop):
    port = refused_port()
    outer = sidecars([{"name": "out", "kind": "outbound", "service": "cart"}], {"cart": service([("v1", ["127.0.0.1", port])])}, loop=loop).start()
    status, headers, body = request(outer.ports["out"])
    assert (status, headers["x-mesh-error"]) == (502, "upstream-connect-failed")
    assert body.decode() == "upstream-connect-failed: cart@v1 (127.0.0.1:%d): connection refused\n" % port


def test_upstream_closing_before_or_during_the_response(sidecars, upstream, loop, connect):
    outer, _ = pair(sidecars, upstream, loop)
    status, headers, body = request(outer.ports["out"], path="/close-before")
    assert (status, headers["x-mesh-error"]) == (502, "upstream-reset")
    conn = connect(outer.ports["out"])
    conn.request("GET", "/close-mid")
    response = conn.getresponse()
    with pytest.raises(http.client.IncompleteRead):
        response.read()
    assert request(outer.ports["out"])[0] == 200


def test_timeout_is_a_504_before_the_response(sidecars, upstream, loop):
    outer, _ = pair(sidecars, upstream, loop, timeout=0.3)
    status, headers, body = request(outer.ports["out"], path="/slow")
    assert (status, headers["x-mesh-error"]) == (504, "timeout")
    assert body.startswith(b"timeout: svc@v1 (127.0.0.1:")


def test_no_endpoints_is_a_503(sidecars):
    outer = sidecars([{"name": "out", "kind": "outbound", "service": "cart"}], {"cart": service([])}).start()
    status, headers, body = request(outer.ports["out"])
    assert (status, headers["x-mesh-error"]) == (503, "no-healthy-endpoints")


def test_forward_proxy_mode_and_egress(sidecars, upstream, loop):
    other = Upstream("outside")
    try:
        proxy = sidecars([{"name": "proxy", "kind": "forward"}], {"cart": service([("v1", upstream.address)])}, loop=loop)
        proxy.start(egress=["127.0.0.1:%d" % other.port])
        port = proxy.ports["proxy"]
        for host in ("cart", "cart.mesh", "CART.mesh:80"):
            status, _, body = request(port, path="http://%s/items?x=1" % host)
            assert status == 200 and json.loads(body)["path"] == "/items?x=1" and json.loads(body)["upstream"] == "app"
        status, _, body = request(port, path="http://127.0.0.1:%d/out" % other.port)
        assert status == 200 and json.loads(body)["upstream"] == "outside"
        status, headers, body = request(port, path="http://example.com/")
        assert (status, headers["x-mesh-error"]) == (403, "egress-denied")
        assert b"example.com:80" in body
    finally:
        other.stop()


def test_ingress_routes_by_longest_prefix(sidecars, loop):
    api, web = Upstream("api"), Upstream("web")
    try:
        ingress = sidecars(
            [{"name": "ingress", "kind": "ingress", "routes": [{"path": "/", "service": "web"}, {"path": "/api", "service": "api"}]}],
            {"api": service([("v1", api.address)]), "web": service([("v1", web.address)])},
            loop=loop,
        ).start()
        port = ingress.ports["ingress"]
        assert json.loads(request(port, path="/api/items")[2])["upstream"] == "api"
        assert json.loads(request(port, path="/api")[2])["upstream"] == "api"
        assert json.loads(request(port, path="/apix")[2])["upstream"] == "web"
        assert json.loads(request(port, path="/")[2])["upstream"] == "web"
        ingress.send(ingress.config(listeners=ingress.listeners))
    finally:
        api.stop()
        web.stop()


def test_ingress_without_a_matching_route_is_404(sidecars, upstream):
    ingress = sidecars([{"name": "ingress", "kind": "ingress", "routes": [{"path": "/api", "service": "api"}]}], {"api": service([("v1", upstream.address)])}).start()
    status, headers, _ = request(ingress.ports["ingress"], path="/other")
    assert (status, headers["x-mesh-error"]) == (404, "route-not-found")


def test_config_update_changes_endpoints_and_a_broken_one_is_nacked(sidecars, loop):
    first, second = Upstream("first"), Upstream("second")
    try:
        outer = sidecars([{"name": "out", "kind": "outbound", "service": "svc"}], {"svc": service([("v1", first.address)])}, loop=loop).start()
        port = outer.ports["out"]
        assert json.loads(request(port)[2])["upstream"] == "first"
        reply = outer.send(outer.config(services={"svc": service([("v1", second.address)])}))
        assert reply == {"type": "ack", "version": 2}
        assert json.loads(request(port)[2])["upstream"] == "second"
        reply = outer.send(outer.config(services={"svc": service([("v1", first.address)], split={"v1": 90})}))
        assert reply["type"] == "nack" and reply["version"] == 3 and "split" in reply["error"]
        changed = [dict(entry, name="renamed") for entry in outer.listeners]
        assert outer.send(outer.config(listeners=changed))["type"] == "nack"
        assert json.loads(request(port)[2])["upstream"] == "second"
    finally:
        first.stop()
        second.stop()


def test_sigterm_drains_an_in_flight_request_then_exits_0(sidecars, upstream, loop):
    outer, inner = pair(sidecars, upstream, loop)
    result = {}

    def slow_call():
        result["response"] = request(outer.ports["out"], path="/slow")

    thread = threading.Thread(target=slow_call)
    thread.start()
    assert upstream.slow_started.wait(10)
    outer.terminate()
    wait_for(lambda: any("draining" in line for line in outer.stderr_lines), what="drain to start")
    assert outer.proc.poll() is None  # waits for the in-flight request
    upstream.release.set()
    thread.join(10)
    assert result["response"][0] == 200
    assert outer.wait(10) == 0


def test_eof_on_the_control_channel_exits_at_once(sidecars, loop):
    outer = sidecars([{"name": "out", "kind": "outbound", "service": "svc"}], {"svc": service([])}, loop=loop).start()
    outer.channel.close()
    assert outer.wait(10) == 0


def test_idle_and_slow_header_clients_are_closed(sidecars, upstream):
    outer, _ = pair(sidecars, upstream, "uvloop")
    outer.send(outer.config(http={"max_header_bytes": 65536, "max_body_bytes": None, "header_timeout": 0.3, "idle_timeout": 0.3}))
    with socket.create_connection(("127.0.0.1", outer.ports["out"]), timeout=10) as idle:
        assert idle.recv(100) == b""
    with socket.create_connection(("127.0.0.1", outer.ports["out"]), timeout=10) as slow:
        slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        [(status, headers, _)] = read_responses(slow, 1)
        assert (status, headers["x-mesh-error"]) == (408, "header-timeout")


def test_garbage_does_not_crash_the_process(sidecars, upstream):
    outer, _ = pair(sidecars, upstream, "uvloop")
    port = outer.ports["out"]
    for junk in (b"\x00" * 100, b"GET / HTTP/1.1\r\n" * 5000, b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", bytes(range(256))):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(junk)
            sock.shutdown(socket.SHUT_WR)
            while sock.recv(65536):
                pass
    assert request(port)[0] == 200
    assert outer.proc.poll() is None


def test_retries_move_a_refused_request_to_another_endpoint(sidecars, upstream):
    dead = refused_port()
    retries = {"attempts": 3, "retry_on": ["connect-failure"], "backoff": 0.001}
    outer = sidecars(
        [{"name": "out", "kind": "outbound", "service": "svc"}],
        {"svc": service([("v1", ["127.0.0.1", dead]), ("v1", upstream.address)], retries=retries)},
    ).start()
    for _ in range(6):
        assert request(outer.ports["out"])[0] == 200


@pytest.mark.slow
def test_large_upload_streams_in_bounded_memory(sidecars, upstream, loop):
    outer, inner = pair(sidecars, upstream, loop)
    total = 300 * 1024 * 1024
    processes = [psutil.Process(outer.pid()), psutil.Process(inner.pid())]
    peak = [0]
    done = threading.Event()

    def watch():
        while not done.is_set():
            peak[0] = max(peak[0], *(p.memory_info().rss for p in processes))
            done.wait(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with socket.create_connection(("127.0.0.1", outer.ports["out"]), timeout=60) as sock:
            sock.sendall(b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % total)
            chunk = b"z" * (1 << 20)
            for _ in range(total // len(chunk)):
                sock.sendall(chunk)
            [(status, _, body)] = read_responses(sock, 1)
    finally:
        done.set()
        watcher.join()
    assert (status, body) == (200, str(total).encode())
    assert peak[0] < 80 * 1024 * 1024, "sidecar RSS peaked at %d MB" % (peak[0] >> 20)


@pytest.mark.slow
def test_large_download_streams_in_bounded_memory(sidecars, upstream):
    outer, inner = pair(sidecars, upstream, "uvloop")
    total = 200 * 1024 * 1024
    with socket.create_connection(("127.0.0.1", outer.ports["out"]), timeout=60) as sock:
        sock.sendall(b"GET /big?n=%d HTTP/1.1\r\nHost: x\r\n\r\n" % total)
        received = 0
        peak = 0
        while received < total + 30:
            data = sock.recv(1 << 16)
            if not data:
                break
            received += len(data)
            if received % (16 << 20) < (1 << 16):
                peak = max(peak, psutil.Process(outer.pid()).memory_info().rss, psutil.Process(inner.pid()).memory_info().rss)
    assert received >= total
    assert peak < 80 * 1024 * 1024


def test_idle_pooled_upstream_connections_are_closed_after_the_idle_timeout(sidecars):
    """The pool follows recent concurrency: a connection idle for http.idle_timeout is closed."""
    server = socket.create_server(("127.0.0.1", 0))
    closed_by_sidecar = threading.Event()

    def serve_one() -> None:
        conn, _ = server.accept()
        with conn:
            conn.settimeout(10)
            head = b""
            while b"\r\n\r\n" not in head:
                head += conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            try:
                if conn.recv(65536) == b"":
                    closed_by_sidecar.set()
            except OSError:
                pass  # still open after 10 s: the test fails on the event

    thread = threading.Thread(target=serve_one, daemon=True)
    thread.start()
    try:
        outer = sidecars([{"name": "out", "kind": "outbound", "service": "svc"}], {"svc": service([("v1", list(server.getsockname()))])})
        outer.start(http={"max_header_bytes": 65536, "max_body_bytes": None, "header_timeout": 10.0, "idle_timeout": 0.5})
        assert request(outer.ports["out"], headers={"connection": "close"})[0] == 200
        assert closed_by_sidecar.wait(10), "the idle upstream connection was kept"
    finally:
        server.close()
        thread.join(10)
