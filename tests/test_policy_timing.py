"""Documented traffic-policy behaviour that only shows over time or over many requests,
through a real sidecar process: the per-try and connect timeouts (each with its own error
and value), a fault delay that really delays, and a fault percentage that hits about that
share of requests."""

from __future__ import annotations

import math
import socket
import time

import pytest

from tests.proxy_harness import Upstream, service
from tests.test_sidecar_policy import get, outbound, pipelined


@pytest.fixture
def upstreams():
    started: list[Upstream] = []

    def start(name: str) -> Upstream:
        started.append(Upstream(name))
        return started[-1]

    try:
        yield start
    finally:
        for up in started:
            up.stop()


class FullBacklog:
    """A listener whose accept queue is full: a new connection's SYN is dropped, so connect() hangs."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(0)
        self.address = list(self.sock.getsockname())
        self.fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(tuple(self.address))
            self.fillers.append(filler)

    def stop(self) -> None:
        for filler in self.fillers:
            filler.close()
        self.sock.close()


@pytest.fixture
def full_backlog():
    listener = FullBacklog()
    try:
        yield listener
    finally:
        listener.stop()


def test_connect_timeout_fires_with_its_own_error_and_value(sidecars, full_backlog):
    block = service([("v1", full_backlog.address)], connect_timeout=0.3, timeout=10.0)
    port = sidecars([{"name": "out", "kind": "outbound", "service": "svc"}], {"svc": block}).start().ports["out"]
    started = time.monotonic()
    status, headers, body = get(port, "/")
    assert time.monotonic() - started >= 0.3
    assert (status, headers["x-mesh-error"]) == (502, "upstream-connect-failed"), body
    assert b"connect timed out after 0.3s" in body


def test_per_try_timeout_fires_with_its_own_error_and_value(sidecars, upstreams):
    slow = upstreams("slow")
    slow.hang = True
    retries = {"attempts": 2, "per_try_timeout": 0.25, "retry_on": ["timeout"], "backoff": 0.01}
    port = outbound(sidecars, [("v1", slow)], retries=retries, timeout=10.0)
    started = time.monotonic()
    status, headers, body = get(port, "/hang")
    assert time.monotonic() - started >= 0.5  # two tries of 0.25 s each
    assert (status, headers["x-mesh-error"]) == (504, "timeout"), body
    assert b"per-try timeout of 0.25s" in body
    assert len(slow.requests) == 2  # the per-try timeout was retried, the request timeout was not reached


def test_request_timeout_names_its_own_value(sidecars, upstreams):
    slow = upstreams("slow")
    slow.hang = True
    retries = {"attempts": 5, "per_try_timeout": 5.0, "retry_on": ["timeout"]}
    port = outbound(sidecars, [("v1", slow)], retries=retries, timeout=0.3)
    status, headers, body = get(port, "/hang")
    assert (status, headers["x-mesh-error"]) == (504, "timeout"), body
    assert b"not finished within 0.3s" in body and b"per-try" not in body


def test_fault_delay_really_delays(sidecars, upstreams):
    up = upstreams("up")
    routes = [{"match": {"path": {"prefix": "/"}}, "version": "v1", "fault": {"delay": {"fixed": 0.3, "percent": 100}}}]
    port = outbound(sidecars, [("v1", up)], routes=routes)
    for _ in range(3):
        started = time.monotonic()
        assert get(port, "/d")[0] == 200
        assert time.monotonic() - started >= 0.3


def within_six_sigma(hits: int, trials: int, share: float) -> bool:
    """Binomial bound: a correct implementation falls outside it about once in 10^9 runs."""
    sigma = math.sqrt(trials * share * (1 - share))
    return abs(hits - trials * share) <= 6 * sigma


@pytest.mark.parametrize("percent", [10, 50])
def test_fault_percent_hits_about_that_share(sidecars, upstreams, percent):
    up = upstreams("up")
    routes = [{"match": {"path": {"prefix": "/"}}, "version": "v1", "fault": {"abort": {"status": 418, "percent": percent}}}]
    port = outbound(sidecars, [("v1", up)], routes=routes)
    trials = 2000
    request = b"GET /f HTTP/1.1\r\nhost: svc\r\n\r\n"
    statuses = [status for status, _, _ in pipelined(port, trials, request)]
    aborted = statuses.count(418)
    assert aborted + statuses.count(200) == trials
    assert within_six_sigma(aborted, trials, percent / 100), (aborted, trials)
    assert len(up.requests) == trials - aborted
