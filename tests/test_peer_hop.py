"""bench/peer_hop.py and peer_hop_ends.py: the adapter's conversions, the doc section, a tiny real run of both ends.

The run starts the hop server and one hop client per mode as real processes talking TLS 1.3
with client certificates on 127.0.0.1, and checks every mode served every request.
"""

from __future__ import annotations

import os
import sys

import psutil
import pytest

BENCH_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH_DIR)

import peer_hop  # noqa: E402
import peer_hop_ends  # noqa: E402


def _request(extra: bytes = b"") -> peer_hop_ends.Head:
    return peer_hop_ends.parse_head(b"GET /a?b=1 HTTP/1.1\r\nHost: web\r\nAccept: */*\r\n" + extra + b"\r\n", is_request=True)


@pytest.mark.parametrize("extra, dropped", [
    (b"", []),
    (b"Connection: keep-alive\r\n", [b"connection"]),
    (b"Connection: close, x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n", [b"connection", b"x-hop", b"keep-alive"]),
    (b"TE: gzip\r\n", [b"te"]),
])
def test_h2_request_fields_drop_connection_specific(extra: bytes, dropped: list[bytes]) -> None:
    fields = peer_hop_ends.h2_request_fields(_request(extra), [(b"x-request-id", b"1")])
    assert fields[:4] == [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"web"), (b":path", b"/a?b=1")]
    names = [name for name, _ in fields]
    assert b"host" not in names and b"accept" in names and names[-1] == b"x-request-id"
    assert not set(dropped) & set(names)


def test_request_round_trip_to_http1() -> None:
    fields = peer_hop_ends.h2_request_fields(_request(), [])
    raw = peer_hop_ends.h1_request_bytes(fields, end_stream=True)
    head = peer_hop_ends.parse_head(raw, is_request=True)
    assert (head.method, head.target, head.get(b"host"), head.get(b"accept")) == (b"GET", b"/a?b=1", b"web", b"*/*")


@pytest.mark.parametrize("fields, end_stream, start, chunked, framing", [
    ([(b":status", b"200"), (b"content-length", b"13")], False, b"HTTP/1.1 200 OK\r\n", False, b"content-length: 13"),
    ([(b":status", b"200")], False, b"HTTP/1.1 200 OK\r\n", True, b"transfer-encoding: chunked"),
    ([(b":status", b"404")], True, b"HTTP/1.1 404 Not Found\r\n", False, b"content-length: 0"),
    ([(b":status", b"204")], False, b"HTTP/1.1 204 No Content\r\n", False, None),
])
def test_h1_response_head(fields: list, end_stream: bool, start: bytes, chunked: bool, framing: bytes | None) -> None:
    head, is_chunked = peer_hop_ends.h1_response_head(fields, end_stream)
    assert head.startswith(start) and head.endswith(b"\r\n\r\n")
    assert is_chunked is chunked
    if framing is not None:
        assert framing in head
    assert peer_hop_ends.parse_head(head, is_request=False).status == int(fields[0][1])


def test_response_fields_from_an_app_head() -> None:
    fields = peer_hop_ends.h2_response_fields(peer_hop_ends.parse_head(peer_hop_ends.APP_RESPONSE, is_request=False))
    assert fields[0] == (b":status", b"200")
    assert (b"content-length", b"13") in fields and all(name != b"connection" for name, _ in fields)


@pytest.mark.parametrize("concurrency, lanes, expected", [(32, 1, [32]), (32, 2, [16, 16]), (5, 2, [3, 2]), (4, 4, [1, 1, 1, 1])])
def test_spread(concurrency: int, lanes: int, expected: list[int]) -> None:
    assert peer_hop_ends.spread(concurrency, lanes) == expected


TITLE = peer_hop.SECTION_TITLE


@pytest.mark.parametrize("page, kept", [
    ("# T\n\nintro\n", ["intro"]),
    ("# T\n\nintro\n\n%s\n\nold figures\n" % TITLE, ["intro"]),
    ("# T\n\n%s\n\nold figures\n\n## Later\n\nkeep me\n" % TITLE, ["## Later", "keep me"]),
])
def test_replace_section(page: str, kept: list[str]) -> None:
    text = peer_hop.replace_section(page, TITLE, TITLE + "\n\nnew figures\n")
    assert text.count(TITLE) == 1 and "new figures" in text and "old figures" not in text
    for line in kept:
        assert line in text
    if "## Later" in page:
        assert text.index(TITLE) < text.index("## Later")


def _entry(protocol: str, rps: float, cpu: float) -> dict:
    return {"protocol": protocol, "connections": 1, "rps": rps, "runs": [rps], "cpu_us": cpu, "client_cpu_us": cpu / 2,
            "server_cpu_us": cpu / 2, "errors": 0}


@pytest.mark.parametrize("h1, h2, winner", [
    (_entry("h1", 30000, 30), _entry("h2", 5000, 200), "pooled"),
    (_entry("h1", 5000, 200), _entry("h2", 30000, 30), "over h2"),
])
def test_conclusion_names_the_faster(h1: dict, h2: dict, winner: str) -> None:
    result = {"modes": {"HTTP/1.1 pooled": h1, "HTTP/1.1 over h2": h2}}
    text = peer_hop.conclusion(result)
    assert text.startswith("**HTTP/1.1 %s** wins" % winner)
    assert "6.00x" in text


def test_tiny_run_of_both_modes(tmp_path) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    result = peer_hop.measure(str(tmp_path), requests=200, concurrency=4, runs=1, warmup=20)
    modes = result["modes"]
    assert {(entry["protocol"], entry["connections"]) for entry in modes.values()} == {("h1", 4), ("h2", 1), ("h2", 2)}
    for label, entry in modes.items():
        assert (entry["requests"], entry["completed"], entry["errors"]) == (200, 200, 0), label
        assert entry["rps"] > 0 and entry["cpu_us"] > 0, label
    assert {p.pid for p in psutil.Process().children(recursive=True)} <= before
