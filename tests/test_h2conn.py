"""proxy.h2conn and proxy.h2proxy: pure gRPC helpers, the sans-IO endpoint in memory, and the H2Proxy driver
with a real grpcio client and server (demo-services/recommend.py) on 127.0.0.1."""

import asyncio
import importlib.util
import threading
from pathlib import Path

import pytest

from meshctl.proxy import h2proxy
from meshctl.proxy.h2conn import (
    CODECS,
    GRPC_RETRIABLE,
    STREAM_WINDOW,
    ConnectionEnded,
    Data,
    H2ProtocolError,
    Headers,
    StreamEnded,
    StreamReset,
    Trailers,
    grpc_status,
    grpc_timeout,
    is_grpc,
    strip_connection_specific,
)
from meshctl.proxy.h2proxy import H2Proxy

DEADLINE_S = 10.0


@pytest.fixture(params=sorted(CODECS))
def codec(request, monkeypatch):
    """Each installed HTTP/2 codec in turn (ngh2 and the h2 fallback), also inside H2Proxy."""
    endpoint = CODECS[request.param]
    monkeypatch.setattr(h2proxy, "H2Endpoint", endpoint)
    return endpoint


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"100m", 0.1),
        (b"1S", 1.0),
        (b"2M", 120.0),
        (b"1H", 3600.0),
        (b"5000u", 0.005),
        (b"99999999n", 0.099999999),
        (b"123456789S", None),  # at most 8 digits
        (b"1s", None),
        (b"S", None),
        (b"", None),
        (None, None),
    ],
)
def test_grpc_timeout(value, expected):
    headers = [] if value is None else [(b"grpc-timeout", value)]
    result = grpc_timeout(headers)
    assert result == pytest.approx(expected) if expected is not None else result is None


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([(b"grpc-status", b"0")], 0),
        ([(b"grpc-message", b"x"), (b"grpc-status", b"14")], 14),
        ([(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-status", b"4")], 4),
        ([(b"grpc-status", b"abc")], None),
        ([(b"grpc-status", b"100")], None),
        ([], None),
    ],
)
def test_grpc_status(headers, expected):
    assert grpc_status(headers) == expected


def test_grpc_codes_and_detection():
    assert GRPC_RETRIABLE == {1, 4, 8, 14}
    assert is_grpc([(b"content-type", b"application/grpc+proto")])
    assert not is_grpc([(b"content-type", b"application/json")])


def test_strip_connection_specific():
    headers = [
        (b":method", b"POST"),
        (b"connection", b"keep-alive"),
        (b"te", b"trailers"),
        (b"upgrade", b"h2c"),
        (b"keep-alive", b"5"),
        (b"transfer-encoding", b"chunked"),
        (b"x-user", b"u1"),
    ]
    assert strip_connection_specific(headers) == [(b":method", b"POST"), (b"te", b"trailers"), (b"x-user", b"u1")]
    assert strip_connection_specific([(b"te", b"gzip")]) == []


def pump(a, b) -> tuple[list, list]:
    """Exchange bytes until both are quiet; the events each side saw."""
    seen_a, seen_b = [], []
    while True:
        to_b, to_a = a.data_to_send(), b.data_to_send()
        if not to_a and not to_b:
            return seen_a, seen_b
        seen_b.extend(b.receive(to_b) if to_b else [])
        seen_a.extend(a.receive(to_a) if to_a else [])


REQUEST = [(b":method", b"POST"), (b":scheme", b"http"), (b":authority", b"x"), (b":path", b"/svc/M"), (b"content-type", b"application/grpc")]


def test_endpoint_exchange_with_trailers_and_backpressure(codec):
    client, server = codec(client_side=True), codec(client_side=False)
    pump(client, server)
    stream_id = client.send_request(REQUEST)
    payload = b"p" * (STREAM_WINDOW * 2)
    sent = client.send_data(stream_id, payload)
    assert sent == STREAM_WINDOW  # the server's stream window, no more
    _, events = pump(client, server)
    assert isinstance(events[0], Headers) and events[0].headers[:2] == REQUEST[:2]
    received = sum(len(e.data) for e in events if isinstance(e, Data))
    assert received == STREAM_WINDOW
    assert client.send_data(stream_id, payload[sent:]) == 0  # nothing acknowledged yet: stays closed
    server.acknowledge(stream_id, received)  # the consumer took it: the window reopens
    pump(client, server)
    assert client.send_data(stream_id, payload[sent:]) == STREAM_WINDOW
    client.end_stream(stream_id)
    _, events = pump(client, server)
    assert isinstance(events[-1], StreamEnded)
    server.send_response(stream_id, [(b":status", b"200"), (b"content-type", b"application/grpc")])
    server.send_data(stream_id, b"\x00\x00\x00\x00\x02hi")
    server.send_trailers(stream_id, [(b"grpc-status", b"0")])
    events, _ = pump(client, server)
    kinds = [type(e) for e in events]
    assert kinds[:1] == [Headers] and Trailers in kinds and kinds[-1] is StreamEnded
    trailers = next(e for e in events if isinstance(e, Trailers))
    assert grpc_status(trailers.headers) == 0


def test_endpoint_reset(codec):
    client, server = codec(client_side=True), codec(client_side=False)
    pump(client, server)
    stream_id = client.send_request(REQUEST)
    pump(client, server)
    client.reset(stream_id, 8)
    _, events = pump(client, server)
    assert [(type(e), e.error_code) for e in events if isinstance(e, StreamReset)] == [(StreamReset, 8)]


def test_endpoint_refuses_a_connection_specific_header(codec):
    """RFC 9113 8.2.2: ngh2 resets the one stream, h2 ends the connection; neither passes it on."""
    if "ngh2" not in CODECS:
        pytest.skip("the raw client is ngh2, which sends header fields as it is given them")
    server = codec(client_side=False)
    raw = CODECS["ngh2"](client_side=True)
    pump(raw, server)
    stream_id = raw.send_request(REQUEST + [(b"connection", b"keep-alive")], end_stream=True)
    try:
        client_events, server_events = pump(raw, server)
    except H2ProtocolError:
        return
    assert not any(isinstance(e, Headers) for e in server_events)
    assert [e.stream_id for e in client_events if isinstance(e, StreamReset)] == [stream_id]


def test_goaway_ends_the_connection_without_a_protocol_error(codec):
    client, server = codec(client_side=True), codec(client_side=False)
    pump(client, server)
    stream_id = client.send_request(REQUEST, end_stream=True)
    pump(client, server)
    server.send_response(stream_id, [(b":status", b"200")], end_stream=True)
    server.close()
    events, _ = pump(client, server)
    assert any(isinstance(e, ConnectionEnded) for e in events)
    assert client.receive(b"") == []


# -- the proxy driver with grpcio --------------------------------------------------------------

grpc = pytest.importorskip("grpc")


def load_recommend():
    path = Path(__file__).resolve().parent.parent / "demo-services" / "recommend.py"
    spec = importlib.util.spec_from_file_location("demo_recommend_h2", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class ProxyThread:
    """H2Proxy listening on 127.0.0.1:0 in its own event loop thread."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.loop = asyncio.new_event_loop()
        self.proxies: list[H2Proxy] = []
        self.port = 0
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def pick(self, headers):
        return "127.0.0.1", self.upstream_port, None

    def _factory(self):
        proxy = H2Proxy(self.pick, self.loop)
        self.proxies.append(proxy)
        return proxy

    def _run(self):
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(self.loop.create_server(self._factory, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()
        self.server.close()
        self.loop.run_until_complete(self.server.wait_closed())
        for proxy in self.proxies:
            if proxy.transport is not None:
                proxy.transport.close()
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(DEADLINE_S)
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(DEADLINE_S)


@pytest.fixture
def recommend_server():
    module = load_recommend()
    server, port = module.build_server(0)
    try:
        yield port
    finally:
        server.stop(grace=None).wait(DEADLINE_S)


@pytest.fixture
def channel(recommend_server, codec):
    with ProxyThread(recommend_server) as proxy:
        channel = grpc.insecure_channel("127.0.0.1:%d" % proxy.port, options=[("grpc.enable_http_proxy", 0)])
        try:
            yield channel, proxy
        finally:
            channel.close()


def method(channel, name, kind="unary_unary"):
    return getattr(channel, kind)("/recommend.Recommend/" + name, request_serializer=None, response_deserializer=None)


def test_grpc_unary_through_proxy(channel):
    ch, proxy = channel
    response, call = method(ch, "ForItem").with_call(b"sku1", timeout=DEADLINE_S)
    assert response == b"sku1-a,sku1-b,sku1-c"
    assert call.code() == grpc.StatusCode.OK
    assert ("x-served-by", "recommend@v1#0") in call.trailing_metadata()
    for index in range(20):  # many calls share one downstream and one upstream connection
        assert method(ch, "ForItem")(b"i%d" % index, timeout=DEADLINE_S) == b"i%d-a,i%d-b,i%d-c" % (index, index, index)
    assert len(proxy.proxies) == 1 and proxy.proxies[0].streams == 21


def test_grpc_server_streaming(channel):
    ch, _ = channel
    replies = list(method(ch, "Stream", "unary_stream")(b"500", timeout=DEADLINE_S))
    assert replies == [b"rec-%d" % i for i in range(500)]


def test_grpc_client_streaming_large(channel):
    """More than a stream window in each direction: flow control must reopen it."""
    ch, _ = channel
    messages = [b"m" * 16384 for _ in range(200)]  # 3.2 MB, far over STREAM_WINDOW
    assert method(ch, "Collect", "stream_unary")(iter(messages), timeout=DEADLINE_S) == b"200"


def test_grpc_deadline_exceeded(channel):
    ch, _ = channel
    with pytest.raises(grpc.RpcError) as info:
        method(ch, "Slow")(b"", timeout=0.2)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert method(ch, "ForItem")(b"after", timeout=DEADLINE_S) == b"after-a,after-b,after-c"


def test_grpc_status_from_server(channel):
    ch, _ = channel
    with pytest.raises(grpc.RpcError) as info:
        method(ch, "Fail")(b"", timeout=DEADLINE_S)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert info.value.details() == "recommendations are warming up"


def test_grpc_upstream_down_is_unavailable(codec):
    import socket

    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        with ProxyThread(unused.getsockname()[1]) as proxy:
            ch = grpc.insecure_channel("127.0.0.1:%d" % proxy.port, options=[("grpc.enable_http_proxy", 0)])
            try:
                with pytest.raises(grpc.RpcError) as info:
                    method(ch, "ForItem")(b"x", timeout=DEADLINE_S)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "upstream-connect-failed" in info.value.details()
            finally:
                ch.close()


def test_a_stream_held_back_by_the_peers_concurrency_limit_gets_its_body_once_it_goes_out():
    """ngh2 queues a request beyond the peer's MAX_CONCURRENT_STREAMS silently; streams_opened() tells the driver."""
    ngh2 = pytest.importorskip("ngh2")
    client = CODECS["ngh2"](client_side=True)
    server = ngh2.Connection(ngh2.Role.SERVER)
    server.initiate_connection({ngh2.Setting.MAX_CONCURRENT_STREAMS: 1})

    def exchange() -> list:
        server.receive_data(client.data_to_send())
        events = client.receive(server.data_to_send())
        server.receive_data(client.data_to_send())
        return events + server.events()

    exchange()
    first = client.send_request(REQUEST)
    second = client.send_request(REQUEST)
    assert client.send_data(first, b"one") == 3
    assert client.send_data(second, b"two") == 0 and client.waiting == {second}  # held back: no window yet
    exchange()
    assert not client.streams_opened()
    server.send_response(first, [(b":status", b"200")], end_stream=True)
    client.end_stream(first)
    exchange()  # the first stream closes, so ngh2 sends the second's head
    assert client.streams_opened() and not client.waiting
    assert client.send_data(second, b"two") == 3
    client.end_stream(second)
    received = exchange()
    assert b"".join(e.data for e in received if isinstance(e, ngh2.DataReceived) and e.stream_id == second) == b"two"


def test_the_codec_is_chosen_once_and_a_wrong_name_says_what_to_do(monkeypatch):
    from meshctl.proxy import h2conn

    assert h2conn._choose_codec("") == ("ngh2" if "ngh2" in CODECS else "h2")
    assert h2conn._choose_codec("h2") == "h2"
    with pytest.raises(RuntimeError, match="expected h2 or ngh2"):
        h2conn._choose_codec("nghttp2")
    monkeypatch.setattr(h2conn, "CODECS", {"h2": CODECS["h2"]})
    with pytest.raises(RuntimeError, match="pip install ngh2"):
        h2conn._choose_codec("ngh2")
