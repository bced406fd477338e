"""The sidecar's connection and ejection counters, read over the config channel (`stats?`).

A real sidecar process with an outbound listener in front of two upstreams, one failing:
outlier detection ejects it (mesh_ejections_total), every client connection is closed
after its request (inbound opened/closed with bytes), and the upstream connections the
sidecar opened are counted outbound under the service's name.
"""

from __future__ import annotations

import pytest

from tests.proxy_harness import Sidecar, Upstream, raw_exchange, service, wait_for


@pytest.fixture
def parts():
    started: list = []
    try:
        yield started
    finally:
        for part in reversed(started):
            part.stop()


def _stats(sidecar: Sidecar) -> dict:
    sidecar.channel.sendall(b'{"type":"stats?"}\n')
    while True:
        reply = sidecar.read_reply()
        if reply.get("type") == "stats":
            return reply["data"]


def _get(port: int) -> int:
    request = b"GET / HTTP/1.1\r\nhost: svc\r\nconnection: close\r\n\r\n"
    return raw_exchange(port, request)[0][0]


def test_ejections_and_tcp_connections_are_counted(parts):
    good, bad = Upstream("good"), Upstream("bad")
    parts.extend([good, bad])
    bad.fail_status = 500
    outlier = {"consecutive_errors": 3, "interval": 0.2, "base_ejection_time": 30.0, "max_ejection_percent": 50}
    block = service([("v1", good.address), ("v1", bad.address)], outlier_detection=outlier)
    sidecar = Sidecar([{"name": "out", "kind": "outbound", "service": "svc"}], {"svc": block})
    parts.append(sidecar)
    sidecar.start()
    port = sidecar.ports["out"]

    wait_for(lambda: _get(port) == 500 and len(bad.requests) >= 3, what="three failures on the bad endpoint")
    sent = 1 + sum(1 for _ in range(10) if _get(port))

    def counted() -> dict | None:
        stats = _stats(sidecar)
        inbound = [row for row in stats["tcp"] if row[0] == "inbound"]
        return stats if inbound and inbound[0][2] >= sent else None

    stats = wait_for(counted, what="the closed client connections in the stats")
    assert stats["ejections"] == [["svc", "v1", 1]]
    [inbound] = [row for row in stats["tcp"] if row[0] == "inbound"]
    direction, peer, opened, closed, bytes_in, bytes_out = inbound
    assert peer == "unknown" and opened == closed >= sent
    assert bytes_in >= closed * len(b"GET / HTTP/1.1\r\n") and bytes_out >= closed * len(b"HTTP/1.1 200 OK\r\n")
    [outbound] = [row for row in stats["tcp"] if row[0] == "outbound"]
    assert outbound[1] == "svc" and outbound[2] >= 2  # one connection to each upstream at least
