"""`meshctl why` for HTTP/2 and gRPC streams and TCP relays: decision records from real sidecars, stitched across hops.

An ingress sidecar in front of a service's sidecar, mTLS between them, real clients
(grpcio, the h2 library); the records are asked for over the config channel as the agent
does (`why?`) and told as `meshctl why` tells them (meshctl/explain.py).
"""

from __future__ import annotations

import contextlib
import socket

import grpc
import pytest

from meshctl import explain
from meshctl.agent.ca import spiffe_id
from meshctl.proxy.stream_decisions import keep_stream
from meshctl.proxy.h2streams import StreamRecord, UpstreamChoice
from tests.proxy_harness import Sidecar, Upstream, refused_port, service, wait_for
from tests.test_ingress_h2 import GRPC_ROUTE, grpc_request, h2_call, plain_channel
from tests.test_protocols_mesh import GrpcServer, load_recommend
from tests.test_why_sidecar import records
from tests.tlspeers import TRUST_DOMAIN, tls_block

DEADLINE_S = 10.0
ENDPOINT = "svc@v1#0"  # the endpoint id tests/proxy_harness.service() gives, and the service sidecar's instance
GRPC_RETRIES = {"attempts": 2, "per_try_timeout": None, "retry_on": ["connect-failure"], "backoff": 0.01, "max_backoff": 0.05,
                "non_idempotent": False, "budget": {"ratio": 1.0, "min_per_second": 100.0}}


@pytest.fixture
def recommend(cleanup):
    server, port = load_recommend().build_server(0)
    cleanup(GrpcServer(server, port))
    return port


def two_hops(cleanup, ca, name: str, app: list, protocol: str, authz=None, prefix: str = "/", **policy) -> tuple[Sidecar, Sidecar]:
    """(the ingress routing `prefix` to `name`, the sidecar of `name` in front of `app`), mTLS between them."""
    inner = Sidecar([{"name": "inbound", "kind": "inbound", "app": app, "protocol": protocol}])
    cleanup(inner)
    inner.start(tls=tls_block(ca, name), trust_domain=TRUST_DOMAIN, authz=authz, service=name, instance=ENDPOINT)
    block = service([("v1", inner.endpoint())], protocol=protocol, tls={"identity": spiffe_id(TRUST_DOMAIN, name)}, **policy)
    front = Sidecar([{"name": "ingress", "kind": "ingress", "routes": [{"path": prefix, "service": name}]}], {name: block})
    cleanup(front)
    front.start(tls=tls_block(ca, "ingress"), trust_domain=TRUST_DOMAIN, service="None", instance="ingress")
    return front, inner


def story_of(request_id: str, *sidecars: Sidecar, hops: int) -> dict:
    """The stitched story once every hop's record is in."""
    found: list[dict] = []

    def gathered():
        found[:] = [record for side in sidecars for record in records(side, request_id)]
        return len(found) == hops and found
    try:
        return explain.stitch(request_id, wait_for(gathered, what="%d records of %s" % (hops, request_id)))
    except AssertionError as exc:
        raise AssertionError("%s; found %r, and recently %r" % (
            exc, found, [record for side in sidecars for record in records(side)])) from None


def test_a_grpc_call_refused_by_authz_is_explained_with_the_rule(cleanup, ca, recommend):
    deny = {"default": "allow", "allow": None, "deny": [{"from": ["ingress"], "paths": [GRPC_ROUTE + "Stream"]}]}
    front, inner = two_hops(cleanup, ca, "recommend", ["127.0.0.1", recommend], "grpc", authz=deny)
    channel = plain_channel(cleanup, front.ports["ingress"])
    assert channel.method("ForItem")(b"a", timeout=DEADLINE_S) == b"a-a,a-b,a-c"
    with pytest.raises(grpc.RpcError) as info:
        list(channel.method("Stream", "unary_stream")(b"3", timeout=DEADLINE_S, metadata=[("x-request-id", "grpc-deny-1")]))
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    story = story_of("grpc-deny-1", front, inner, hops=2)
    first, refused = story["hops"]
    assert (first["sidecar"], first["direction"], first["protocol"], first["service"]) == ("ingress", "ingress", "grpc", "recommend")
    assert (first["status"], first["grpc_name"], first["by"]) == (403, "PERMISSION_DENIED", "app")
    (only,) = first["tries"]
    assert (only["endpoint"], only["outcome"], only["grpc_name"]) == (ENDPOINT, "response", "PERMISSION_DENIED")
    assert only["retry_reason"] == "no retries configured for this route"
    assert first["route"]["rule"] == -1 and first["route"]["version"] == "v1" and first["mtls"] is True
    assert (refused["sidecar"], refused["direction"], refused["protocol"]) == (ENDPOINT, "inbound", "grpc")
    assert refused["authz"] == {"decision": "deny", "rule": "deny[0]"}
    assert (refused["error"], refused["by"], refused["grpc_name"], refused["tries"]) == ("forbidden", "mesh", "PERMISSION_DENIED", [])
    assert refused["peer_identity"] == spiffe_id(TRUST_DOMAIN, "ingress") and refused["mtls"] is True
    text = explain.tell(story)
    assert "Authorization: DENY (decided by deny[0])" in text
    assert "answered grpc-status PERMISSION_DENIED (HTTP 403)" in text
    assert "It went wrong at hop 2, svc@v1#0 (inbound): x-mesh-error forbidden." in text
    assert records(front, "grpc-ok") == []  # the successful call left no record (observability.why: errors)
    debug = [("x-request-id", "grpc-debug-1"), ("x-mesh-debug", "1")]
    assert channel.method("ForItem")(b"b", timeout=DEADLINE_S, metadata=debug) == b"b-a,b-b,b-c"
    story = story_of("grpc-debug-1", front, inner, hops=2)  # asked for: a record at every hop although it succeeded
    assert [(hop["sidecar"], hop["grpc_name"], hop["by"]) for hop in story["hops"]] == [("ingress", "OK", "app"), (ENDPOINT, "OK", "app")]

    # grpc-timeout 200m from a client that does not cancel on its own: the ingress's deadline fires, nothing races it.
    response, _, trailers = h2_call(front.ports["ingress"], grpc_request(GRPC_ROUTE + "Slow", "200m") + [("x-request-id", "grpc-slow-1")],
                                    b"\x00\x00\x00\x00\x00")
    assert {**response, **trailers}["grpc-status"] == "4"
    (cut,) = wait_for(lambda: records(front, "grpc-slow-1"), what="the ingress's record of the slow call")
    assert (cut["error"], cut["by"], cut["grpc_name"]) == ("timeout", "mesh", "DEADLINE_EXCEEDED")
    timeouts = cut["timeouts"]
    assert (timeouts["fired"], timeouts["deadline_ms"], timeouts["request_ms"]) == ("deadline", 200.0, None)
    (only,) = cut["tries"]
    assert (only["endpoint"], only["outcome"]) == (ENDPOINT, "timeout")
    assert only["retry_reason"] == "the deadline passed: no time left for a retry"
    text = explain.tell(explain.stitch("grpc-slow-1", [cut]))
    assert "svc@v1#0 did not answer within the caller's grpc-timeout (" in text and "The caller's deadline (grpc-timeout " in text


def test_a_grpc_route_not_found_and_a_retried_app_status_are_explained(cleanup, ca, recommend):
    front, inner = two_hops(cleanup, ca, "recommend", ["127.0.0.1", recommend], "grpc", prefix=GRPC_ROUTE, retries=GRPC_RETRIES)
    channel = plain_channel(cleanup, front.ports["ingress"])
    with pytest.raises(grpc.RpcError) as info:
        channel.method("Fail")(b"", timeout=DEADLINE_S, metadata=[("x-request-id", "grpc-fail-1")])
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    story = story_of("grpc-fail-1", front, inner, hops=3)  # the ingress, and the service's sidecar once per try
    assert [(hop["sidecar"], hop["direction"]) for hop in story["hops"]] == [
        ("ingress", "ingress"), (ENDPOINT, "inbound"), (ENDPOINT, "inbound")]
    first = story["hops"][0]
    retried, last = first["tries"]
    assert (retried["grpc_name"], retried["retried"]) == ("UNAVAILABLE", True)
    assert retried["retry_reason"] == "trailers-only grpc-status UNAVAILABLE (retriable)" and retried["backoff_ms"] == 10.0
    assert (last["endpoint"], last["grpc_name"], last["retried"], last["retry_reason"]) == (ENDPOINT, "UNAVAILABLE", False, "attempts used")
    assert (first["status"], first["by"], first["error"]) == (503, "app", None)
    for answered in story["hops"][1:]:
        assert (answered["by"], answered["grpc_name"], answered["tries"][0]["endpoint"]) == ("app", "UNAVAILABLE", "app")
    text = explain.tell(story)
    assert "the retry (trailers-only grpc-status UNAVAILABLE (retriable)) went to svc@v1#0 after a 10 ms backoff" in text
    assert "not retried: attempts used" in text

    with pytest.raises(grpc.RpcError) as info:
        channel.method("ForItem", service_name="nowhere.Service")(b"", timeout=DEADLINE_S)
    assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
    request_id = dict(info.value.trailing_metadata())["x-request-id"]  # the ingress gave the call an id, and says it
    (record,) = wait_for(lambda: records(front, request_id), what="the ingress's record")
    assert (record["error"], record["by"], record["grpc_name"], record["tries"]) == ("route-not-found", "mesh", "UNIMPLEMENTED", [])
    assert record["path"] == "/nowhere.Service/ForItem" and record["protocol"] == "grpc"
    rows = explain.summaries(records(front) + records(inner))
    assert [row["request_id"] for row in rows if row["failed"]][:2] == [request_id, "grpc-fail-1"]


def test_an_http2_request_to_an_http1_app_answering_503_is_explained_across_hops(cleanup, ca):
    app = Upstream("web")
    cleanup(app)
    app.fail_status = 503
    front, inner = two_hops(cleanup, ca, "web", list(app.address), "http")
    headers = [(":method", "GET"), (":scheme", "http"), (":authority", "shop"), (":path", "/cart?id=7")]
    response, _, _ = h2_call(front.ports["ingress"], headers)
    assert response[":status"] == "503"
    story = story_of(response["x-request-id"], front, inner, hops=2)
    assert [(hop["sidecar"], hop["direction"], hop["protocol"]) for hop in story["hops"]] == [
        ("ingress", "ingress", "http2"), (ENDPOINT, "inbound", "http2")]
    first, last = story["hops"]
    assert (first["status"], first["by"], first["path"], first["method"]) == (503, "app", "/cart", "GET")
    (only,) = first["tries"]
    assert (only["endpoint"], only["status"], only["outcome"]) == (ENDPOINT, 503, "response")
    assert only["retry_reason"] == "HTTP/2 streams are retried only for trailers-only gRPC answers"
    assert first["timeouts"]["stream_idle_ms"] == 300000.0 and first["timeouts"]["fired"] is None
    assert first["balancer"]["considered"] == [ENDPOINT] and first["balancer"]["picked"] == [ENDPOINT]
    assert (last["status"], last["by"], last["tries"][0]["endpoint"]) == (503, "app", "app")
    assert last["authz"] is None and last["peer_identity"] == spiffe_id(TRUST_DOMAIN, "ingress")
    text = explain.tell(story)
    assert text.index("1. ingress (ingress)") < text.index("2. svc@v1#0 (inbound)")
    assert "It went wrong at hop 2, svc@v1#0 (inbound): status 503 from the app." in text


def test_which_streams_are_kept():
    def stream(*extra: tuple[bytes, bytes]) -> StreamRecord:
        return StreamRecord(1, [(b":method", b"GET"), (b":path", b"/"), *extra], UpstreamChoice("127.0.0.1", 1), 0.0)

    assert not keep_stream(stream(), 200, None, keep_all=False)
    assert not keep_stream(stream(), 200, 0, keep_all=False)  # grpc-status OK
    assert keep_stream(stream(), 200, None, keep_all=True)
    assert keep_stream(stream(), 503, None, keep_all=False)
    assert keep_stream(stream(), 404, 5, keep_all=False)  # a non-OK grpc-status, whatever its HTTP equivalent
    assert not keep_stream(stream(), 499, 1, keep_all=False)  # CANCELLED by the client leaving: nothing went wrong in the mesh
    assert keep_stream(stream((b"x-mesh-debug", b"1")), 200, None, keep_all=False)
    assert not keep_stream(stream((b"x-mesh-debug", b"0")), 200, None, keep_all=False)
    cut = stream()
    cut.cut = "stream-idle-timeout"
    assert keep_stream(cut, 200, None, keep_all=False)


def test_a_tcp_relay_whose_connects_fail_gets_a_record_with_an_id_of_its_own(cleanup):
    app = Upstream("tcp")  # any listener: the relay only has to connect
    cleanup(app)
    dead = ["127.0.0.1", refused_port()]
    for endpoints, connected in (([("v1", dead), ("v1", ["127.0.0.1", refused_port()])], False), ([("v1", dead), ("v1", app.address)], True)):
        side = Sidecar([{"name": "out", "kind": "outbound", "service": "svc", "protocol": "tcp"}],
                       {"svc": service(endpoints, protocol="tcp")})
        cleanup(side)
        side.start(instance="caller@v1#0", service="caller")
        # Round robin may start a relay on the live endpoint (nothing to explain): of two relays in a row, one starts on the dead one.
        with contextlib.ExitStack() as stack:
            for _ in range(2 if connected else 1):
                stack.enter_context(socket.create_connection(("127.0.0.1", side.ports["out"]), timeout=DEADLINE_S)).sendall(b"ping")
            record = wait_for(lambda: records(side), what="a relay's record")[0]
        assert (record["protocol"], record["direction"], record["service"], record["method"]) == ("tcp", "outbound", "svc", "TCP")
        assert record["request_id"]  # raw TCP carries no id: the sidecar gives the relay one
        first, last = record["tries"]
        assert (first["outcome"], first["retried"]) == ("connect-failure", True) and {first["endpoint"], last["endpoint"]} == {
            "svc@v1#0", "svc@v1#1"}
        assert first["retry_reason"] == "a failed connect is tried on another endpoint" and "refused" in first["error"].lower()
        text = explain.tell(explain.stitch(record["request_id"], [record]))
        if connected:
            assert (record["error"], last["outcome"], last["retry_reason"]) == (None, "connected", None)
            assert "went to svc@v1#1 and accepted the connection" in text and "answered" not in text
        else:
            assert (record["error"], last["outcome"], last["retry_reason"]) == ("upstream-connect-failed", "connect-failure",
                                                                                 "no other endpoint left to try")
            assert text.startswith("TCP connection %s to svc" % record["request_id"])
            assert "caller@v1#0 relayed a TCP connection to svc." in text and "not retried: no other endpoint left to try" in text
