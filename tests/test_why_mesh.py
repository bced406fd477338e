"""`meshctl why` end to end: a real mesh, the real CLI, records gathered from every sidecar.

The mesh: ingress -> front -> mid -> back, each an echo app that forwards x-request-id
on /call/, mTLS on, `observability.why: all` so that successful requests are kept too;
back denies /admin/*.
"""

from __future__ import annotations

import json

import pytest

from tests.meshharness import Mesh, free_port, http_get, wait_for
from tests.test_ingress_h2 import h2_call

MESH = """
mesh: why
observability: {{why: all, why_records: 500}}
services:
  back:
    health: {{http: /healthz}}
    authorization:
      deny: [{{paths: ["/admin/*"]}}]
    versions:
      v1: {{command: {PY} {APPS}/echo.py}}
  mid:
    health: {{http: /healthz}}
    upstreams: [back]
    versions:
      v1: {{command: {PY} {APPS}/echo.py}}
  front:
    health: {{http: /healthz}}
    upstreams: [mid]
    routes:
      - match: {{headers: {{x-user: alice}}}}
        version: v1
    timeout: 5s
    versions:
      v1: {{command: {PY} {APPS}/echo.py}}
ingress:
  port: {port}
  routes: [{{path: /, service: front}}]
"""


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    port = free_port()
    mesh = Mesh(tmp_path_factory.mktemp("why"))
    mesh.write_manifest(MESH.format(port=port, PY="{PY}", APPS="{APPS}"))
    try:
        mesh.up()
        mesh.url = "http://127.0.0.1:%d" % port  # type: ignore[attr-defined]
        yield mesh
    finally:
        mesh.cleanup()


def why(mesh: Mesh, *args: str) -> dict:
    result = mesh.cli("why", *args, "-o", "json", check=True)
    return json.loads(result.stdout)


def test_a_three_hop_request_is_stitched_in_order(mesh):
    status, headers, _ = http_get(mesh.url + "/call/mid/call/back/whoami")
    assert status == 200
    request_id = headers["x-request-id"]  # every response through the ingress carries it
    story = wait_for(lambda: len(why(mesh, request_id)["hops"]) == 6 and why(mesh, request_id), what="six hops on record")
    assert story["request_id"] == request_id and story["status"] == 200
    order = [(hop["sidecar"], hop["direction"], hop["service"]) for hop in story["hops"]]
    assert order == [
        ("ingress", "ingress", "front"),
        ("front@v1#0", "inbound", "front"),
        ("front@v1#0", "outbound", "mid"),
        ("mid@v1#0", "inbound", "mid"),
        ("mid@v1#0", "outbound", "back"),
        ("back@v1#0", "inbound", "back"),
    ]
    inbound_back = story["hops"][-1]
    assert inbound_back["peer_identity"] == "spiffe://why.local/service/mid" and inbound_back["mtls"] is True
    assert inbound_back["authz"] == {"decision": "allow", "rule": "default_policy"}
    assert story["hops"][0]["tries"][0]["endpoint"] == "front@v1#0"
    text = mesh.cli("why", request_id, check=True).stdout
    assert "1. ingress (ingress)" in text and "6. back@v1#0 (inbound)" in text
    assert "Authorization: ALLOW (decided by default_policy)" in text


def test_an_http2_request_is_stitched_with_the_http1_calls_it_caused(mesh):
    port = int(mesh.url.rsplit(":", 1)[1])
    headers = [(":method", "GET"), (":scheme", "http"), (":authority", "why"), (":path", "/call/mid/call/back/admin/h2")]
    response, _, _ = h2_call(port, headers)  # h2c prior knowledge to the ingress; the apps speak HTTP/1.1
    assert response[":status"] == "403"
    request_id = response["x-request-id"]
    story = wait_for(lambda: len(why(mesh, request_id)["hops"]) == 6 and why(mesh, request_id), what="six hops on record")
    assert [(hop["sidecar"], hop["direction"], hop["protocol"]) for hop in story["hops"]] == [
        ("ingress", "ingress", "http2"),
        ("front@v1#0", "inbound", "http2"),  # the ingress's stream, bridged to the app as HTTP/1.1
        ("front@v1#0", "outbound", "http/1.1"),
        ("mid@v1#0", "inbound", "http/1.1"),
        ("mid@v1#0", "outbound", "http/1.1"),
        ("back@v1#0", "inbound", "http/1.1"),
    ]
    assert story["hops"][0]["tries"][0]["endpoint"] == "front@v1#0" and story["hops"][-1]["authz"]["rule"] == "deny[0]"
    rows = json.loads(mesh.cli("why", "--recent", "--service", "front", "-o", "json", check=True).stdout)
    assert request_id in [row["request_id"] for row in rows]


def test_last_failure_explains_an_authz_deny_two_hops_down(mesh):
    status, headers, _ = http_get(mesh.url + "/call/mid/call/back/admin/users")
    assert status == 403
    story = wait_for(lambda: why(mesh, "--last-failure", "back"), what="the failure on record")
    assert story["request_id"] == headers["x-request-id"]
    denied = [hop for hop in story["hops"] if hop["sidecar"] == "back@v1#0"]
    assert denied[0]["authz"] == {"decision": "deny", "rule": "deny[0]"} and denied[0]["error"] == "forbidden"
    rows = json.loads(mesh.cli("why", "--recent", "--status", "4xx", "--service", "back", "-o", "json", check=True).stdout)
    assert rows[0]["request_id"] == story["request_id"] and rows[0]["failed_at"] == "back@v1#0"


def test_tap_and_unknown_ids_and_usage_errors(mesh):
    result = mesh.cli("why", "no-such-request")
    assert result.returncode == 1 and "no sidecar has a record of request no-such-request" in result.stderr
    result = mesh.cli("why", "--recent", "--status", "teapot")
    assert result.returncode == 2 and "expected a class such as 5xx" in result.stderr
    result = mesh.cli("why")
    assert result.returncode == 2 and "give one of REQUEST_ID" in result.stderr


def test_why_from_to_plans_a_request_not_sent(mesh):
    plan = why(mesh, "--from", "ingress", "--to", "front", "--path", "/x", "--header", "x-user=alice")
    assert plan["route"]["rule"] == 0 and plan["route"]["conditions"] == ["header x-user exact alice"]
    assert plan["route"]["text"]["match"] == {"headers": [{"name": "x-user", "kind": "exact", "value": "alice"}]}
    assert plan["versions"] == {"v1": [{"endpoint": "front@v1#0", "ejected": False, "ejected_for_s": None, "in_flight": 0}]}
    assert plan["timeouts"]["request_ms"] == 5000.0
    assert plan["authz"]["decision"] == "allow"
    missed = why(mesh, "--from", "ingress", "--to", "front", "--header", "x-user=bob")
    assert missed["route"]["rule"] == -1 and missed["route"]["misses"] == [{"rule": 0, "condition": "header x-user exact alice"}]
    denied = why(mesh, "--from", "mid", "--to", "back", "--path", "/admin/x")
    assert denied["authz"]["decision"] == "deny" and denied["authz"]["rule"] == "deny[0]"
    text = mesh.cli("why", "--from", "mid", "--to", "back", "--path", "/admin/x", check=True).stdout
    assert "Authorization: DENY (decided by deny[0])" in text and "back@v1#0 available" in text
    result = mesh.cli("why", "--from", "back", "--to", "front")
    assert result.returncode == 1 and "back does not call front" in result.stderr
