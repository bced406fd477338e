"""proxy.upgrade: pure decisions (tables) and a real WebSocket handshake + echo through a relay.

The socket test runs client -> a tiny standalone proxy (proxy.http1 + proxy.upgrade +
proxy.opaque, no engine) -> a WebSocket echo server written here with the minimal framing
of RFC 6455 (text frames, masking, close).
"""

import asyncio
import base64
import os
import struct

import pytest

from meshctl.proxy.http1 import END, NEED_DATA, Head, Parser
from meshctl.proxy.upgrade import UpgradeError, check_switch, forward_request_head, requested_upgrade, switch_to_relay, websocket_accept

DEADLINE_S = 10.0


def parse(raw: bytes, is_request: bool = True) -> Head:
    parser = Parser(is_request)
    parser.feed(raw)
    head = parser.next_event()
    assert isinstance(head, Head)
    return head


WS_REQUEST = (
    b"GET /chat HTTP/1.1\r\nHost: app\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nKeep-Alive: 5\r\n\r\n"
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (WS_REQUEST, b"websocket"),
        (b"GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: WebSocket\r\n\r\n", b"websocket"),
        (b"GET / HTTP/1.1\r\nConnection: Upgrade\r\nUpgrade: h2c, websocket\r\n\r\n", b"websocket"),
        (b"GET / HTTP/1.1\r\nUpgrade: websocket\r\n\r\n", None),  # no connection: upgrade
        (b"GET / HTTP/1.1\r\nConnection: upgrade\r\n\r\n", None),  # no upgrade header
        (b"GET / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: h2c\r\nHTTP2-Settings: AAA\r\n\r\n", None),
        (b"POST / HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\n", None),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", None),
    ],
)
def test_requested_upgrade(raw, expected):
    assert requested_upgrade(parse(raw)) == expected


def test_forward_head_keeps_the_upgrade_pair_only():
    head = parse(WS_REQUEST)
    out = forward_request_head(head, b"websocket", add=[b"x-request-id: r1"])
    forwarded = parse(out)
    names = [name for name, _ in forwarded.headers]
    assert b"keep-alive" not in names
    assert forwarded.get(b"connection") == b"upgrade"
    assert forwarded.get(b"upgrade") == b"websocket"
    assert forwarded.get(b"sec-websocket-key") == b"dGhlIHNhbXBsZSBub25jZQ=="
    assert forwarded.get(b"x-request-id") == b"r1"
    assert names.count(b"connection") == 1 and names.count(b"upgrade") == 1
    assert requested_upgrade(forwarded) == b"websocket"


OK_101 = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"


@pytest.mark.parametrize(
    ("request_raw", "response_raw", "expected"),
    [
        (WS_REQUEST, OK_101, True),
        (WS_REQUEST, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", False),  # declined: stays HTTP
        (WS_REQUEST, b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n", False),
        (WS_REQUEST, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n", UpgradeError),
        (WS_REQUEST, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n", UpgradeError),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", OK_101, UpgradeError),
    ],
)
def test_check_switch(request_raw, response_raw, expected):
    request, response = parse(request_raw), parse(response_raw, is_request=False)
    if expected is UpgradeError:
        with pytest.raises(UpgradeError) as info:
            check_switch(request, response)
        assert info.value.code == "upstream-reset" and info.value.status == 502
    else:
        assert check_switch(request, response) is expected


def test_websocket_accept_rfc_example():
    assert websocket_accept(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


# -- minimal RFC 6455 framing --------------------------------------------------------------

OP_TEXT, OP_CLOSE = 0x1, 0x8


def encode_frame(opcode: int, payload: bytes, mask: bool) -> bytes:
    head = bytes([0x80 | opcode])
    length = len(payload)
    mask_bit = 0x80 if mask else 0
    if length < 126:
        head += bytes([mask_bit | length])
    elif length < 65536:
        head += bytes([mask_bit | 126]) + struct.pack("!H", length)
    else:
        head += bytes([mask_bit | 127]) + struct.pack("!Q", length)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    first, second = await reader.readexactly(2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    key = await reader.readexactly(4) if second & 0x80 else None
    payload = await reader.readexactly(length)
    if key:
        payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return first & 0x0F, payload


async def websocket_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        request = await reader.readuntil(b"\r\n\r\n")
        head = parse(request)
        if requested_upgrade(head) != b"websocket":
            writer.write(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            return
        accept = websocket_accept(head.get(b"sec-websocket-key"))
        # The first frame goes out in the same write as the 101, so the proxy's response
        # parser has bytes past the head that must reach the client first.
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n" + encode_frame(OP_TEXT, b"welcome", mask=False)
        )
        while True:
            opcode, payload = await read_frame(reader)
            if opcode == OP_CLOSE:
                writer.write(encode_frame(OP_CLOSE, payload, mask=False))
                return
            writer.write(encode_frame(opcode, payload, mask=False))
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


class UpgradeProxy(asyncio.Protocol):
    """The standalone harness: parse one request, forward it, and on a 101 become a relay."""

    def __init__(self, backend: tuple[str, int], relays: list) -> None:
        self.backend = backend
        self.relays = relays
        self.parser = Parser(is_request=True)

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.parser.feed(data)
        event = self.parser.next_event()
        if event is NEED_DATA:
            return
        self.transport.pause_reading()
        self.request = event
        assert self.parser.next_event() is END
        asyncio.get_running_loop().create_task(self.forward())

    async def forward(self):
        loop = asyncio.get_running_loop()
        protocol = requested_upgrade(self.request)
        head = forward_request_head(self.request, protocol) if protocol else self.request.raw
        upstream_transport, upstream = await loop.create_connection(ResponseReader, *self.backend)
        upstream_transport.write(head)
        response = await upstream.head
        self.transport.write(response.raw)
        if check_switch(self.request, response):
            relay = switch_to_relay(loop, self.transport, self.parser.take_buffer(), upstream_transport, upstream.parser.take_buffer())
            self.relays.append(relay)
        else:
            self.transport.close()
            upstream_transport.close()


class ResponseReader(asyncio.Protocol):
    def __init__(self):
        self.parser = Parser(is_request=False)
        self.head = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.parser.feed(data)
        event = self.parser.next_event()
        if isinstance(event, Head):
            self.transport.pause_reading()  # the rest belongs to the relay
            self.head.set_result(event)


def test_websocket_through_relay():
    async def main():
        loop = asyncio.get_running_loop()
        relays = []
        backend = await asyncio.start_server(websocket_echo, "127.0.0.1", 0)
        address = backend.sockets[0].getsockname()[:2]
        proxy = await loop.create_server(lambda: UpgradeProxy(address, relays), "127.0.0.1", 0)
        writer = None
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.sockets[0].getsockname()[1])
            key = base64.b64encode(os.urandom(16))
            writer.write(
                b"GET /ws HTTP/1.1\r\nHost: app\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
                + encode_frame(OP_TEXT, b"early", mask=True)  # pipelined right after the handshake
            )
            response = parse(await reader.readuntil(b"\r\n\r\n"), is_request=False)
            assert response.status == 101
            assert response.get(b"sec-websocket-accept") == websocket_accept(key)
            assert await read_frame(reader) == (OP_TEXT, b"welcome")
            assert await read_frame(reader) == (OP_TEXT, b"early")
            for message in (b"hello", "h\u00e9llo".encode(), b"x" * 70_000):
                writer.write(encode_frame(OP_TEXT, message, mask=True))
                assert await read_frame(reader) == (OP_TEXT, message)
            writer.write(encode_frame(OP_CLOSE, struct.pack("!H", 1000), mask=True))
            assert await read_frame(reader) == (OP_CLOSE, struct.pack("!H", 1000))
            assert await asyncio.wait_for(reader.read(), DEADLINE_S) == b""
            writer.write_eof()  # the server closed its side; the relay ends once we close ours
            relay = relays[0]
            await asyncio.wait_for(relay.done, DEADLINE_S)
            assert relay.sent_upstream > 70_000 and relay.sent_downstream > 70_000
        finally:
            if writer is not None:
                writer.close()
            for relay in relays:
                relay.close()
            proxy.close()
            backend.close()
            await proxy.wait_closed()
            await backend.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_declined_upgrade_stays_http():
    async def plain(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    async def main():
        loop = asyncio.get_running_loop()
        relays = []
        backend = await asyncio.start_server(plain, "127.0.0.1", 0)
        proxy = await loop.create_server(lambda: UpgradeProxy(backend.sockets[0].getsockname()[:2], relays), "127.0.0.1", 0)
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.sockets[0].getsockname()[1])
            writer.write(WS_REQUEST)
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 426 ")
            assert relays == []
            writer.close()
        finally:
            proxy.close()
            backend.close()
            await proxy.wait_closed()
            await backend.wait_closed()

    asyncio.run(asyncio.wait_for(main(), 30))
