"""Local isolation: a sidecar's listeners (but the ingress) admit only processes of the mesh's
uid (meshctl/proxy/peers.py). The pure parts as tables; then a real mesh, with clients run as
`nobody` through setpriv (needs root; skipped otherwise)."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import sys
import urllib.request

import pytest

from meshctl.proxy.peers import LOG_EVERY_S, SOCK_DIAG_BY_FAMILY, PeerGate, RefusalLog, diag_request, is_loopback, uid_from_reply
from tests.meshharness import environ_of, free_port, http_get, wait_for

NOBODY = 65534


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.1", False), ("::ffff:10.0.0.1", False), ("fe80::1%eth0", False), ("nonsense", False),
])
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_diag_request_asks_for_the_exact_socket():
    request = diag_request(socket.AF_INET, ("127.0.0.1", 40000), ("127.0.0.2", 8080), sequence=7)
    length, kind, flags, sequence, _ = struct.unpack_from("=IHHII", request)
    assert (length, kind, flags, sequence) == (len(request), SOCK_DIAG_BY_FAMILY, 1, 7)
    family, protocol = request[16], request[17]
    assert (family, protocol) == (socket.AF_INET, socket.IPPROTO_TCP)
    assert struct.unpack_from("!HH", request, 24) == (40000, 8080)
    assert request[28:32] == socket.inet_aton("127.0.0.1") and request[44:48] == socket.inet_aton("127.0.0.2")


def test_uid_from_reply():
    reply = struct.pack("=IHHII", 96, SOCK_DIAG_BY_FAMILY, 0, 9, 0) + bytes(64) + struct.pack("=II", 1234, 99) + bytes(8)
    assert uid_from_reply(reply) == (9, 1234)
    error = struct.pack("=IHHII", 36, 2, 0, 9, 0) + struct.pack("=i", -2) + bytes(16)
    assert uid_from_reply(error) == (9, None)
    assert uid_from_reply(b"") == (-1, None)


def test_refusals_are_logged_at_once_then_once_a_minute():
    book = RefusalLog()
    assert "uid 65534" in book.note("outbound", NOBODY, 100.0)
    assert [book.note("outbound", NOBODY, 100.0 + t) for t in (1, 30, LOG_EVERY_S - 1)] == [None, None, None]
    summary = book.note("outbound", None, 100.0 + LOG_EVERY_S)
    assert "refused 4 connections to the outbound listener" in summary and "unknown peer" in summary
    assert "admin" in book.note("admin", NOBODY, 100.0 + LOG_EVERY_S)  # each listener kind on its own


def test_the_gate_admits_its_own_uid_over_tcp_and_unix_sockets():
    counted = []
    gate = PeerGate(os.getuid(), lambda: 0.0, lambda listener, uid: counted.append((listener, uid)))
    try:
        with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()):
            conn, _ = server.accept()
            with conn:
                assert gate.peer_uid(conn) == os.getuid() and gate.admits(conn, "outbound")
            left, right = socket.socketpair()
            with left, right:
                assert gate.admits(left, "outbound")
        other = PeerGate(os.getuid() + 1, lambda: 0.0, lambda listener, uid: counted.append((listener, uid)))
        left, right = socket.socketpair()
        with left, right:
            assert not other.admits(left, "forward")
        assert counted == [("forward", os.getuid())]
    finally:
        gate.close()


# -- a real mesh, and a client of another uid ---------------------------------------------------

needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="running a client as another uid needs root and setpriv"
)

CLIENT = r"""
import socket, sys
port = int(sys.argv[1])
try:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /whoami HTTP/1.1\r\nhost: back\r\n\r\n")
        data = sock.recv(4096)
    print("answered" if data else "closed")
except ConnectionResetError:
    print("closed")
"""


def as_nobody(port: int) -> str:
    """What a process of uid nobody gets from 127.0.0.1:port: `answered` or `closed`."""
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    done = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", python, "-I", "-c", CLIENT, str(port)],
        capture_output=True, text=True, timeout=30, cwd="/",
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


ISOLATED = """
mesh: isolated
mtls: permissive
services:
  back:
    command: {PY} {APPS}/echo.py
    health: {{http: /healthz}}
  front:
    command: {PY} {APPS}/echo.py
    upstreams: [back]
    http_proxy: true
    health: {{http: /healthz}}
ingress:
  port: {port}
  routes: [{{path: /, service: front}}]
"""


@needs_root
def test_every_sidecar_listener_but_the_ingress_refuses_another_uid(mesh):
    port = free_port()
    mesh.write_manifest(ISOLATED.format(port=port, PY="{PY}", APPS="{APPS}"))
    mesh.up()
    front, back = mesh.instance("front@v1#0"), mesh.instance("back@v1#0")
    proxy_port = int(environ_of(front["pid"])["HTTP_PROXY"].rsplit(":", 1)[1])  # the forward listener
    listeners = {
        "outbound": front["outbound_ports"]["back"],
        "forward": proxy_port,
        "inbound": back["inbound_port"],  # permissive: plaintext would be served, but not to nobody
        "admin": back["admin_port"],
    }
    for kind, listener_port in listeners.items():
        assert as_nobody(listener_port) == "closed", kind
    assert as_nobody(port) == "answered"  # the ingress is the mesh's front door, for every user

    # The mesh's own uid is served on the same listeners.
    assert http_get(f"http://127.0.0.1:{listeners['outbound']}/whoami")[0] == 200
    assert http_get(f"http://127.0.0.1:{listeners['inbound']}/whoami")[0] in (200, 403)  # answered, by HTTP
    assert http_get(f"http://127.0.0.1:{proxy_port}/whoami", headers={"host": "back"})[0] == 200
    assert http_get(f"http://127.0.0.1:{listeners['admin']}/ready")[0] == 200
    assert http_get(f"http://127.0.0.1:{port}/call/back/whoami")[0] == 200

    url = mesh.cli("metrics", check=True).stdout.strip()

    def refused_by_kind():
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        found = {line.split('listener="')[1].split('"')[0] for line in text.splitlines()
                 if line.startswith("mesh_refused_connections_total{") and 'peer_uid="65534"' in line}
        return found if found == set(listeners) else None

    wait_for(refused_by_kind, what="a refusal counted for every gated listener kind")
    sidecar_logs = "".join(p.read_text() for p in (mesh.home / "logs").glob("*.sidecar.log"))
    assert "refused a connection to the outbound listener from uid 65534" in sidecar_logs


UNIX = """
mesh: unixapps
services:
  back:
    command: {PY} {APPS}/echo.py
    health: {{http: /healthz}}
    listen: unix
  front:
    command: {PY} {APPS}/echo.py
    upstreams: [back]
    health: {{http: /healthz}}
ingress:
  port: {port}
  routes: [{{path: /, service: front}}]
"""


def test_listen_unix_gives_the_app_a_private_socket_instead_of_a_port(mesh):
    port = free_port()
    mesh.write_manifest(UNIX.format(port=port, PY="{PY}", APPS="{APPS}"))
    mesh.up()
    back = mesh.instance("back@v1#0")
    assert back["port"] is None and back["socket"] == str(mesh.home / "sockets" / "back@v1#0.sock")
    environ = environ_of(back["pid"])
    assert environ["MESH_SOCKET"] == back["socket"] and "PORT" not in environ
    assert os.stat(mesh.home / "sockets").st_mode & 0o777 == 0o700
    status, _, body = http_get(f"http://127.0.0.1:{port}/call/back/whoami")
    assert status == 200 and b'"back"' in body
    # A restart binds the same path again (the old socket file is cleared first).
    assert mesh.cli("restart", "back").returncode == 0
    assert http_get(f"http://127.0.0.1:{port}/call/back/whoami")[0] == 200


@needs_root
def test_another_uid_cannot_reach_an_app_on_a_unix_socket(mesh):
    mesh.write_manifest(UNIX.format(port=free_port(), PY="{PY}", APPS="{APPS}"))
    mesh.up()
    path = mesh.instance("back@v1#0")["socket"]
    script = "import socket,sys\ntry:\n socket.socket(socket.AF_UNIX).connect(sys.argv[1]); print('connected')\nexcept PermissionError: print('denied')"
    done = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "/usr/bin/python3", "-I", "-c", script, path],
        capture_output=True, text=True, timeout=30, cwd="/",
    )
    assert done.stdout.strip() == "denied", done.stdout + done.stderr
