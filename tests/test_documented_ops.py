"""Documented operations of a whole mesh, through the CLI: `http_proxy: true` used by a real
client library, TCP balancing over replicas, `grpc-status` deciding success in metrics,
`stat`'s rps against a known rate, `top`'s keys, `logs` merge order and `--tail`, `down`'s
reverse order and grace-then-SIGKILL, and `make demo`'s manifest answering end to end."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import socket
import struct
import sys
import termios
import threading
import time

import grpc
import pytest

from tests.meshharness import REPO, alive, environ_of, free_port, http_get, wait_for

OPS = """
mesh: ops
services:
  back:
    command: {PY} {APPS}/echo.py
    health: {{http: /healthz}}
  who:
    command: {PY} {APPS}/tcpwho.py
    protocol: tcp
    replicas: 3
  recommend:
    command: {PY} {REPO}/demo-services/recommend.py
    protocol: grpc
  front:
    command: {PY} {APPS}/echo.py
    upstreams: [back, who, recommend]
    http_proxy: true
    health: {{http: /healthz}}
ingress:
  port: {port}
  routes: [{{path: /, service: front}}]
"""


@pytest.fixture
def ops(mesh):
    port = free_port()
    mesh.write_manifest(OPS.format(port=port, PY="{PY}", APPS="{APPS}", REPO=REPO))
    mesh.up()
    mesh.port = port
    return mesh


def stat_row(mesh, service: str, window: str = "2m") -> dict | None:
    rows = json.loads(mesh.cli("stat", "-o", "json", "--window", window, check=True).stdout)
    return next((r for r in rows if r["service"] == service), None)


def test_http_proxy_is_used_by_urllib_to_reach_services_by_name(ops):
    environ = environ_of(ops.instance("front@v1#0")["pid"])
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+", environ["HTTP_PROXY"])
    status, _, body = http_get(f"http://127.0.0.1:{ops.port}/proxied/back/whoami")
    assert status == 200 and json.loads(body)["service"] == "back"
    status, _, body = http_get(f"http://127.0.0.1:{ops.port}/proxied/back.mesh/whoami")
    assert status == 200 and json.loads(body)["service"] == "back"
    status, _, body = http_get(f"http://127.0.0.1:{ops.port}/proxied/elsewhere.invalid/x")
    assert status == 403 and b"egress-denied" in body  # not a mesh service, not in egress
    # The same proxy-honouring client still reaches BACK_URL (the sidecar's loopback port) directly.
    assert environ["NO_PROXY"] == "127.0.0.1,localhost,::1"
    status, _, body = http_get(f"http://127.0.0.1:{ops.port}/call/back/whoami")
    assert status == 200 and json.loads(body)["service"] == "back"


def test_tcp_connections_are_balanced_over_every_replica(ops):
    port = ops.instance("front@v1#0")["outbound_ports"]["who"]
    seen = []
    for _ in range(30):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            data = b""
            while not data.endswith(b"\n"):
                chunk = sock.recv(100)
                assert chunk, "closed before the replica said who it is"
                data += chunk
        seen.append(data.decode().strip())
    assert set(seen) == {"who@v1#0", "who@v1#1", "who@v1#2"}, seen


def test_grpc_status_decides_success_in_metrics(ops):
    port = ops.instance("front@v1#0")["outbound_ports"]["recommend"]
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)])
    try:
        for_item = channel.unary_unary("/recommend.Recommend/ForItem", request_serializer=None, response_deserializer=None)
        fail = channel.unary_unary("/recommend.Recommend/Fail", request_serializer=None, response_deserializer=None)
        for index in range(8):
            assert for_item(b"sku%d" % index, timeout=10) == b"sku%d-a,sku%d-b,sku%d-c" % (index, index, index)
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as info:
                fail(b"", timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE  # HTTP 200, grpc-status 14
    finally:
        channel.close()
    row = wait_for(lambda: (r := stat_row(ops, "recommend")) and r["requests"] >= 10 and r, what="10 gRPC calls in stat")
    assert row["requests"] == 10 and row["success_rate"] == 0.8, row


class Pacer:
    """GETs a URL at a fixed rate on an absolute schedule (a late request does not lower the rate)."""

    def __init__(self, url: str, rps: float) -> None:
        self.url, self.period = url, 1.0 / rps
        self.sent = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        start = time.monotonic()
        while not self.stopping.is_set():
            http_get(self.url)
            self.sent += 1
            self.stopping.wait(max(0.0, start + self.sent * self.period - time.monotonic()))  # the load's pacing

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(30)


def test_stat_rps_matches_a_known_request_rate(ops):
    pacer = Pacer(f"http://127.0.0.1:{ops.port}/whoami", rps=20)
    try:
        started = time.monotonic()
        wait_for(lambda: time.monotonic() - started > 8 and pacer.sent > 120, timeout=30, what="8 s of paced load")
        row = stat_row(ops, "front", window="5s")
    finally:
        pacer.stop()
    assert row is not None and 14 <= row["rps"] <= 26, row  # 20 rps sent; a generous bound


def test_top_keys_change_the_sort_and_q_quits(ops):
    # front busy, back idle, so rps and name orders differ; steady, so top's 10 s window never empties
    trickle = Pacer(f"http://127.0.0.1:{ops.port}/whoami", rps=5)
    try:
        top_keys(ops)
    finally:
        trickle.stop()


def top_keys(ops) -> None:
    wait_for(lambda: (row := stat_row(ops, "front", window="10s")) and row["requests"] > 0, what="traffic in top's window")
    pid, fd = pty.fork()
    if pid == 0:  # the child: becomes `meshctl top` on the pty, or exits
        try:
            os.chdir(REPO)
            os.execve(sys.executable, [sys.executable, "-m", "meshctl.cli", "top"], ops.env)
        finally:
            os._exit(127)
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    screen = [b""]

    def read_until(pattern: bytes, timeout: float = 20.0) -> bytes:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    screen[0] += os.read(fd, 65536)
                except OSError:
                    break
                at = screen[0].rfind(pattern)
                if at >= 0:
                    frame, screen[0] = screen[0][at:], b""
                    return frame
        raise AssertionError("no %r in top's output; last: %r" % (pattern, screen[0][-500:]))

    def plain(frame: bytes) -> str:
        return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", " ", frame.decode("utf-8", "replace"))

    try:
        read_until(b"sort rps")
        for key, name in ((b"n", b"sort name"), (b"p", b"sort p99"), (b"s", b"sort success"), (b"r", b"sort rps")):
            os.write(fd, key)
            read_until(name)
        os.write(fd, b"n")
        frame = plain(read_until(b"sort name") + read_until(b"front@v1"))
        os.write(fd, b"q")
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    assert frame.find("back@v1") < frame.find("front@v1"), frame  # by name, back comes first


# -- logs and down -----------------------------------------------------------------------------

TWO = """
mesh: logs
services:
  a:
    command: {PY} {APPS}/echo.py
  b:
    command: {PY} {APPS}/echo.py
ingress:
  port: {port}
  routes: [{{path: /a, service: a}}, {{path: /b, service: b}}]
"""


def test_logs_merge_in_time_order_and_tail_keeps_the_last_lines(mesh):
    port = free_port()
    mesh.write_manifest(TWO.format(port=port, PY="{PY}", APPS="{APPS}"))
    mesh.up()
    expected = []
    for index in range(3):
        for service in ("a", "b"):
            marker = f"/{service}/m{index}"
            http_get(f"http://127.0.0.1:{port}{marker}")
            # Each line is in the agent's log before the next request is sent: a known order.
            wait_for(lambda: marker in mesh.cli("logs", service, "--tail", "1", check=True).stdout, what=marker)
            expected.append((f"{service}@v1#0", marker))

    def parsed(text: str) -> list[tuple[str, str]]:
        rows = []
        for line in text.splitlines():
            prefix, _, rest = line.partition("|")
            rows.append((prefix.strip(), rest.split()[1] if len(rest.split()) > 1 else rest.strip()))
        return rows

    assert parsed(mesh.cli("logs", "--tail", "6", check=True).stdout) == expected
    assert parsed(mesh.cli("logs", "--tail", "2", check=True).stdout) == expected[-2:]
    assert parsed(mesh.cli("logs", "b", "--tail", "3", check=True).stdout) == [e for e in expected if e[0].startswith("b")]


DOWN = """
mesh: down
services:
  back:
    command: {PY} {APPS}/echo.py
    health: {{http: /healthz}}
    stop_grace: 1s
    env: {{TERM_LOG: {log}, IGNORE_TERM: "1"}}
  front:
    command: {PY} {APPS}/echo.py
    upstreams: [back]
    health: {{http: /healthz}}
    env: {{TERM_LOG: {log}}}
ingress:
  port: {port}
  routes: [{{path: /, service: front}}]
"""


def test_down_stops_dependants_first_and_kills_after_the_grace(mesh, tmp_path):
    log = tmp_path / "term.log"
    mesh.write_manifest(DOWN.format(port=free_port(), log=log, PY="{PY}", APPS="{APPS}"))
    mesh.up()
    back_pid = mesh.instance("back@v1#0")["pid"]
    started = time.monotonic()
    mesh.cli("down", check=True)
    assert time.monotonic() - started >= 1.0  # back ignored SIGTERM: only its 1 s grace ended it
    assert log.read_text().split() == ["front@v1#0", "back@v1#0"]  # dependants before upstreams
    assert not alive(back_pid)
    assert mesh.living() == []


# -- make demo's manifest -----------------------------------------------------------------------


def test_the_demo_manifest_serves_the_page_and_the_grpc_box(mesh):
    port = free_port()
    text = (REPO / "templates" / "shopfast.yaml").read_text()
    text = text.replace("workdir: ..", f"workdir: {REPO}").replace("port: 8080", f"port: {port}")
    mesh.write_manifest(text)
    mesh.up()
    assert {i["state"] for i in mesh.status()["instances"]} == {"ready"}

    def page_with_recommendations():
        status, _, body = http_get(f"http://127.0.0.1:{port}/", headers={"cookie": "user=alice"})
        return body if status == 200 and b"Recommended for you" in body else None

    body = wait_for(page_with_recommendations, timeout=30, what="the page with its gRPC box").decode()
    assert "ShopFast" in body and "(gRPC)" in body and "recommend@v1#0" in body
    status, _, products = http_get(f"http://127.0.0.1:{port}/api/products")
    assert status == 200 and len(json.loads(products)["products"]) >= 10
