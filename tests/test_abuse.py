"""Abusive clients against real sidecar processes: a thousand idle connections, request
smuggling per RFC 9112 through a sidecar pair, and a client that never reads a large
response. The sidecar must keep serving, refuse with 400 and a closed connection, and
keep its memory bounded. Then identities on a real strict mesh: a certificate from a
foreign CA is refused where the mesh's own is admitted, and no app holds a way to any
identity (what test_mesh_security.py and test_mtls.py do not cover already)."""

from __future__ import annotations

import json
import resource
import socket
import threading

import psutil
import pytest

from meshctl.agent.ca import CertificateAuthority, spiffe_id
from tests.meshharness import free_port, http_get
from tests.proxy_harness import Sidecar, read_responses, service, wait_for
from tests.reliability import fd_count, record, rss
from tests.tlspeers import client_context, plain_get, tls_get

IDLE_CONNECTIONS = 1000
HTTP = {"max_header_bytes": 65536, "max_body_bytes": None, "header_timeout": 60.0, "idle_timeout": 60.0}


@pytest.fixture
def more_fds():
    """Room for a thousand sockets here and in the sidecars started meanwhile (they inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 8192) if hard != resource.RLIM_INFINITY else 8192
    if wanted < IDLE_CONNECTIONS + 200:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for {IDLE_CONNECTIONS} connections")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def pair(sidecars, app_address: list) -> tuple[Sidecar, Sidecar]:
    """client -> outbound sidecar -> inbound sidecar -> app."""
    inner = sidecars([{"name": "inbound", "kind": "inbound", "app": app_address}]).start(http=HTTP)
    outer = sidecars(
        [{"name": "out", "kind": "outbound", "service": "svc"}], {"svc": service([("v1", inner.endpoint())])}
    ).start(http=HTTP)
    return outer, inner


def get(port: int, path: str = "/ok") -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET %s HTTP/1.1\r\nHost: svc\r\nConnection: close\r\n\r\n" % path.encode())
        [(status, _, _)] = read_responses(sock, 1)
        return status


def test_a_thousand_idle_connections_do_not_stop_real_traffic(sidecars, upstream, more_fds):
    outer, _ = pair(sidecars, upstream.address)
    port = outer.ports["out"]
    assert get(port) == 200
    baseline = fd_count(outer.pid())
    idle: list[socket.socket] = []
    try:
        for _ in range(IDLE_CONNECTIONS):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=10))
        # The baseline may still count the first request's connection: a little slack.
        wait_for(lambda: fd_count(outer.pid()) >= baseline + IDLE_CONNECTIONS - 5, timeout=30,
                 what="the sidecar to accept every idle connection")
        statuses = [get(port, "/real%d" % i) for i in range(50)]
        assert statuses == [200] * 50
        # A few of the idle ones wake up and are served too.
        for sock in idle[:: IDLE_CONNECTIONS // 10]:
            sock.sendall(b"GET /late HTTP/1.1\r\nHost: svc\r\n\r\n")
            assert read_responses(sock, 1)[0][0] == 200
        peak = fd_count(outer.pid())
    finally:
        for sock in idle:
            sock.close()
    wait_for(lambda: fd_count(outer.pid()) <= baseline + 2, timeout=30, what="the sidecar to close them all")
    assert outer.proc.poll() is None
    record("abuse_idle_connections", {
        "title": "a thousand idle connections to one sidecar",
        "figures": {"idle connections": IDLE_CONNECTIONS, "real requests served meanwhile": 50,
                    "sidecar fds at the peak": peak, "sidecar fds after they closed": fd_count(outer.pid())},
    })


SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: svc\r\n\r\n"

# What test_sidecar.py does not already send through a real sidecar (CL+TE, obs-fold).
SMUGGLING = [
    ("te-then-cl", b"POST /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n"),
    ("duplicate-cl-same", b"POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello"),
    ("duplicate-cl-differ", b"POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 0\r\nContent-Length: 38\r\n\r\n"),
    ("cl-list", b"POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: 5, 5\r\n\r\nhello"),
    ("cl-sign", b"POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length: +5\r\n\r\nhello"),
    ("obs-fold-te", b"POST /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding:\r\n chunked\r\nContent-Length: 5\r\n\r\nhello"),
    ("te-gzip-only", b"POST /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: gzip\r\n\r\n"),
    ("te-chunked-twice", b"POST /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n"),
    ("te-mangled", b"POST /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n"),
    ("te-in-http10", b"POST /a HTTP/1.0\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
    ("space-before-colon", b"POST /a HTTP/1.1\r\nHost: svc\r\nContent-Length : 5\r\n\r\nhello"),
    ("chunk-size-not-hex", b"POST /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-negative", b"POST /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-overflow", b"POST /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n10000000000000005\r\nhello\r\n0\r\n\r\n"),
    ("chunk-size-bare-lf", b"POST /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n"),
    ("chunk-data-too-long", b"POST /a HTTP/1.1\r\nHost: svc\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhello\r\n0\r\n\r\n"),
]


@pytest.mark.parametrize("name, raw", SMUGGLING, ids=[name for name, _ in SMUGGLING])
def test_smuggling_attempts_get_400_and_a_closed_connection(sidecars, upstream, name, raw):
    outer, _ = pair(sidecars, upstream.address)
    with socket.create_connection(("127.0.0.1", outer.ports["out"]), timeout=10) as sock:
        sock.sendall(raw + SMUGGLED)
        [(status, headers, _)] = read_responses(sock, 1)
        assert (status, headers.get("x-mesh-error"), headers.get("connection")) == (400, "bad-request", "close")
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
        assert rest == b"", "nothing may follow the 400: %r" % rest[:200]
    assert all(path != "/smuggled" for _, path, _, _ in upstream.requests), upstream.requests
    assert get(outer.ports["out"]) == 200


class FloodingApp:
    """An app that answers one request with `total` bytes and counts what the kernel took."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.sent = 0
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = ["127.0.0.1", self.sock.getsockname()[1]]
        self._conns: list[socket.socket] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        try:
            conn, _ = self.sock.accept()
        except OSError:
            return
        self._conns.append(conn)
        try:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % self.total)
            chunk = b"x" * 65536
            while self.sent < self.total:
                self.sent += conn.send(chunk)
        except OSError:
            return

    def stop(self) -> None:
        self.sock.close()
        for conn in self._conns:
            conn.close()


def test_a_client_that_never_reads_does_not_make_the_sidecar_buffer(sidecars):
    app = FloodingApp(total=2 << 30)
    try:
        outer, inner = pair(sidecars, app.address)
        procs = [psutil.Process(outer.pid()), psutil.Process(inner.pid())]
        before = [p.memory_info().rss for p in procs]
        with socket.socket() as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
            client.connect(("127.0.0.1", outer.ports["out"]))
            client.sendall(b"GET /flood HTTP/1.1\r\nHost: svc\r\n\r\n")
            wait_for(lambda: app.sent > 0, timeout=10, what="the app to start sending")
            # Backpressure has reached the app once what it managed to send stops growing.
            samples: list[int] = []

            def stalled() -> bool:
                samples.append(app.sent)
                return len(samples) > 10 and samples[-1] == samples[-11]

            wait_for(stalled, timeout=30, what="the app to be held back")
            growth = [rss(p.pid) - b for p, b in zip(procs, before)]
            stalled_at = app.sent
        wait_for(lambda: inner.proc.poll() is None and outer.proc.poll() is None, what="both alive")
    finally:
        app.stop()
    record("abuse_slow_reader", {
        "title": "a client that never reads a 2 GiB response",
        "figures": {"bytes the app could send before backpressure held it": stalled_at,
                    "outbound sidecar RSS growth (bytes)": growth[0], "inbound sidecar RSS growth (bytes)": growth[1]},
    })
    assert stalled_at < 64 << 20, "the sidecars took %d MB of a response nobody reads" % (stalled_at >> 20)
    assert max(growth) < 32 << 20, growth


# -- identities on a real mesh ---------------------------------------------------------

STRICT = """
mesh: abuse
services:
  back:
    command: {PY} {APPS}/echo.py
    health: {{http: /healthz}}
  front:
    command: {PY} {APPS}/echo.py
    upstreams: [back]
    health: {{http: /healthz}}
ingress:
  port: {port}
  routes: [{{path: /, service: front}}]
"""


def test_a_foreign_ca_cannot_impersonate_a_service_and_apps_hold_no_identity(mesh, tmp_path):
    port = free_port()
    mesh.write_manifest(STRICT.format(port=port, PY="{PY}", APPS="{APPS}"))
    mesh.up()
    back = mesh.instance("back@v1#0")
    front = mesh.instance("front@v1#0")
    caller = spiffe_id("abuse.local", "front")
    mesh_ca = CertificateAuthority(mesh.home / "ca", "abuse")  # the positive control reads the real CA
    genuine = mesh_ca.issue(caller, 600)
    assert tls_get(back["inbound_port"], client_context(mesh_ca.bundle_pem, genuine.chain_pem, genuine.key_pem), "/whoami") == 200
    foreign = CertificateAuthority(tmp_path / "foreign", "abuse").issue(caller, 600)
    assert tls_get(back["inbound_port"], client_context(mesh_ca.bundle_pem, foreign.chain_pem, foreign.key_pem), "/whoami") is None
    assert tls_get(back["inbound_port"], client_context(mesh_ca.bundle_pem), "/whoami") is None
    assert plain_get(back["inbound_port"], "/whoami") is None

    # Each sidecar was issued its own service's identity and nothing else.
    certs = json.loads(mesh.cli("certs", "-o", "json", check=True).stdout)
    text = json.dumps(certs)
    assert "PRIVATE KEY" not in text
    for inst in (back, front):
        assert spiffe_id("abuse.local", inst["service"]) in text
    # An app gets no way to another identity: no unix socket (no config channel, no agent
    # socket) among its descriptors, nothing open under the state directory, no key in env.
    for inst in (back, front):
        app = psutil.Process(inst["pid"])
        assert app.net_connections(kind="unix") == [], app.net_connections(kind="unix")
        assert not [f.path for f in app.open_files() if f.path.startswith(str(mesh.home))]
        with open(f"/proc/{inst['pid']}/environ", "rb") as fh:
            assert b"PRIVATE KEY" not in fh.read()
    # The admin endpoints and the merged metrics show no key either.
    for inst in mesh.status()["instances"]:
        if inst.get("admin_port"):
            for path in ("/stats", "/metrics"):
                assert b"PRIVATE KEY" not in http_get(f"http://127.0.0.1:{inst['admin_port']}{path}")[2]
    assert "PRIVATE KEY" not in mesh.cli("metrics", "--raw", check=True).stdout
