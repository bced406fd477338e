"""Pure parts of `meshctl why`: stitching, the words, and the explain methods of the policy code."""

from __future__ import annotations

import random

import pytest

from meshctl import explain
from meshctl.agent.compile import SidecarIdentity, SidecarListeners, compile_sidecar
from meshctl.agent.errors import ManifestError
from meshctl.agent.manifest import parse_manifest
from meshctl.proxy.http1 import Parser
from meshctl.proxy.retry import RetryPolicy
from meshctl.proxy.routing import Router


def record(sidecar, direction, service, ts, tries=(), status=200, by="app", error=None, **extra):
    return {"request_id": "r1", "sidecar": sidecar, "direction": direction, "service": service, "ts": ts,
            "tries": [dict(t) for t in tries], "status": status, "by": by, "error": error, "method": "GET", "path": "/x",
            "duration_ms": 5.0, **extra}


def attempt(endpoint, status=200, outcome="response", **extra):
    base = {"endpoint": endpoint, "status": status, "outcome": outcome, "duration_ms": 12.0, "retried": False,
            "retry_reason": None, "backoff_ms": None, "error": None}
    return {**base, **extra}


THREE_HOPS = [
    record("ingress", "ingress", "front", 1.000, [attempt("front@v1#0")]),
    record("front@v1#0", "inbound", "front", 1.000, [attempt("app")]),  # same millisecond as the ingress
    record("front@v1#0", "outbound", "cart", 1.002, [
        attempt("cart@v2#0", None, "reset", retried=True, retry_reason="retry_on: reset", backoff_ms=31.0),
        attempt("cart@v1#1")]),
    record("cart@v2#0", "inbound", "cart", 1.003, [], status=0, by="mesh", error="client-lost"),
    record("cart@v1#1", "inbound", "cart", 1.001, [attempt("app")]),  # its clock says earlier: causality wins
]


def test_stitch_orders_hops_by_causality_whatever_the_input_order():
    shuffled = list(THREE_HOPS)
    random.Random(4).shuffle(shuffled)
    story = explain.stitch("r1", shuffled)
    assert [(hop["sidecar"], hop["direction"]) for hop in story["hops"]] == [
        ("ingress", "ingress"), ("front@v1#0", "inbound"), ("front@v1#0", "outbound"),
        ("cart@v2#0", "inbound"), ("cart@v1#1", "inbound"),
    ]
    assert story["status"] == 200 and story["request_id"] == "r1"
    assert set(story["hops"][2]) >= {"sidecar", "service", "direction", "route", "version", "tries", "authz", "timeout_ms", "error"}
    assert set(story["hops"][2]["tries"][0]) >= {"endpoint", "status", "error", "duration_ms", "retry_reason"}


def test_the_retry_sentence_reads_as_in_the_issue():
    tries = THREE_HOPS[2]["tries"]
    assert explain.tries_sentence(tries, None) == (
        "cart@v2#0 reset the connection after 12 ms; the retry (retry_on: reset) went to cart@v1#1 "
        "after a 31 ms backoff and got 200 after 12 ms.")


def test_a_try_not_retried_says_why_and_a_timeout_says_which():
    tries = [attempt("cart@v1#0", None, "timeout", retry_reason="the request timeout fired: no time left for a retry")]
    timeouts = {"request_ms": 300.0, "per_try_ms": None, "fired": "request"}
    sentence = explain.tries_sentence(tries, timeouts)
    assert sentence == ("cart@v1#0 did not answer within the request timeout (300 ms); "
                        "not retried: the request timeout fired: no time left for a retry.")


def test_failure_origin_is_the_deepest_failing_hop():
    hops = [record("ingress", "ingress", "front", 1.0, [attempt("front@v1#0", 403)], status=403),
            record("front@v1#0", "inbound", "front", 1.1, [], status=403, by="mesh", error="forbidden",
                   authz={"decision": "deny", "rule": "deny[0]"})]
    story = explain.stitch("r1", hops)
    text = explain.tell(story)
    assert "Authorization: DENY (decided by deny[0])." in text
    assert text.endswith("It went wrong at hop 2, front@v1#0 (inbound): x-mesh-error forbidden.")
    assert explain.failure_origin(explain.stitch("r1", THREE_HOPS[:2])) is None


def test_summaries_group_by_request_newest_first():
    other = record("ingress", "ingress", "pay", 9.0, [attempt("pay@v1#0", 503)], status=503)
    other["request_id"] = "r2"
    rows = explain.summaries(THREE_HOPS + [other])
    assert [row["request_id"] for row in rows] == ["r2", "r1"]
    assert rows[0]["failed_at"] == "ingress" and rows[0]["services"] == ["pay"]
    assert rows[1]["services"] == ["front", "cart"] and rows[1]["hops"] == 5
    assert rows[1]["status"] == 200 and rows[1]["failed"]  # a hop failed though the request succeeded


@pytest.mark.parametrize("wanted, status, matches", [
    ("5xx", 503, True), ("5xx", 200, False), ("503", 503, True), ("503", 502, False), (None, 200, True), ("4XX", 404, True),
])
def test_matches_status(wanted, status, matches):
    assert explain.matches_status(status, wanted) is matches


@pytest.mark.parametrize("text, valid", [("5xx", True), ("503", True), ("teapot", False), ("9xx", False), ("50", False)])
def test_valid_status_filter(text, valid):
    assert explain.valid_status_filter(text) is valid


def test_tell_plan_names_route_endpoints_authz_timeouts_and_retries():
    plan = {
        "from": "frontend", "service": "cart", "sidecar": "frontend@v1#0", "method": "POST", "path": "/cart",
        "route": {"rule": 0, "source": "override", "conditions": ["header x-user exact alice"], "misses": [],
                  "split": {"v2": 100}, "version": None},
        "versions": {"v2": [{"endpoint": "cart@v2#0", "ejected": True, "ejected_for_s": 28.5, "in_flight": 0}]},
        "not_ready": {"v2": [{"instance": "cart@v2#1", "state": "starting"}]},
        "algorithm": "least_request", "authz": {"decision": "allow", "rule": "allow[0]"},
        "timeouts": {"request_ms": None, "stream_idle_ms": 300000.0, "connect_ms": 1000.0, "per_try_ms": 500.0},
        "retries": {"attempts": 3, "retry_on": ["gateway-error"], "method_retried": False}, "fault": None, "mirror": None,
    }
    text = explain.tell_plan(plan)
    assert "rule 0 (from a live override: header x-user exact alice)" in text
    assert "cart@v2#0 ejected for 28.5s, cart@v2#1 starting" in text
    assert "Authorization: ALLOW (decided by allow[0])." in text
    assert "Timeouts: request none, stream idle 300 s, connect 1 s, per try 500 ms." in text
    assert "POST is not idempotent, so only a failed connect is retried" in text


def test_router_explain_names_the_first_failing_condition_of_each_earlier_rule():
    router = Router("cart", {
        "versions": ["v1", "v2"], "split": {"v1": 100},
        "routes": [
            {"match": {"method": "POST", "path": {"prefix": "/api"}}, "version": "v2"},
            {"match": {"headers": {"x-user": {"regex": "a.*"}}, "query": {"beta": "1"}}, "version": "v2"},
            {"match": {"path": {"exact": "/items"}}, "version": "v1"},
        ],
    })
    assert router.explain("GET", "/items", "", {"x-user": "alice"}) == (2, [(0, "method in POST"), (1, "query beta exact 1")])
    assert router.explain("POST", "/other", "", {}) == (-1, [(0, "path prefix /api"), (1, "header x-user regex a.*"),
                                                             (2, "path exact /items")])
    assert router.conditions(1) == ("header x-user regex a.*", "query beta exact 1")


@pytest.mark.parametrize("args, answer", [
    ((1, "GET", "reset", None, 0), (True, "retry_on: reset")),
    ((1, "GET", "response", 503, 0), (True, "retry_on: 503")),
    ((1, "GET", "response", 500, 0), (False, "status 500 is not in retry_on (503, connect-failure, gateway-error, reset)")),
    ((1, "POST", "reset", None, 0), (False, "POST is not idempotent (retries.non_idempotent is false)")),
    ((1, "POST", "refused", None, 0), (True, "retry_on: connect-failure")),
    ((3, "GET", "reset", None, 0), (False, "attempts used (3 of 3)")),
    ((1, "GET", "reset", None, None), (False, "the request body was streamed, not kept for a replay")),
    ((1, "GET", "reset", None, 70000), (False, "body too large to replay (70000 bytes, more than 64 KiB)")),
])
def test_retry_explain_agrees_with_should_retry(args, answer):
    policy = RetryPolicy.from_config({"attempts": 3, "retry_on": ["reset", "connect-failure", "gateway-error", 503]})
    assert policy.explain(*args) == answer
    assert policy.should_retry(*args) is answer[0]


@pytest.mark.parametrize("block, wanted", [
    (b"GET / HTTP/1.1\r\nhost: a\r\nx-mesh-debug: 1\r\n\r\n", True),
    (b"GET / HTTP/1.1\r\nhost: a\r\nX-Mesh-DEBUG:1 \r\n\r\n", True),
    (b"GET / HTTP/1.1\r\nhost: a\r\nx-mesh-debug: 0\r\n\r\n", False),
    (b"GET / HTTP/1.1\r\nhost: a\r\nx-debug: 1\r\n\r\n", False),
    (b"GET / HTTP/1.1\r\n\r\n", False),
])
def test_the_parser_sees_the_debug_header(block, wanted):
    parser = Parser(True, 65536, None)
    parser.feed(block)
    head = parser.next_event_whole()
    assert head.debug is wanted and not head.has_hop_by_hop


def _manifest(observability: str):
    return parse_manifest("mesh: shop\n%sservices:\n  back: {command: echo}\n" % observability, "mesh.yaml", base_dir="/srv")


def test_why_keys_reach_every_sidecar_snapshot():
    manifest = _manifest("observability: {why: all, why_records: 5000}\n")
    assert (manifest.observability.why, manifest.observability.why_records) == ("all", 5000)
    default = _manifest("")
    assert (default.observability.why, default.observability.why_records) == ("errors", 2000)
    snapshot = compile_sidecar(manifest, SidecarIdentity("back@v1#0", "back", "v1"), SidecarListeners(), [])
    assert snapshot["why"] == {"mode": "all", "ring": 5000}


@pytest.mark.parametrize("observability, expected", [
    ("observability: {why: some}\n", "observability.why"),
    ("observability: {why_records: 0}\n", "observability.why_records"),
])
def test_bad_why_keys_are_refused(observability, expected):
    with pytest.raises(ManifestError) as caught:
        _manifest(observability)
    assert expected in str(caught.value)
