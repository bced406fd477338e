"""The sidecar's connection pool on its own: the line of waiting requests and bounded establishment.

Real event loops and real sockets on 127.0.0.1 (mTLS with certificates from our own CA where
TLS matters); the waiters are small recorders standing in for proxy.exchange.Exchange, which
talks to the pool through the same two callbacks.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

from meshctl.proxy.pool import MAX_ESTABLISHING, ConnectFailed, Pool, UpstreamConnection
from meshctl.proxy.tls import ClientTLS, TLSConfig
from tests.proxy_harness import refused_port
from tests.tlspeers import make_ca, tls_block


class Waiter:
    """Records what the pool gave it; `on_failed` runs when its connect fails."""

    def __init__(self, name: str, on_failed=None) -> None:
        self.name = name
        self.conn: UpstreamConnection | None = None
        self.failed: tuple[str, str] | None = None
        self.done = asyncio.get_running_loop().create_future()
        self.on_failed = on_failed

    def pooled(self, conn: UpstreamConnection, reused: bool) -> None:
        conn.owner = self
        self.conn = conn
        self.done.set_result("pooled")

    def connect_failed(self, outcome: str, detail: str) -> None:
        self.failed = (outcome, detail)
        self.done.set_result("failed")
        if self.on_failed is not None:
            self.on_failed()


class CountingPool(Pool):
    """A Pool that remembers how many connects it had in flight at most."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.in_flight = 0
        self.most_in_flight = 0
        self.opened = 0

    async def connect(self, *args, **kwargs) -> UpstreamConnection:
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            conn = await super().connect(*args, **kwargs)
        finally:
            self.in_flight -= 1
        self.opened += 1
        return conn


class Server:
    """An asyncio server on 127.0.0.1:0 that holds each connection open (or runs `handler`)."""

    def __init__(self, handler=None) -> None:
        self.handler = handler or self._keep_open
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[:2]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        try:
            await self.handler(reader, writer)
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _keep_open(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()

    async def close(self, pool: Pool, address: tuple[str, int], conns: list[UpstreamConnection]) -> None:
        """Close everything and wait until the pool saw every connection go."""
        for conn in conns:
            conn.close()
        pool.close_all()
        for writer in self.writers:
            writer.close()
        self.server.close()
        await self.server.wait_closed()
        await _until(lambda: pool.dial(address).open == 0, "the pool to see its connections closed")


async def _until(predicate, what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "timed out waiting for %s" % what
        await asyncio.sleep(0.01)


def _mtls(tmp_path: Path) -> tuple[TLSConfig, ClientTLS]:
    ca = make_ca(tmp_path / "ca")
    server = TLSConfig(tls_block(ca, "web"), None)
    client = TLSConfig(tls_block(ca, "ingress"), None)
    return server, ClientTLS(client.client_context, server.identity, "web.mesh")


def test_a_line_of_waiters_gets_connections_opened_a_few_at_a_time() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server = Server()
        address = await server.start()
        pool = CountingPool(loop)
        waiters = [Waiter("w%d" % index) for index in range(40)]
        for waiter in waiters:
            pool.wait(waiter, address, 5.0)
        await asyncio.wait_for(asyncio.gather(*(w.done for w in waiters)), 30)

        assert [w.failed for w in waiters] == [None] * 40
        assert len({id(w.conn) for w in waiters}) == 40
        assert pool.most_in_flight == MAX_ESTABLISHING
        assert pool.dial(address).establishing == 0
        await server.close(pool, address, [w.conn for w in waiters])

    asyncio.run(scenario())


def test_a_connection_whose_requester_gave_up_serves_the_next_or_waits_idle() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        server = Server()
        address = await server.start()
        pool = CountingPool(loop)
        gave_up, later = Waiter("gave-up"), Waiter("later")
        pool.wait(gave_up, address, 5.0)
        pool.cancel(gave_up, address)
        pool.wait(later, address, 5.0)
        assert await asyncio.wait_for(later.done, 10) == "pooled"
        assert pool.opened == 1 and not gave_up.done.done()

        nobody = Waiter("nobody")
        pool.wait(nobody, address, 5.0)
        pool.cancel(nobody, address)
        await _until(lambda: pool.idle_count(address) == 1, "the connection opened for nobody to wait in the pool")
        assert pool.opened == 2
        await server.close(pool, address, [later.conn])

    asyncio.run(scenario())


def test_a_refused_connect_fails_every_waiter_when_the_address_has_no_open_connection() -> None:
    async def scenario() -> None:
        pool = Pool(asyncio.get_running_loop())
        address = ("127.0.0.1", refused_port())
        waiters = [Waiter("w%d" % index) for index in range(5)]
        for waiter in waiters:
            pool.wait(waiter, address, 5.0)
        await asyncio.wait_for(asyncio.gather(*(w.done for w in waiters)), 10)

        assert [w.failed for w in waiters] == [("refused", "connection refused")] * 5

    asyncio.run(scenario())


def test_with_an_open_connection_a_failed_connect_fails_only_the_oldest_waiter() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        address = listener.getsockname()[:2]
        pool = Pool(loop)
        open_conn = await pool.connect(address, 5.0)
        peer, _ = listener.accept()  # done: the connect completed
        listener.close()  # from now on connects are refused, the open connection lives on
        # The oldest waiter's failure frees the open connection: the next waiter must get it.
        first = Waiter("first", on_failed=lambda: pool.add_idle(open_conn))
        second, third = Waiter("second"), Waiter("third")
        for waiter in (first, second, third):
            pool.wait(waiter, address, 5.0)
        await asyncio.wait_for(asyncio.gather(first.done, second.done, third.done), 10)

        assert first.failed == ("refused", "connection refused")
        assert second.conn is open_conn and second.failed is None
        assert third.failed == ("refused", "connection refused")
        open_conn.close()
        await _until(lambda: pool.dial(address).open == 0, "the open connection to close")
        peer.close()

    asyncio.run(scenario())


def test_the_connect_timeout_limits_the_tcp_connect_and_the_handshake_has_its_own(tmp_path: Path) -> None:
    server_tls, client_tls = _mtls(tmp_path)

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        listener = socket.socket()
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        address = listener.getsockname()[:2]
        pool = Pool(loop)
        # A peer busy with other handshakes: the kernel completed the TCP connect long ago,
        # the TLS handshake starts when the peer gets to it.
        connecting = loop.create_task(pool.connect(address, 0.2, client_tls, "web", handshake_timeout=10.0))
        accepted, _ = await loop.sock_accept(listener)
        await asyncio.sleep(0.5)  # the peer's backlog of handshakes: longer than the connect timeout
        assert not connecting.done()
        server_transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, accepted, ssl=server_tls.server_context)
        conn = await asyncio.wait_for(connecting, 10)
        assert conn.transport.get_extra_info("ssl_object") is not None

        never_served = loop.create_task(loop.sock_accept(listener))
        with pytest.raises(ConnectFailed, match="TLS handshake") as failed:
            await pool.connect(address, 5.0, client_tls, "web", handshake_timeout=0.3)
        assert failed.value.outcome == "connect-failure"

        conn.close()
        server_transport.close()
        (await never_served)[0].close()
        listener.close()
        await _until(lambda: pool.dial(address).open == 0, "the connection to close")

    asyncio.run(scenario())
