"""Driver tests of the HTTP/1.1 engine: `ClientConnection`, `Exchange` and `Pool` in-process.

No sockets and no sidecar process: the client and upstream connections get fake transports
(tests.drivers), the test scripts what the upstream answers and when the peers go away, and
asserts on the bytes each side was sent, on the pool and on what the exchange reported when it
ended (outcome, status, tries). A failure here names the engine's line, where the sidecar
tests only see a wrong answer.
"""

from __future__ import annotations

import re

import pytest

from meshctl.proxy.exchange import IllegalTransition, Phase
from meshctl.proxy.server import PIPELINE_BUFFER_LIMIT
from tests.drivers import APP, ENDPOINTS, Engine, service_config

GET = b"GET /items HTTP/1.1\r\nHost: web\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
RETRY_RESETS = {"attempts": 3, "retry_on": ["reset"], "backoff": 0}
_REQUEST_ID_LINE = re.compile(rb"x-request-id: [0-9a-f]{24}\r\n")


def from_ingress(written: bytes) -> bytes:
    """A response as the ingress wrote it, less the x-request-id line it adds (asserted here)."""
    without, added = _REQUEST_ID_LINE.subn(b"", written)
    assert added == 1, written
    return without


def test_a_response_goes_to_the_client_and_its_connection_back_to_the_pool() -> None:
    with Engine("inbound") as engine:
        client, client_transport, upstream, upstream_transport = engine.send(GET)
        assert upstream.address == APP
        assert upstream_transport.data().startswith(b"GET /items HTTP/1.1\r\n")
        upstream.data_received(OK)
        assert client_transport.data() == OK
        assert engine.pool.idle_count(APP) == 1
        assert engine.completed == [("ok", 200, 1)]
        assert client.exchange is None and not client_transport.closed


def test_a_reset_before_the_response_is_retried_on_the_other_endpoint() -> None:
    with Engine("ingress", service_config(retries=RETRY_RESETS)) as engine:
        client, client_transport, first, first_transport = engine.send(GET)
        sent = first_transport.data()
        first.connection_lost(ConnectionResetError("reset by peer"))
        second, second_transport = engine.upstream()
        assert {first.address, second.address} == set(ENDPOINTS)
        assert second_transport.data() == sent  # the replay copy, byte for byte
        second.data_received(OK)
        assert from_ingress(client_transport.data()) == OK
        assert engine.completed == [("ok", 200, 2)]


def test_a_reset_post_is_not_retried_and_answers_502() -> None:
    with Engine("ingress", service_config(retries=RETRY_RESETS)) as engine:
        client, client_transport, first, _ = engine.send(b"POST /items HTTP/1.1\r\nHost: web\r\nContent-Length: 2\r\n\r\n{}")
        first.connection_lost(ConnectionResetError("reset by peer"))
        engine.run()
        assert len(engine.pool.opened) == 1
        assert client_transport.data().startswith(b"HTTP/1.1 502 ")
        assert b"x-mesh-error: upstream-reset" in client_transport.data()
        assert engine.completed == [("upstream-reset", 502, 1)]


def test_a_pooled_connection_the_peer_closed_is_replaced_without_counting_a_try() -> None:
    with Engine("inbound") as engine:
        stale, stale_transport = engine.idle_upstream()
        client, client_transport = engine.client()
        client.data_received(GET)
        assert stale_transport.data().startswith(b"GET /items ")
        stale.connection_lost(None)  # the peer's close crossed our request
        fresh, fresh_transport = engine.upstream()
        assert fresh is not stale
        assert fresh_transport.data() == stale_transport.data()
        fresh.data_received(OK)
        assert client_transport.data() == OK
        assert engine.completed == [("ok", 200, 1)]


def test_a_pooled_connection_closed_mid_response_head_is_not_replayed() -> None:
    with Engine("inbound") as engine:
        stale, _ = engine.idle_upstream()
        client, client_transport = engine.client()
        client.data_received(GET)
        stale.data_received(b"HTTP/1.1 200 OK\r\nContent-")  # the peer had begun to answer
        stale.connection_lost(None)
        engine.run()
        assert engine.pool.opened == []
        assert b"x-mesh-error: upstream-reset" in client_transport.data()


def test_a_fresh_connection_closed_before_the_response_fails_without_a_retry_policy() -> None:
    with Engine("inbound") as engine:
        client, client_transport, upstream, _ = engine.send(GET)
        upstream.connection_lost(None)
        engine.run()
        assert len(engine.pool.opened) == 1
        assert client_transport.data().startswith(b"HTTP/1.1 502 ")
        assert engine.completed == [("upstream-reset", 502, 1)]


def test_a_refused_connect_is_retried_on_the_other_endpoint_without_a_retry_policy() -> None:
    with Engine("ingress") as engine:
        engine.pool.refuse = 1
        client, client_transport = engine.client()
        client.data_received(GET)
        engine.run_until(lambda: engine.pool.opened, "a connect after the backoff")
        upstream, _ = engine.upstream()
        assert [upstream.address] + engine.pool.refused in (list(ENDPOINTS), list(reversed(ENDPOINTS)))
        upstream.data_received(OK)
        assert from_ingress(client_transport.data()) == OK
        assert engine.completed == [("ok", 200, 2)]


def test_101_turns_both_connections_into_a_relay() -> None:
    with Engine("inbound") as engine:
        client, client_transport = engine.client()
        client.data_received(
            b"GET /chat HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        upstream, upstream_transport = engine.upstream()
        assert b"upgrade: websocket" in upstream_transport.data().lower()
        switched = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        upstream.data_received(switched + b"server-frame")
        assert client_transport.data() == switched + b"server-frame"
        assert client not in engine.state.connections and client.exchange is None
        assert engine.pool.idle_count(APP) == 0 and upstream.closed  # never handed out again
        client_transport.protocol.data_received(b"client-frame")
        assert upstream_transport.written[-1] == b"client-frame"
        assert engine.completed == [("ok", 101, 1)]


def test_a_101_to_a_request_without_upgrade_is_refused() -> None:
    with Engine("inbound") as engine:
        client, client_transport, upstream, upstream_transport = engine.send(GET)
        upstream.data_received(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        assert upstream_transport.aborted
        assert b"x-mesh-error: upstream-reset" in client_transport.data()


def test_a_head_response_ends_at_its_head_and_the_connection_serves_the_next_request() -> None:
    with Engine("inbound") as engine:
        client, client_transport, upstream, upstream_transport = engine.send(b"HEAD /items HTTP/1.1\r\nHost: web\r\n\r\n")
        head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n"
        upstream.data_received(head)
        assert client_transport.data() == head
        assert engine.completed == [("ok", 200, 1)]
        assert engine.pool.idle_count(APP) == 1
        client.data_received(GET)
        assert upstream_transport.written[-1].startswith(b"GET /items ")
        upstream.data_received(OK)
        assert client_transport.data() == head + OK
        assert len(engine.pool.opened) == 1


def test_100_continue_reaches_an_http11_client_before_the_final_response() -> None:
    with Engine("inbound") as engine:
        expecting = b"POST /items HTTP/1.1\r\nHost: web\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"
        client, client_transport, upstream, upstream_transport = engine.send(expecting)
        interim = b"HTTP/1.1 100 Continue\r\n\r\n"
        upstream.data_received(interim)
        assert client_transport.data() == interim
        client.data_received(b"hello")
        assert upstream_transport.data().endswith(b"\r\n\r\nhello")
        upstream.data_received(OK)
        assert client_transport.data() == interim + OK
        assert engine.completed == [("ok", 200, 1)]
        assert engine.pool.idle_count(APP) == 1


def test_an_interim_response_is_not_forwarded_to_an_http10_client() -> None:
    with Engine("inbound") as engine:
        client, client_transport, upstream, _ = engine.send(b"GET /items HTTP/1.0\r\nHost: web\r\n\r\n")
        upstream.data_received(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\n" + OK)
        assert client_transport.data().startswith(b"HTTP/1.1 200 OK\r\n")
        assert b"103" not in client_transport.data()
        assert b"connection: close" in client_transport.data()  # a 1.0 client without keep-alive
        assert client_transport.closed


def test_pipelined_requests_go_upstream_one_at_a_time_and_are_answered_in_order() -> None:
    with Engine("inbound") as engine:
        client, client_transport, upstream, upstream_transport = engine.send(GET + b"GET /second HTTP/1.1\r\nHost: web\r\n\r\n")
        assert upstream_transport.data().startswith(b"GET /items ") and b"/second" not in upstream_transport.data()
        upstream.data_received(OK)
        assert upstream_transport.written[-1].startswith(b"GET /second ")  # on the same connection
        second = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond"
        upstream.data_received(second)
        assert client_transport.data() == OK + second
        assert [outcome for outcome, _, _ in engine.completed] == ["ok", "ok"]
        assert len(engine.pool.opened) == 1


def test_too_many_pipelined_bytes_pause_the_client_until_the_response_ends() -> None:
    with Engine("inbound") as engine:
        client, client_transport = engine.client()
        pipelined = GET * (PIPELINE_BUFFER_LIMIT // len(GET) + 2)
        client.data_received(pipelined)
        upstream, _ = engine.upstream()
        assert client_transport.reading_paused
        upstream.data_received(OK)
        assert not client_transport.reading_paused


def test_a_client_that_stops_reading_pauses_the_upstream_and_resumes_it() -> None:
    with Engine("inbound") as engine:
        client, client_transport, upstream, upstream_transport = engine.send(GET)
        upstream.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        client.pause_writing()  # the client's write buffer is full
        assert upstream_transport.reading_paused
        client.resume_writing()
        assert not upstream_transport.reading_paused
        upstream.data_received(b"0\r\n\r\n")
        assert client_transport.data().endswith(b"5\r\nhello\r\n0\r\n\r\n")
        assert engine.completed == [("ok", 200, 1)]


def test_an_upstream_that_stops_reading_pauses_the_client() -> None:
    with Engine("inbound") as engine:
        half = b"POST /items HTTP/1.1\r\nHost: web\r\nContent-Length: 10\r\n\r\nhello"
        client, client_transport, upstream, upstream_transport = engine.send(half)
        upstream.pause_writing()  # the upstream's write buffer is full
        assert client_transport.reading_paused
        upstream.resume_writing()
        assert not client_transport.reading_paused
        client.data_received(b"world")
        assert upstream_transport.data().endswith(b"helloworld")


def test_a_client_gone_mid_body_aborts_the_upstream_connection() -> None:
    with Engine("inbound") as engine:
        client, _, upstream, upstream_transport = engine.send(b"POST /items HTTP/1.1\r\nHost: web\r\nContent-Length: 100\r\n\r\n0123456789")
        assert upstream_transport.data().endswith(b"0123456789")
        client.connection_lost(ConnectionResetError("reset by peer"))
        assert upstream_transport.aborted
        assert engine.pool.idle_count(APP) == 0
        assert engine.completed == [("client-lost", 0, 1)]


def test_a_client_gone_mid_response_aborts_the_upstream_connection() -> None:
    with Engine("inbound") as engine:
        client, _, upstream, upstream_transport = engine.send(GET)
        upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart")
        client.connection_lost(None)
        assert upstream_transport.aborted
        assert engine.completed == [("client-lost", 200, 1)]


def test_the_request_deadline_answers_504_and_drops_the_upstream_connection() -> None:
    with Engine("ingress", service_config(timeout=0.5)) as engine:
        client, client_transport, upstream, upstream_transport = engine.send(GET)
        assert client.deadline > 0
        client.on_deadline(client.deadline)  # what the server's sweeper does when it is due
        assert upstream_transport.aborted
        assert client_transport.data().startswith(b"HTTP/1.1 504 ")
        assert b"x-mesh-error: timeout" in client_transport.data()
        assert engine.completed == [("timeout", 504, 1)]


def test_a_per_try_timeout_tries_the_other_endpoint() -> None:
    retries = {"attempts": 2, "retry_on": ["timeout"], "backoff": 0, "per_try_timeout": 0.2}
    with Engine("ingress", service_config(retries=retries)) as engine:
        client, client_transport, first, first_transport = engine.send(GET)
        client.on_deadline(client.deadline)
        assert first_transport.aborted
        second, _ = engine.upstream()
        assert second.address != first.address
        second.data_received(OK)
        assert from_ingress(client_transport.data()) == OK
        assert engine.completed == [("ok", 200, 2)]


def test_a_retriable_status_is_discarded_and_the_request_tried_again() -> None:
    retries = {"attempts": 2, "retry_on": ["503"], "backoff": 0}
    with Engine("ingress", service_config(retries=retries)) as engine:
        client, client_transport, first, _ = engine.send(GET)
        first.data_received(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 4\r\n\r\nbusy")
        second, _ = engine.upstream()
        assert second is not first
        second.data_received(OK)
        assert from_ingress(client_transport.data()) == OK  # nothing of the 503 reached the client
        assert engine.completed == [("ok", 200, 2)]
        assert engine.pool.idle_count(first.address) == 1  # the discarded answer ended cleanly


def test_the_phase_table_refuses_a_new_try_once_the_response_began_and_any_move_after_the_end() -> None:
    with Engine("inbound") as engine:
        client, _, upstream, _ = engine.send(GET)
        exchange = client.exchange
        assert exchange is not None and exchange.phase is Phase.TRYING
        upstream.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhe")
        assert exchange.phase is Phase.RESPONDING and exchange.response_started
        with pytest.raises(IllegalTransition, match="RESPONDING to TRYING"):
            exchange.transition(Phase.TRYING)
        upstream.data_received(b"llo")
        assert exchange.phase is Phase.ANSWERED and exchange.answered
        for phase in Phase:
            if phase is not Phase.ANSWERED:
                with pytest.raises(IllegalTransition):
                    exchange.transition(phase)
