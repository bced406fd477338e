"""Property test of the request path against one real, long-running sidecar process.

Random and mutated request bytes go to an outbound listener whose upstream is a
scripted echo server. Whatever arrives, the sidecar must stay alive and either answer
each request (200 from the upstream for valid ones, 400/413/431 with `x-mesh-error`
for malformed ones) or close the connection; it must never hang.

Bounded to 200 examples in `make test`; `HYPOTHESIS_PROFILE=fuzz` runs 100,000.
"""

from __future__ import annotations

import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.proxy_harness import Sidecar, Upstream, service

settings.register_profile(
    "sidecar-quick", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
settings.register_profile(
    "fuzz", max_examples=100_000, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)
PROFILE = settings.get_profile("fuzz" if os.environ.get("HYPOTHESIS_PROFILE") == "fuzz" else "sidecar-quick")

MAX_HEADER_BYTES = 4096
MAX_BODY_BYTES = 2048
ERROR_STATUSES = {400, 413, 431}


@pytest.fixture(scope="module")
def fuzz_port():
    upstream = Upstream("fuzz")
    sidecar = Sidecar([{"name": "out", "kind": "outbound", "service": "svc"}], {"svc": service([("v1", upstream.address)])})
    try:
        sidecar.start(http={"max_header_bytes": MAX_HEADER_BYTES, "max_body_bytes": MAX_BODY_BYTES, "header_timeout": 10.0, "idle_timeout": 60.0})
        yield sidecar
    finally:
        sidecar.stop()
        upstream.stop()


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
_value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(str.strip)
_path = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789/._~-", max_size=30).map(lambda p: "/f/" + p)


@st.composite
def valid_requests(draw) -> bytes:
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS"]))
    headers = draw(st.lists(st.tuples(_token.filter(lambda n: n not in {"content-length", "transfer-encoding", "connection", "te", "trailer", "upgrade", "keep-alive", "proxy-connection", "expect", "host"}), _value), max_size=6))
    body = draw(st.binary(max_size=300))
    lines = ["%s %s HTTP/1.1" % (method, draw(_path)), "host: svc"] + ["%s: %s" % item for item in headers]
    if draw(st.booleans()) and body:
        chunks = [body[i : i + 64] for i in range(0, len(body), 64)]
        lines.append("transfer-encoding: chunked")
        framed = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for chunk in chunks) + b"0\r\n\r\n"
    else:
        lines.append("content-length: %d" % len(body))
        framed = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + framed


@st.composite
def mutated_requests(draw) -> bytes:
    data = bytearray(draw(valid_requests()))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "duplicate"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "insert":
            data[at:at] = draw(st.sampled_from([b"\r\n", b"\n", b" ", b":", b"\x00", b"0", b"chunked", b"content-length: 9\r\n", b"A" * 5000]))
        elif kind == "delete" and data:
            del data[at : at + draw(st.integers(1, 8))]
        elif kind == "duplicate":
            data[at:at] = data[at : at + draw(st.integers(1, 40))]
    return bytes(data)


inputs = st.one_of(
    valid_requests().map(lambda r: (r, True)),
    st.lists(valid_requests(), min_size=2, max_size=3).map(lambda rs: (b"".join(rs), True)),
    mutated_requests().map(lambda r: (r, False)),
    st.binary(max_size=600).map(lambda r: (r, False)),
)


def _exchange(port: int, data: bytes) -> bytes:
    """Send everything, half-close, and read until the sidecar closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the sidecar may reject and close before reading everything
        received = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                return received
            if not chunk:
                return received
            received += chunk


def _responses(data: bytes) -> list[tuple[int, dict[str, str]]]:
    responses = []
    while data:
        end = data.find(b"\r\n\r\n")
        assert end > 0, "truncated response head: %r" % data[:200]
        lines = data[:end].decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        responses.append((status, headers))
        data = data[end + 4 + length :]
    return responses


@PROFILE
@given(inputs)
def test_any_request_bytes_get_a_proper_answer_or_a_close(fuzz_port, case):
    data, valid = case
    received = _exchange(fuzz_port.ports["out"], data)
    assert fuzz_port.proc.poll() is None, "the sidecar died"
    responses = _responses(received)
    for status, headers in responses:
        if status != 200:
            assert status in ERROR_STATUSES and headers.get("x-mesh-error"), (status, headers, data[:300])
    if valid:
        assert responses and all(status == 200 for status, _ in responses), (responses, data[:300])
