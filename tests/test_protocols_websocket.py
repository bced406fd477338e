"""WebSocket through two real sidecar processes with mTLS between them (proxy.upgrade).

The app is an asyncio WebSocket echo (tests/test_upgrade.py) on a thread; the client is
a blocking socket on the caller's outbound listener. Covers: frames both ways (one
pipelined with the handshake, one sent by the app with its 101), a 200 KB binary frame,
the close handshake; an upgrade request is never retried; a declined upgrade stays HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import threading

import pytest

from meshctl.proxy.upgrade import websocket_accept
from tests.test_protocols_mesh import DEADLINE_S, mesh_pair, recv_exactly
from tests.test_upgrade import OP_CLOSE, OP_TEXT, encode_frame, websocket_echo

OP_BINARY = 0x2


class App:
    """An asyncio server on its own thread; `mode`: echo (WebSocket), reset (close at once), decline (200)."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.requests = 0
        self.loop = asyncio.new_event_loop()
        self.server = self.loop.run_until_complete(asyncio.start_server(self.serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.mode == "echo":
            self.requests += 1
            await websocket_echo(reader, writer)
            return
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                self.requests += 1
                if self.mode == "reset":
                    break
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nplain answer")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        writer.close()

    def stop(self) -> None:
        async def close() -> None:
            self.server.close()
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(close(), self.loop).result(DEADLINE_S)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(DEADLINE_S)
        self.loop.close()


def handshake(key: bytes) -> bytes:
    return (b"GET /chat HTTP/1.1\r\nHost: svc\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n")


def read_head(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        assert chunk, "closed before the response head: %r" % data
        data += chunk
    return data


def read_frame(sock: socket.socket) -> tuple[int, bytes]:
    first, second = recv_exactly(sock, 2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", recv_exactly(sock, 2))
    elif length == 127:
        (length,) = struct.unpack("!Q", recv_exactly(sock, 8))
    return first & 0x0F, recv_exactly(sock, length)


def start(cleanup, ca, mode: str, **policy):  # noqa: F811
    app = App(mode)
    cleanup(app)
    outer, _ = mesh_pair(cleanup, ca, ["127.0.0.1", app.port], "http", **policy)
    return app, outer.ports["out"]


def test_websocket_echo_through_two_sidecars(cleanup, ca):  # noqa: F811
    app, port = start(cleanup, ca, "echo")
    key = base64.b64encode(os.urandom(16))
    big = os.urandom(200_000)
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        sock.sendall(handshake(key) + encode_frame(OP_TEXT, b"pipelined", mask=True))
        head = read_head(sock)
        assert head.startswith(b"HTTP/1.1 101 ")
        assert b"Sec-WebSocket-Accept: " + websocket_accept(key) + b"\r\n" in head
        assert read_frame(sock) == (OP_TEXT, b"welcome")  # sent by the app with its 101
        assert read_frame(sock) == (OP_TEXT, b"pipelined")
        sock.sendall(encode_frame(OP_BINARY, big, mask=True))
        assert read_frame(sock) == (OP_BINARY, big)
        sock.sendall(encode_frame(OP_CLOSE, b"\x03\xe8bye", mask=True))
        assert read_frame(sock) == (OP_CLOSE, b"\x03\xe8bye")
        assert sock.recv(10) == b""  # the app closed; the relay closes the client side too
    assert app.requests == 1


RETRY_RESETS = {
    "attempts": 3, "per_try_timeout": None, "retry_on": ["5xx"], "backoff": 0.01, "max_backoff": 0.05,
    "non_idempotent": False, "budget": {"ratio": 1.0, "min_per_second": 100.0},
}


def test_an_upgrade_request_is_never_retried(cleanup, ca):  # noqa: F811
    app, port = start(cleanup, ca, "reset", retries=RETRY_RESETS)
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        sock.sendall(b"GET /plain HTTP/1.1\r\nHost: svc\r\n\r\n")
        assert read_head(sock).startswith(b"HTTP/1.1 502 ")
    plain_tries = app.requests
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        sock.sendall(handshake(base64.b64encode(os.urandom(16))))
        assert read_head(sock).startswith(b"HTTP/1.1 502 ")
    assert plain_tries == 3  # the same reset on a plain GET is retried...
    assert app.requests - plain_tries == 1  # ...but the handshake went upstream once


def test_a_declined_upgrade_stays_http(cleanup, ca):  # noqa: F811
    app, port = start(cleanup, ca, "decline")
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        sock.sendall(handshake(base64.b64encode(os.urandom(16))))
        assert read_head(sock).startswith(b"HTTP/1.1 200 ")
        assert recv_exactly(sock, 12) == b"plain answer"
        sock.sendall(b"GET /again HTTP/1.1\r\nHost: svc\r\n\r\n")  # the same connection, still HTTP/1.1
        assert read_head(sock).startswith(b"HTTP/1.1 200 ")
        assert recv_exactly(sock, 12) == b"plain answer"
    assert app.requests == 2


pytestmark = pytest.mark.timeout(60)
