"""`meshctl why` at the sidecar: decision records of real requests through real sidecars.

Each test sends traffic through sidecar processes (tests/proxy_harness.py), asks the
sidecar for its records over the config channel as the agent does (`why?`), and checks
what the record, and the story told from it (meshctl/explain.py), says.
"""

from __future__ import annotations

import json
import socket
import threading

import pytest

from meshctl import explain
from tests.proxy_harness import Sidecar, Upstream, refused_port, service, wait_for
from tests.test_sidecar import request

DEBUG = {"x-mesh-debug": "1"}


@pytest.fixture
def sidecars():
    started: list[Sidecar] = []

    def make(listeners, services=None, **extra):
        sidecar = Sidecar(listeners, services, **extra)
        started.append(sidecar)
        return sidecar

    yield make
    for sidecar in started:
        sidecar.stop()


@pytest.fixture
def upstream():
    server = Upstream()
    yield server
    server.stop()


class ResetServer:
    """Accepts, reads the request, and closes without answering: a reset before any response."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.address = ["127.0.0.1", self.sock.getsockname()[1]]
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            try:
                conn.recv(65536)
            except OSError:
                pass
            conn.close()

    def stop(self) -> None:
        self.sock.close()


@pytest.fixture
def resetting():
    server = ResetServer()
    yield server
    server.stop()


def ask(sidecar: Sidecar, message: dict) -> dict:
    """Send a read-out request on the config channel; its answer (the agent's view)."""
    sidecar.channel.sendall((json.dumps(message, separators=(",", ":")) + "\n").encode())
    while True:
        reply = sidecar.read_reply()
        if reply.get("id") == message["id"]:
            return reply


def records(sidecar: Sidecar, request_id: str | None = None) -> list[dict]:
    message = {"type": "why?", "id": 7}
    message.update({"request_id": request_id} if request_id else {"recent": 100})
    return ask(sidecar, message)["records"]


def outbound(sidecars, services: dict, **extra) -> Sidecar:
    return sidecars([{"name": "out", "kind": "outbound", "service": "svc"}], services, **extra).start()


def test_a_reset_retried_to_another_endpoint_is_explained_try_by_try(sidecars, upstream, resetting):
    retries = {"attempts": 2, "retry_on": ["reset"], "backoff": 0.001}
    side = outbound(sidecars, {"svc": service([("v1", resetting.address), ("v1", upstream.address)], retries=retries)})
    for _ in range(4):
        assert request(side.ports["out"])[0] == 200
    retried = wait_for(lambda: [r for r in records(side) if len(r["tries"]) == 2], what="a retried request on record")
    record = retried[0]
    first, second = record["tries"]
    assert (first["endpoint"], first["outcome"], first["retried"], first["retry_reason"]) == ("svc@v1#0", "reset", True, "retry_on: reset")
    assert (second["endpoint"], second["status"], second["outcome"]) == ("svc@v1#1", 200, "response")
    assert record["status"] == 200 and record["by"] == "app" and record["error"] is None
    story = explain.tell(explain.stitch(record["request_id"], [record]))
    assert "svc@v1#0 reset the connection" in story
    assert "the retry (retry_on: reset) went to svc@v1#1" in story and "got 200" in story


def test_a_post_is_not_retried_and_the_record_says_why(sidecars, resetting):
    retries = {"attempts": 3, "retry_on": ["reset"], "backoff": 0.001}
    side = outbound(sidecars, {"svc": service([("v1", resetting.address)], retries=retries)})
    status, headers, _ = request(side.ports["out"], "POST", "/orders", body=b"{}")
    assert (status, headers["x-mesh-error"]) == (502, "upstream-reset")
    (record,) = records(side, headers["x-request-id"])  # mesh errors carry the request's id
    (only,) = record["tries"]
    assert only["outcome"] == "reset" and not only["retried"]
    assert only["retry_reason"] == "POST is not idempotent (retries.non_idempotent is false)"
    assert record["error"] == "upstream-reset" and record["by"] == "mesh"
    assert "not retried: POST is not idempotent" in explain.tell(explain.stitch(record["request_id"], [record]))


def test_an_authz_deny_names_the_rule(sidecars, upstream):
    authz = {"default": "allow", "allow": None, "deny": [{"paths": ["/admin/*"]}]}
    inbound = sidecars([{"name": "inbound", "kind": "inbound", "app": upstream.address}], authz=authz, trust_domain="t.local").start()
    status, headers, _ = request(inbound.ports["inbound"], path="/admin/users")
    assert (status, headers["x-mesh-error"]) == (403, "forbidden")
    (record,) = records(inbound, headers["x-request-id"])
    assert record["authz"] == {"decision": "deny", "rule": "deny[0]"}
    assert record["direction"] == "inbound" and record["tries"] == []
    story = explain.tell(explain.stitch(record["request_id"], [record]))
    assert "Authorization: DENY (decided by deny[0])" in story
    assert "x-mesh-error: forbidden" in story


def test_a_request_timeout_says_which_timeout_and_its_value(sidecars, upstream):
    upstream.hang = True
    side = outbound(sidecars, {"svc": service([("v1", upstream.address)], timeout=0.3)})
    status, headers, _ = request(side.ports["out"], path="/slow")
    upstream.release.set()
    assert (status, headers["x-mesh-error"]) == (504, "timeout")
    (record,) = records(side, headers["x-request-id"])
    assert record["timeouts"] == {"request_ms": 300.0, "stream_idle_ms": 300000.0, "per_try_ms": None, "fired": "request"}
    (only,) = record["tries"]
    assert only["outcome"] == "timeout" and only["retry_reason"] == "the request timeout fired: no time left for a retry"
    story = explain.tell(explain.stitch(record["request_id"], [record]))
    assert "The request timeout (300 ms) fired." in story


def test_a_header_rule_that_matches_and_one_that_misses(sidecars, upstream):
    routes = [{"match": {"headers": {"x-user": {"exact": "alice"}}}, "split": {"v2": 100}}]
    side = outbound(sidecars, {"svc": service([("v1", upstream.address), ("v2", upstream.address)], routes=routes)})
    assert request(side.ports["out"], headers={**DEBUG, "x-user": "alice"})[0] == 200
    assert request(side.ports["out"], headers={**DEBUG, "x-user": "bob"})[0] == 200
    kept = wait_for(lambda: len(records(side)) >= 2 and records(side), what="two debug records")
    alice, bob = kept[-2:]
    assert alice["route"]["rule"] == 0 and alice["version"] == "v2" and alice["route"]["misses"] == []
    assert alice["route"]["text"] == {"match": {"headers": {"x-user": {"exact": "alice"}}}, "split": {"v2": 100}}
    assert alice["route"]["source"] == "manifest" and alice["route"]["conditions"] == ["header x-user exact alice"]
    assert bob["route"]["rule"] == -1 and bob["version"] == "v1"
    assert bob["route"]["misses"] == [{"rule": 0, "condition": "header x-user exact alice"}]
    assert "rule 0 did not match (header x-user exact alice)" in explain.tell(explain.stitch(bob["request_id"], [bob]))


def test_an_ejected_endpoint_is_skipped(sidecars, upstream):
    dead = ["127.0.0.1", refused_port()]
    outlier = {"consecutive_errors": 1, "base_ejection_time": 60, "max_ejection_percent": 100}
    side = outbound(sidecars, {"svc": service([("v1", dead), ("v1", upstream.address), ("v1", upstream.address)],
                                              outlier_detection=outlier)})
    # Round robin: one of them hits the dead one, whose failed connect is retried on another
    # endpoint (the default connect retries) and ejects it.
    statuses = [request(side.ports["out"])[0] for _ in range(3)]
    assert statuses == [200, 200, 200]
    assert request(side.ports["out"], headers=DEBUG)[0] == 200
    record = records(side)[-1]  # the debug request, kept last
    assert record["status"] == 200
    balancer = record["balancer"]
    assert balancer["algorithm"] == "round_robin"
    assert balancer["considered"] == ["svc@v1#0", "svc@v1#1", "svc@v1#2"]
    assert balancer["skipped"] == [{"endpoint": "svc@v1#0", "reason": "ejected"}]
    assert "skipped svc@v1#0 (ejected)" in explain.tell(explain.stitch(record["request_id"], [record]))


def test_nothing_is_kept_for_a_plain_success_and_everything_with_why_all(sidecars, upstream):
    side = outbound(sidecars, {"svc": service([("v1", upstream.address)])})
    assert request(side.ports["out"])[0] == 200
    assert records(side) == []
    side.send(side.config(why={"mode": "all", "ring": 3}))
    for _ in range(5):
        assert request(side.ports["out"])[0] == 200
    kept = records(side)
    assert len(kept) == 3 and all(r["status"] == 200 for r in kept)  # the ring keeps the newest 3


def test_plan_routes_a_request_not_sent_with_the_live_state(sidecars, upstream):
    routes = [{"match": {"headers": {"x-user": {"exact": "alice"}}}, "split": {"v2": 100}}]
    retries = {"attempts": 2, "retry_on": ["gateway-error"], "per_try_timeout": 0.5}
    live = {"rules": 1, "split": False}  # the agent marks rules set by `meshctl route set`
    side = outbound(sidecars, {"svc": service([("v1", upstream.address), ("v2", upstream.address)], routes=routes, retries=retries,
                                              live=live)})
    answer = ask(side, {"type": "why-plan?", "id": 9, "to": "svc", "method": "POST", "path": "/x", "headers": {"X-User": "alice"}})
    plan = answer["plan"]
    assert plan["route"]["rule"] == 0 and plan["route"]["source"] == "override" and list(plan["versions"]) == ["v2"]
    assert plan["versions"]["v2"] == [{"endpoint": "svc@v2#1", "ejected": False, "ejected_for_s": None, "in_flight": 0}]
    assert plan["timeouts"]["per_try_ms"] == 500.0 and plan["retries"]["method_retried"] is False
