"""proxy.opaque: the TCP relay driven with real sockets on 127.0.0.1.

Each test runs one event loop with three parties: a backend server, a relay listener
(accepts, then connects a Relay to the backend) and a client, all on real sockets.
"""

import asyncio
import contextlib
import socket

import pytest

from meshctl.proxy.opaque import MAX_EARLY_BYTES, WRITE_HIGH_WATER, Relay

DEADLINE_S = 10.0


async def until(predicate, what: str, deadline: float = DEADLINE_S) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not predicate():
        if loop.time() > end:
            raise AssertionError("timed out waiting for " + what)
        await asyncio.sleep(0.005)


class RelayListener:
    """Accepts on 127.0.0.1:0 and relays every connection to `backend`."""

    def __init__(self, backend: tuple[str, int], idle_timeout: float | None = None) -> None:
        self.backend = backend
        self.idle_timeout = idle_timeout
        self.relays: list[Relay] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def __aenter__(self) -> "RelayListener":
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def _accept(self):
        loop = asyncio.get_running_loop()
        relay = Relay(loop, idle_timeout=self.idle_timeout)
        self.relays.append(relay)
        loop.create_task(relay.connect_upstream(self.backend[0], self.backend[1], timeout=2.0))
        return relay.downstream

    async def __aexit__(self, *exc) -> None:
        self.server.close()
        for relay in self.relays:
            relay.close()
        for relay in self.relays:
            await asyncio.wait_for(relay.done, DEADLINE_S)
        await self.server.wait_closed()


@contextlib.asynccontextmanager
async def backend(handler):
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[:2]
    finally:
        server.close()
        await server.wait_closed()


async def echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


def run(coro):
    asyncio.run(asyncio.wait_for(coro, 30))


def test_echo_roundtrip_and_counters():
    async def main():
        async with backend(echo) as address, RelayListener(address) as listener:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            for message in (b"hello", b"\x00\x01binary\xff", b"x" * 100_000):
                writer.write(message)
                assert await reader.readexactly(len(message)) == message
            writer.write_eof()
            assert await reader.read() == b""  # echo saw our half-close and closed its side
            writer.close()
            relay = listener.relays[0]
            await asyncio.wait_for(relay.done, DEADLINE_S)
            total = 5 + 9 + 100_000
            assert relay.sent_upstream == total
            assert relay.sent_downstream == total

    run(main())


def test_server_speaks_first():
    """A banner from the backend reaches a client that has sent nothing (SMTP, MySQL)."""

    async def banner(reader, writer):
        writer.write(b"220 mail.example ESMTP ready\r\n")
        line = await reader.readline()
        writer.write(b"250 got " + line)
        await writer.drain()
        writer.close()

    async def main():
        async with backend(banner) as address, RelayListener(address) as listener:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            assert await reader.readline() == b"220 mail.example ESMTP ready\r\n"
            writer.write(b"HELO me\r\n")
            assert await reader.readline() == b"250 got HELO me\r\n"
            assert await reader.read() == b""
            writer.close()

    run(main())


def test_half_close_keeps_other_direction_open():
    """The client finishes sending; the backend still answers after seeing EOF."""

    async def collect_then_answer(reader, writer):
        data = await reader.read()  # until the client's EOF
        writer.write(b"got %d bytes" % len(data))
        await writer.drain()
        writer.close()

    async def main():
        async with backend(collect_then_answer) as address, RelayListener(address) as listener:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            writer.write(b"a" * 1000)
            writer.write_eof()
            assert await reader.read() == b"got 1000 bytes"
            writer.close()

    run(main())


def test_slow_reader_keeps_memory_bounded():
    """A backend streaming 32 MiB to a client that reads nothing: the relay holds a bounded amount."""
    total = 32 * 1024 * 1024
    chunk = b"z" * 65536
    sent = {"bytes": 0}

    async def firehose(reader, writer):
        try:
            while sent["bytes"] < total:
                writer.write(chunk)
                sent["bytes"] += len(chunk)
                await writer.drain()
            writer.close()
        except ConnectionError:
            pass

    async def main():
        async with backend(firehose) as address, RelayListener(address) as listener:
            client = socket.create_connection(("127.0.0.1", listener.port))
            client.setblocking(False)
            try:
                await until(lambda: listener.relays and listener.relays[0].upstream.transport, "relay connected")
                relay = listener.relays[0]
                # The backend stops when all buffers are full: it stalls long before the end.
                await until(lambda: relay.downstream.writing_paused, "relay paused")
                previous = -1
                while previous != sent["bytes"]:  # settle: no progress over a few loop turns
                    previous = sent["bytes"]
                    await asyncio.sleep(0.05)
                assert sent["bytes"] < total / 2
                held = relay.downstream.transport.get_write_buffer_size() + relay.upstream.transport.get_write_buffer_size()
                assert held <= WRITE_HIGH_WATER + 2 * len(chunk) + 65536 * 4
                assert relay.upstream.reading_paused is True
                received = 0
                loop = asyncio.get_running_loop()
                while received < total:
                    data = await loop.sock_recv(client, 1 << 20)
                    assert data, "closed after %d of %d bytes" % (received, total)
                    received += len(data)
                assert received == total
                assert await loop.sock_recv(client, 1) == b""  # the backend's close came through as EOF
                client.shutdown(socket.SHUT_WR)
                await asyncio.wait_for(relay.done, DEADLINE_S)
                assert relay.sent_downstream == total
            finally:
                client.close()

    run(main())


def test_idle_timeout_closes_both_sides():
    backend_closed = asyncio.Event

    async def main():
        closed = backend_closed()

        async def wait_for_close(reader, writer):
            await reader.read()
            closed.set()
            writer.close()

        async with backend(wait_for_close) as address, RelayListener(address, idle_timeout=0.2) as listener:
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            writer.write(b"ping")
            assert await asyncio.wait_for(reader.read(), DEADLINE_S) == b""
            await asyncio.wait_for(closed.wait(), DEADLINE_S)
            writer.close()

    run(main())


def test_upstream_refused_closes_client():
    async def main():
        with socket.socket() as unused:
            unused.bind(("127.0.0.1", 0))
            address = unused.getsockname()  # bound, not listening: connections are refused
            async with RelayListener(address) as listener:
                reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
                assert await asyncio.wait_for(reader.read(), DEADLINE_S) == b""
                writer.close()

    run(main())


def test_early_bytes_held_until_upstream_attached():
    """Bytes from one end before the other is connected are delivered, and over the cap pause the sender."""

    async def main():
        loop = asyncio.get_running_loop()
        async with backend(echo) as address:
            relay = Relay(loop)
            server = await loop.create_server(lambda: relay.downstream, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                payload = b"e" * (MAX_EARLY_BYTES * 2)
                writer.write(payload)
                await until(lambda: relay.downstream.reading_paused, "client paused while upstream is missing")
                assert await relay.connect_upstream(address[0], address[1], timeout=2.0)
                assert await reader.readexactly(len(payload)) == payload
                writer.close()
                relay.close()
                await asyncio.wait_for(relay.done, DEADLINE_S)
            finally:
                server.close()
                await server.wait_closed()

    run(main())


@pytest.mark.parametrize("pending", [b"", b"leftover"])
def test_adopt_existing_connection(pending):
    """A connection that already has a protocol is handed to the relay, with bytes it had read."""

    class Greeter(asyncio.Protocol):
        def connection_made(self, transport):
            self.transport = transport
            transport.pause_reading()
            made.set_result(transport)

    async def main():
        nonlocal made
        loop = asyncio.get_running_loop()
        made = loop.create_future()
        async with backend(echo) as address:
            server = await loop.create_server(Greeter, "127.0.0.1", 0)
            port = server.sockets[0].getsockname()[1]
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                transport = await made
                relay = Relay(loop)
                relay.adopt_downstream(transport, pending)
                assert await relay.connect_upstream(address[0], address[1], timeout=2.0)
                if pending:
                    assert await reader.readexactly(len(pending)) == pending
                writer.write(b"after")
                assert await reader.readexactly(5) == b"after"
                writer.close()
                await asyncio.wait_for(relay.done, DEADLINE_S)
            finally:
                server.close()
                await server.wait_closed()

    made = None
    run(main())
