"""mTLS and authorization on real sidecar processes, with independent TLS peers.

A peer is refused, in both directions, with no certificate, a certificate from another CA,
an expired certificate, or the wrong SPIFFE identity. Rotations under continuous load
lose nothing. Policies are checked with real requests.
"""

from __future__ import annotations

import http.client
import subprocess

import pytest

from meshctl.agent.ca import spiffe_id
from tests.proxy_harness import Sidecar, Upstream, service, wait_for
from tests.tlspeers import (
    TRUST_DOMAIN,
    HttpsUpstream,
    client_context,
    expired_leaf,
    make_ca,
    plain_get,
    tls_block,
    tls_get,
)
from tests.traffic import ContinuousLoad


@pytest.fixture
def foreign_ca(tmp_path):
    return make_ca(tmp_path / "foreign", mesh="other")


@pytest.fixture
def app(cleanup):
    upstream = Upstream()
    cleanup(upstream)
    return upstream


def inbound(cleanup, app, ca, mode="strict", authz=None) -> Sidecar:
    sidecar = Sidecar([{"name": "inbound", "kind": "inbound", "app": app.address}])
    cleanup(sidecar)
    return sidecar.start(tls=tls_block(ca, "svc", mode), authz=authz, trust_domain=TRUST_DOMAIN)


def outbound(cleanup, ca, target: list, caller: str = "front", expect: str = "svc") -> Sidecar:
    block = service([("v1", target)], tls={"identity": spiffe_id(TRUST_DOMAIN, expect)})
    sidecar = Sidecar([{"name": "out", "kind": "outbound", "service": "svc"}], {"svc": block})
    cleanup(sidecar)
    return sidecar.start(tls=tls_block(ca, caller), trust_domain=TRUST_DOMAIN)


def get(port: int, path: str = "/") -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def test_sidecars_talk_mtls_and_the_server_learns_the_caller(cleanup, app, ca):
    inner = inbound(cleanup, app, ca, authz={"default": "deny", "allow": [{"from": ["front"]}], "deny": []})
    outer = outbound(cleanup, ca, inner.endpoint())
    status, _, _ = get(outer.ports["out"])
    assert status == 200  # only possible if the inner sidecar saw identity .../service/front
    other = outbound(cleanup, ca, inner.endpoint(), caller="intruder")
    status, headers, body = get(other.ports["out"])
    assert status == 403 and headers["x-mesh-error"] == "forbidden"
    assert b"spiffe://t.local/service/intruder" in body


# -- refusals at the inbound side, with Python's ssl as the outside peer ------------------


def test_inbound_strict_refuses_plaintext(cleanup, app, ca):
    inner = inbound(cleanup, app, ca)
    assert plain_get(inner.ports["inbound"]) is None


def test_inbound_refuses_a_peer_without_certificate(cleanup, app, ca):
    inner = inbound(cleanup, app, ca)
    assert tls_get(inner.ports["inbound"], client_context(ca.bundle_pem)) is None


def test_inbound_refuses_a_certificate_from_another_ca(cleanup, app, ca, foreign_ca):
    inner = inbound(cleanup, app, ca)
    leaf = foreign_ca.issue(spiffe_id(TRUST_DOMAIN, "front"), 3600)
    ctx = client_context(ca.bundle_pem, leaf.chain_pem, leaf.key_pem)
    assert tls_get(inner.ports["inbound"], ctx) is None


def test_inbound_refuses_an_expired_certificate(cleanup, app, ca):
    inner = inbound(cleanup, app, ca)
    cert, key = expired_leaf(ca, spiffe_id(TRUST_DOMAIN, "front"))
    assert tls_get(inner.ports["inbound"], client_context(ca.bundle_pem, cert, key)) is None


def test_inbound_refuses_an_identity_outside_the_trust_domain(cleanup, app, ca):
    inner = inbound(cleanup, app, ca)
    leaf = ca.issue("spiffe://elsewhere.example/service/front", 3600)
    assert tls_get(inner.ports["inbound"], client_context(ca.bundle_pem, leaf.chain_pem, leaf.key_pem)) is None


def test_inbound_accepts_a_valid_peer(cleanup, app, ca):
    inner = inbound(cleanup, app, ca)
    leaf = ca.issue(spiffe_id(TRUST_DOMAIN, "front"), 3600)
    assert tls_get(inner.ports["inbound"], client_context(ca.bundle_pem, leaf.chain_pem, leaf.key_pem)) == 200


def test_permissive_accepts_plaintext_and_mtls(cleanup, app, ca):
    inner = inbound(cleanup, app, ca, mode="permissive")
    assert plain_get(inner.ports["inbound"]) == 200
    leaf = ca.issue(spiffe_id(TRUST_DOMAIN, "front"), 3600)
    assert tls_get(inner.ports["inbound"], client_context(ca.bundle_pem, leaf.chain_pem, leaf.key_pem)) == 200
    outer = outbound(cleanup, ca, inner.endpoint())
    assert get(outer.ports["out"])[0] == 200


def test_openssl_s_client_is_refused_without_a_certificate_and_verifies_ours(cleanup, app, ca, tmp_path):
    inner = inbound(cleanup, app, ca)
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(ca.bundle_pem)
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"127.0.0.1:{inner.ports['inbound']}", "-CAfile", str(bundle),
         "-tls1_3", "-ign_eof"],
        input=b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", capture_output=True, timeout=30,
    )
    out = result.stdout + result.stderr
    assert b"Verify return code: 0 (ok)" in out  # the server's chain verifies against our bundle
    assert b"HTTP/1.1 200" not in out  # but without a client certificate no request gets through


# -- refusals at the outbound side: the upstream presents the wrong thing -----------------


@pytest.mark.parametrize("presented", ["plaintext", "foreign-ca", "expired", "wrong-identity"])
def test_outbound_refuses_a_bad_upstream(cleanup, ca, foreign_ca, presented):
    if presented == "plaintext":
        upstream = HttpsUpstream(None, None)
    elif presented == "foreign-ca":
        leaf = foreign_ca.issue(spiffe_id(TRUST_DOMAIN, "svc"), 3600)
        upstream = HttpsUpstream(leaf.chain_pem, leaf.key_pem)
    elif presented == "expired":
        upstream = HttpsUpstream(*expired_leaf(ca, spiffe_id(TRUST_DOMAIN, "svc")))
    else:
        leaf = ca.issue(spiffe_id(TRUST_DOMAIN, "payments"), 3600)
        upstream = HttpsUpstream(leaf.chain_pem, leaf.key_pem)
    cleanup(upstream)
    outer = outbound(cleanup, ca, upstream.address)
    status, headers, body = get(outer.ports["out"])
    assert status == 502 and headers["x-mesh-error"] == "upstream-connect-failed", body
    if presented == "wrong-identity":
        assert b"spiffe://t.local/service/payments, expected spiffe://t.local/service/svc" in body


def test_outbound_accepts_the_right_upstream_identity(cleanup, ca):
    leaf = ca.issue(spiffe_id(TRUST_DOMAIN, "svc"), 3600)
    upstream = HttpsUpstream(leaf.chain_pem, leaf.key_pem)
    cleanup(upstream)
    outer = outbound(cleanup, ca, upstream.address)
    assert get(outer.ports["out"])[0] == 200


# -- authorization, a table of policies checked with real requests ------------------------

POLICIES = [
    # (authz, caller, method, path, expected status)
    (None, "front", "GET", "/any", 200),
    ({"default": "deny", "allow": None, "deny": []}, "front", "GET", "/any", 403),
    ({"default": "allow", "allow": [], "deny": []}, "front", "GET", "/any", 403),  # empty allow: nobody
    ({"default": "deny", "allow": [{"from": ["front"], "paths": ["/ok/*"]}], "deny": []}, "front", "GET", "/ok/1", 200),
    ({"default": "deny", "allow": [{"from": ["front"], "paths": ["/ok/*"]}], "deny": []}, "front", "GET", "/no", 403),
    ({"default": "deny", "allow": [{"from": ["front"], "paths": ["/ok/*"]}], "deny": []}, "cart", "GET", "/ok/1", 403),
    ({"default": "allow", "allow": None, "deny": [{"from": ["*"], "paths": ["/admin/*"]}]}, "front", "GET", "/admin/x", 403),
    ({"default": "allow", "allow": None, "deny": [{"from": ["*"], "paths": ["/admin/*"]}]}, "front", "GET", "/shop", 200),
    ({"default": "allow", "allow": [{"from": ["f*"], "methods": ["GET"]}], "deny": []}, "front", "GET", "/x", 200),
    ({"default": "allow", "allow": [{"from": ["f*"], "methods": ["POST"]}], "deny": []}, "front", "GET", "/x", 403),
    # deny wins over allow
    ({"default": "allow", "allow": [{"from": ["front"]}], "deny": [{"from": ["front"], "paths": ["/x"]}]}, "front", "GET", "/x", 403),
]


@pytest.mark.parametrize("authz,caller,method,path,expected", POLICIES)
def test_policy_table(cleanup, app, ca, authz, caller, method, path, expected):
    inner = inbound(cleanup, app, ca, authz=authz)
    outer = outbound(cleanup, ca, inner.endpoint(), caller=caller)
    conn = http.client.HTTPConnection("127.0.0.1", outer.ports["out"], timeout=10)
    conn.request(method, path)
    resp = conn.getresponse()
    resp.read()
    conn.close()
    assert resp.status == expected
    if expected == 403:
        assert resp.getheader("x-mesh-error") == "forbidden"


# -- rotation under continuous load -----------------------------------------------------


def test_leaf_and_ca_rotation_under_load_lose_nothing(cleanup, app, ca):
    inner = inbound(cleanup, app, ca)
    outer = outbound(cleanup, ca, inner.endpoint())
    load = ContinuousLoad(outer.ports["out"], "/load")

    def push_to_both(make_block) -> None:
        for sidecar, name in ((inner, "svc"), (outer, "front")):
            assert sidecar.send(sidecar.config(tls=make_block(name), trust_domain=TRUST_DOMAIN))["type"] == "ack"
        mark = load.sent  # traffic must flow on what was just pushed, whatever the machine's speed
        wait_for(lambda: load.sent >= mark + 10, what="requests after the push")

    try:
        for _ in range(5):  # leaf rotations
            push_to_both(lambda name: tls_block(ca, name))
        # CA rotation in its three phases, each ACKed by both sidecars before the next.
        ca.stage_new_root()
        push_to_both(lambda name: tls_block(ca, name))
        ca.commit()
        push_to_both(lambda name: tls_block(ca, name))
        ca.finish()
        push_to_both(lambda name: tls_block(ca, name))
    finally:
        load.stop()
    assert load.failed == 0, load.errors[:5]
