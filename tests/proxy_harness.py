"""Helpers to run real sidecar processes and scripted upstreams in tests.

`Sidecar` starts `python -m meshctl.proxy --control-fd N` the way the agent does: a socketpair
for the config channel and listening sockets bound on 127.0.0.1 port 0, passed with
pass_fds. `Upstream` is a small threaded HTTP/1.1 server whose behaviour is chosen by
the request path (normal echo, slow, close mid-response, ...). `raw_exchange()` talks
raw bytes to a port and reads until the expected responses are complete.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
LOOPS = ("uvloop", "asyncio")


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for %s" % what)
        time.sleep(0.01)


def refused_port() -> int:
    """A port nobody listens on (bound, then closed)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Sidecar:
    """One sidecar process. `listeners` are snapshot entries without `fd`; ports are assigned."""

    def __init__(self, listeners: list[dict], services: dict | None = None, loop: str = "uvloop", **extra: Any) -> None:
        self.loop = loop
        self.ports: dict[str, int] = {}
        self._sockets: list[socket.socket] = []
        self.listeners = []
        for entry in listeners:
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
            self._sockets.append(sock)
            self.ports[entry["name"]] = sock.getsockname()[1]
            self.listeners.append(dict(entry, fd=sock.fileno()))
        self.services = services or {}
        self.extra = extra
        self.version = 0
        self.channel, child_end = socket.socketpair()
        # Plain asyncio always runs on its own transports (the fallback); uvloop on the
        # transports MESHCTL_PROXY_TRANSPORT names (meshctl/proxy/transport.py).
        transport = "loop" if loop == "asyncio" else os.environ.get("MESHCTL_PROXY_TRANSPORT", "loop")
        env = dict(os.environ, MESHCTL_PROXY_LOOP=loop, MESHCTL_PROXY_TRANSPORT=transport, PYTHONPATH=str(ROOT))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "meshctl.proxy", "--control-fd", str(child_end.fileno())],
            pass_fds=[child_end.fileno()] + [s.fileno() for s in self._sockets],
            env=env,
            cwd=str(ROOT),
            stderr=subprocess.PIPE,
        )
        child_end.close()
        self._replies = b""
        self.stderr_lines: list[str] = []
        self._stderr_reader = threading.Thread(target=self._read_stderr, daemon=True)
        self._stderr_reader.start()

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:  # type: ignore[union-attr]
            self.stderr_lines.append(line.decode("utf-8", "replace"))

    def config(self, services: dict | None = None, **overrides: Any) -> dict:
        config = {
            "instance": "test@v1#0",
            "service": "test",
            "version": "v1",
            "drain_timeout": 5.0,
            "listeners": self.listeners,
            "services": self.services if services is None else services,
            "egress": [],
            "http": {"max_header_bytes": 65536, "max_body_bytes": None, "header_timeout": 10.0, "idle_timeout": 60.0},
        }
        config.update(self.extra)
        config.update(overrides)
        return config

    def send(self, config: dict, timeout: float = 10.0) -> dict:
        """Send a snapshot and return the agent-side reply (ack or nack)."""
        self.version += 1
        line = json.dumps({"type": "config", "version": self.version, "config": config}) + "\n"
        self.channel.sendall(line.encode())
        return self.read_reply(timeout)

    def read_reply(self, timeout: float = 10.0) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self._replies:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.proc.poll() is not None:
                raise AssertionError("no reply from the sidecar; stderr:\n%s" % "".join(self.stderr_lines))
            self.channel.settimeout(remaining)
            try:
                chunk = self.channel.recv(65536)
            except socket.timeout:
                continue
            if not chunk:
                raise AssertionError("config channel closed; stderr:\n%s" % "".join(self.stderr_lines))
            self._replies += chunk
        line, self._replies = self._replies.split(b"\n", 1)
        return json.loads(line)

    def start(self, **overrides: Any) -> Sidecar:
        reply = self.send(self.config(**overrides))
        assert reply["type"] == "ack", reply
        return self

    def url(self, listener: str) -> str:
        return "http://127.0.0.1:%d" % self.ports[listener]

    def endpoint(self, listener: str = "inbound") -> list:
        return ["127.0.0.1", self.ports[listener]]

    def pid(self) -> int:
        return self.proc.pid

    def terminate(self) -> None:
        self.proc.terminate()

    def wait(self, timeout: float = 10.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._stderr_reader.join(10)
        self.proc.stderr.close()  # type: ignore[union-attr]
        self.channel.close()
        for sock in self._sockets:
            sock.close()


def service(endpoints: list[tuple[str, list]], **policy: Any) -> dict:
    """A services.<name> block; endpoints as [(version, address)]."""
    versions = list(dict.fromkeys(version for version, _ in endpoints)) or ["v1"]
    block = {
        "endpoints": [
            {"id": "svc@%s#%d" % (version, index), "version": version, "address": list(address)}
            for index, (version, address) in enumerate(endpoints)
        ],
        "versions": versions,
        "split": {versions[0]: 100},
        "routes": [],
        "timeout": None,  # the mesh's defaults (agent.compile.default_traffic)
        "stream_idle_timeout": 300.0,
        "connect_timeout": 1.0,
        "retries": None,
        "load_balancer": {"kind": "round_robin"},
        "outlier_detection": None,
        "limits": {"max_connections": 1024, "max_pending": 1024},
    }
    block.update(policy)
    return block


class Upstream:
    """A threaded HTTP/1.1 server on 127.0.0.1:0 for tests. Behaviour by path:

    * `/slow`: waits until `release` is set (or 30 s), then answers;
    * `/close-mid`: sends a head promising 100 bytes, 10 bytes, then closes;
    * `/close-before`: reads the request and closes without answering;
    * `/big?n=N`: answers N bytes;
    * `/sink`: reads and discards the body, answers its length;
    * anything else: echoes a JSON summary of the request.

    `connections` counts accepted connections; `requests` keeps (method, path, headers, body).
    Set `fail_status` to answer every request with that status (and an empty body), or
    `hang` to hold every request until `release` is set.
    """

    def __init__(self, name: str = "up") -> None:
        self.name = name
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.address = ["127.0.0.1", self.port]
        self.connections = 0
        self.requests: list[tuple[str, str, dict, bytes]] = []
        self.release = threading.Event()
        self.slow_started = threading.Event()
        self.fail_status: int | None = None
        self.hang = False
        self._stopped = False
        self._threads: list[threading.Thread] = []
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stopped:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            self._conns.append(conn)
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()

    def stop(self) -> None:
        self._stopped = True
        self.release.set()
        self.sock.close()
        for conn in self._conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()

    def _serve(self, conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        try:
            while True:
                request_line = reader.readline()
                if not request_line:
                    return
                method, target, _ = request_line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                raw_headers: list[tuple[str, str]] = []
                while True:
                    line = reader.readline().decode("latin-1")
                    if line in ("\r\n", "\n", ""):
                        break
                    name, _, value = line.partition(":")
                    raw_headers.append((name.strip().lower(), value.strip()))
                    headers.setdefault(name.strip().lower(), value.strip())
                path = target
                sink = path.startswith("/sink")
                body = self._read_body(reader, headers, discard=sink)
                if path.startswith("/close-before"):
                    return
                self.requests.append((method, path, headers, body if not sink else b""))
                if not self._respond(conn, method, path, headers, raw_headers, body):
                    return
                if headers.get("connection", "").lower() == "close":
                    return
        except (OSError, ValueError):
            return
        finally:
            reader.close()
            conn.close()

    @staticmethod
    def _read_body(reader, headers: dict, discard: bool) -> bytes:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            total = 0
            while True:
                size = int(reader.readline().split(b";")[0], 16)
                if size == 0:
                    while reader.readline() not in (b"\r\n", b""):
                        pass
                    break
                data = reader.read(size)
                total += len(data)
                if not discard:
                    parts.append(data)
                reader.readline()
            return b"".join(parts) if not discard else str(total).encode()
        length = int(headers.get("content-length", "0"))
        if not discard:
            return reader.read(length)
        remaining = length
        while remaining:
            chunk = reader.read(min(remaining, 1 << 20))
            if not chunk:
                break
            remaining -= len(chunk)
        return str(length).encode()

    def _respond(self, conn: socket.socket, method: str, path: str, headers: dict, raw_headers: list, body: bytes) -> bool:
        if self.hang:
            self.release.wait(30)
        if self.fail_status is not None:
            conn.sendall(b"HTTP/1.1 %d X\r\ncontent-length: 0\r\n\r\n" % self.fail_status)
            return True
        if path.startswith("/slow"):
            self.slow_started.set()
            self.release.wait(30)
        if path.startswith("/close-mid"):
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n0123456789")
            return False
        if path.startswith("/big"):
            size = int(path.split("n=")[1])
            conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % size)
            chunk = b"x" * 65536
            sent = 0
            while sent < size:
                piece = chunk[: min(65536, size - sent)]
                conn.sendall(piece)
                sent += len(piece)
            return True
        if path.startswith("/status/"):
            status = int(path.split("/")[2])
            conn.sendall(b"HTTP/1.1 %d X\r\ncontent-length: 0\r\n\r\n" % status)
            return True
        if path.startswith("/chunked-response"):
            conn.sendall(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
            return True
        if path.startswith("/sink"):
            payload = body
        else:
            payload = json.dumps(
                {"upstream": self.name, "method": method, "path": path, "headers": raw_headers, "body": body.decode("latin-1")}
            ).encode()
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(payload)
        conn.sendall(head if method == "HEAD" else head + payload)
        return True


def raw_exchange(port: int, data: bytes, responses: int = 1, timeout: float = 10.0) -> list[tuple[int, dict, bytes]]:
    """Send raw bytes, read `responses` complete responses (content-length framed or until close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_responses(sock, responses)


def read_responses(sock: socket.socket, count: int) -> list[tuple[int, dict, bytes]]:
    buffer = b""
    results = []
    closed = False
    while len(results) < count:
        end = buffer.find(b"\r\n\r\n")
        if end >= 0:
            head = buffer[:end].decode("latin-1").split("\r\n")
            status = int(head[0].split(" ")[1])
            headers: dict[str, str] = {}
            for line in head[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            rest = buffer[end + 4 :]
            if "content-length" in headers:
                length = int(headers["content-length"])
                if len(rest) >= length:
                    results.append((status, headers, rest[:length]))
                    buffer = rest[length:]
                    continue
            elif "transfer-encoding" in headers:
                if rest.endswith(b"0\r\n\r\n"):
                    results.append((status, headers, rest))
                    buffer = b""
                    continue
            elif closed:
                results.append((status, headers, rest))
                buffer = b""
                continue
        if closed:
            raise AssertionError("connection closed after %d responses; pending %r" % (len(results), buffer[:200]))
        chunk = sock.recv(65536)
        if not chunk:
            closed = True
        buffer += chunk
    return results
