"""proxy.h1bridge: one HTTP/2 stream as one HTTP/1.1 exchange, sans-IO (the bytes both ways)."""

import pytest

from meshctl.proxy.h1bridge import STREAM_ID, H1Endpoint
from meshctl.proxy.h2conn import STREAM_WINDOW, Data, H2ProtocolError, Headers, StreamEnded

GET = [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"shop:8080"), (b":path", b"/a?b=1"), (b"x-user", b"ida")]


def test_a_get_becomes_a_request_head_with_host():
    endpoint = H1Endpoint()
    assert endpoint.send_request(GET, end_stream=True) == STREAM_ID
    assert endpoint.data_to_send() == b"GET /a?b=1 HTTP/1.1\r\nhost: shop:8080\r\nx-user: ida\r\n\r\n"


def test_a_body_of_unknown_length_is_chunked_and_trailers_end_it():
    endpoint = H1Endpoint()
    endpoint.send_request([(b":method", b"POST"), (b":path", b"/p"), (b"te", b"trailers")])
    endpoint.send_data(STREAM_ID, b"hello")
    endpoint.send_trailers(STREAM_ID, [(b"x-checksum", b"1")])  # no HTTP/1.1 equivalent an app reads: dropped
    assert endpoint.data_to_send() == b"POST /p HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n"


def test_a_known_length_body_goes_as_it_is_and_an_empty_post_says_so():
    endpoint = H1Endpoint()
    endpoint.send_request([(b":method", b"PUT"), (b":path", b"/p"), (b"content-length", b"2")])
    endpoint.send_data(STREAM_ID, b"hi")
    endpoint.end_stream(STREAM_ID)
    assert endpoint.data_to_send() == b"PUT /p HTTP/1.1\r\ncontent-length: 2\r\n\r\nhi"
    empty = H1Endpoint()
    empty.send_request([(b":method", b"POST"), (b":path", b"/p")], end_stream=True)
    assert empty.data_to_send() == b"POST /p HTTP/1.1\r\ncontent-length: 0\r\n\r\n"


def test_the_response_comes_back_as_stream_events_without_hop_by_hop_fields():
    endpoint = H1Endpoint()
    endpoint.send_request(GET, end_stream=True)
    events = endpoint.receive(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nconnection: keep-alive\r\n"
                              b"transfer-encoding: chunked\r\nx-served-by: web\r\n\r\n3\r\nabc\r\n")
    assert isinstance(events[0], Headers) and events[0].headers == [(b":status", b"200"), (b"x-served-by", b"web")]
    assert b"".join(e.data for e in events if isinstance(e, Data)) == b"abc"
    assert not endpoint.finished
    events = endpoint.receive(b"0\r\n\r\n")
    assert isinstance(events[-1], StreamEnded) and endpoint.finished


def test_head_and_a_body_until_close():
    head = H1Endpoint()
    head.send_request([(b":method", b"HEAD"), (b":path", b"/")], end_stream=True)
    events = head.receive(b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n")
    assert [type(e) for e in events] == [Headers, StreamEnded]
    until_close = H1Endpoint()
    until_close.send_request(GET, end_stream=True)
    events = until_close.receive(b"HTTP/1.1 200 OK\r\n\r\npart")
    assert [type(e) for e in events] == [Headers, Data]
    assert [type(e) for e in until_close.receive_eof()] == [StreamEnded]


def test_a_malformed_response_is_a_protocol_error():
    endpoint = H1Endpoint()
    endpoint.send_request(GET, end_stream=True)
    with pytest.raises(H2ProtocolError):
        endpoint.receive(b"HTTP/1.1 abc nonsense\r\n\r\n")
    assert endpoint.finished


def test_a_chunked_body_split_anywhere_loses_only_its_framing():
    wire = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5;ext=1\r\nhello\r\n1a\r\n" + b"z" * 26 + b"\r\n0\r\nx-trailer: 1\r\n\r\n"
    for step in (1, 2, 7, len(wire)):
        endpoint = H1Endpoint()
        endpoint.send_request(GET, end_stream=True)
        events = []
        for start in range(0, len(wire), step):
            events += endpoint.receive(wire[start : start + step])
        assert b"".join(e.data for e in events if isinstance(e, Data)) == b"hello" + b"z" * 26, step
        assert isinstance(events[-1], StreamEnded) and endpoint.finished


def test_a_response_not_passed_on_holds_the_app_at_one_window():
    resumed = []
    endpoint = H1Endpoint()
    endpoint.resume = lambda: resumed.append(True)
    endpoint.send_request(GET, end_stream=True)
    big = b"x" * (STREAM_WINDOW + 10)
    events = endpoint.receive(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(big), big))
    assert sum(len(e.data) for e in events if isinstance(e, Data)) == len(big)
    assert endpoint.over_window
    endpoint.paused = True  # as the driver does when it stops reading
    endpoint.acknowledge(STREAM_ID, 5)
    assert resumed == [] and endpoint.over_window
    endpoint.acknowledge(STREAM_ID, 5)
    assert resumed == [True] and not endpoint.paused and not endpoint.over_window
