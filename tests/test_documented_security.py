"""Documented security behaviour of a whole mesh, through the CLI: `mtls: off` mesh-wide and
`mtls` per service, authorization rules on `headers` and `spiffe://` sources, `policy check
--method`, `certs import-ca` with a real intermediate and its chain, the CA kept across `up`
runs, and leaf renewal at two thirds of a one-minute lifetime under load."""

from __future__ import annotations

import datetime as dt
import json
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from meshctl.agent.identity import renewal_time
from tests.meshharness import free_port, http_get, wait_for
from tests.tlspeers import plain_get
from tests.traffic import ContinuousLoad

SMALL = """
mesh: plain
{mesh_keys}
services:
  back:
    command: {{PY}} {{APPS}}/echo.py
    health: {{http: /healthz}}
    {back_keys}
  side:
    command: {{PY}} {{APPS}}/echo.py
    health: {{http: /healthz}}
  front:
    command: {{PY}} {{APPS}}/echo.py
    upstreams: [back, side]
    health: {{http: /healthz}}
ingress:
  port: {port}
  routes: [{{path: /, service: front}}]
"""


def small_mesh(mesh, mesh_keys: str = "", back_keys: str = "") -> int:
    """front calling back and side; `mesh_keys` go next to `mesh:`, `back_keys` into back."""
    port = free_port()
    mesh.write_manifest(SMALL.format(mesh_keys=mesh_keys, back_keys=back_keys, port=port))
    mesh.up()
    return port


def edge(mesh, source: str, destination: str) -> dict:
    def found():
        edges = json.loads(mesh.cli("edges", "-o", "json", check=True).stdout)
        return next((e for e in edges if e["source"] == source and e["destination"] == destination), None)

    return wait_for(found, what=f"the edge {source} -> {destination}")


def test_mtls_off_mesh_wide_serves_plaintext_between_sidecars(mesh):
    port = small_mesh(mesh, mesh_keys="mtls: off")
    assert {i["mtls"] for i in mesh.status()["instances"]} == {"off"}
    assert plain_get(mesh.instance("back@v1#0")["inbound_port"], "/whoami") == 200
    assert http_get(f"http://127.0.0.1:{port}/call/back/whoami")[0] == 200
    assert edge(mesh, "front", "back")["mtls"] is False


def test_mtls_per_service_overrides_the_mesh(mesh):
    port = small_mesh(mesh, back_keys="mtls: permissive")
    assert mesh.instance("back@v1#0")["mtls"] == "permissive"
    assert mesh.instance("side@v1#0")["mtls"] == "strict"
    assert plain_get(mesh.instance("back@v1#0")["inbound_port"], "/whoami") == 200  # permissive: plaintext too
    assert plain_get(mesh.instance("side@v1#0")["inbound_port"], "/whoami") is None  # strict: refused
    for service in ("back", "side"):
        assert http_get(f"http://127.0.0.1:{port}/call/{service}/whoami")[0] == 200
        assert edge(mesh, "front", service)["mtls"] is True  # sidecars still prefer mTLS


def test_mtls_off_for_one_service_in_a_strict_mesh(mesh):
    port = small_mesh(mesh, back_keys="mtls: 'off'")
    assert mesh.instance("back@v1#0")["mtls"] == "off"
    assert plain_get(mesh.instance("back@v1#0")["inbound_port"], "/whoami") == 200
    assert plain_get(mesh.instance("side@v1#0")["inbound_port"], "/whoami") is None
    assert http_get(f"http://127.0.0.1:{port}/call/back/whoami")[0] == 200
    assert edge(mesh, "front", "back")["mtls"] is False


AUTHZ = """
mesh: authz
services:
  back:
    command: {PY} {APPS}/echo.py
    health: {{http: /healthz}}
    authorization:
      allow:
        - {{from: ["spiffe://authz.local/service/front"], methods: [GET], paths: [/whoami]}}
        - {{from: [front], headers: {{x-role: admin}}}}
  front:
    command: {PY} {APPS}/echo.py
    upstreams: [back]
    health: {{http: /healthz}}
    env: {{FORWARD_HEADERS: x-role}}
ingress:
  port: {port}
  routes: [{{path: /, service: front}}]
"""


def test_authorization_on_headers_and_spiffe_sources_and_policy_check_method(mesh):
    port = free_port()
    mesh.write_manifest(AUTHZ.format(port=port, PY="{PY}", APPS="{APPS}"))
    mesh.up()
    base = f"http://127.0.0.1:{port}/call/back"
    assert http_get(base + "/whoami")[0] == 200  # allow[0]: front by its SPIFFE ID
    status, _, body = http_get(base + "/status/200")
    assert status == 403 and b"forbidden" in body  # no rule matches this path without the header
    assert http_get(base + "/status/200", headers={"x-role": "guest"})[0] == 403
    assert http_get(base + "/status/200", headers={"x-role": "admin"})[0] == 200  # allow[1]: the header

    def check(*args: str):
        result = mesh.cli("policy", "check", *args)
        return result.returncode, result.stdout

    code, out = check("front", "back", "--path", "/whoami", "--method", "GET")
    assert code == 0 and "ALLOW" in out and "allow[0]" in out
    code, out = check("front", "back", "--path", "/whoami", "--method", "post")
    assert code == 1 and "DENY" in out and "POST" in out
    code, out = check("spiffe://authz.local/service/front", "back", "--path", "/whoami")
    assert code == 0 and "allow[0]" in out
    code, out = check("spiffe://authz.local/service/other", "back", "--path", "/whoami")
    assert code == 1 and "DENY" in out


# -- the CA ------------------------------------------------------------------------------------


def certs(mesh) -> dict:
    return json.loads(mesh.cli("certs", "-o", "json", check=True).stdout)


def test_the_ca_is_reused_across_up_runs(mesh):
    port = small_mesh(mesh)
    first = certs(mesh)["root"]["fingerprint"]
    key = (mesh.home / "ca" / "ca.key").read_bytes()
    mesh.cli("down", check=True)
    mesh.up()
    assert certs(mesh)["root"]["fingerprint"] == first
    assert (mesh.home / "ca" / "ca.key").read_bytes() == key
    assert http_get(f"http://127.0.0.1:{port}/call/back/whoami")[0] == 200


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test corp"), x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca_cert(subject: x509.Name, key, issuer: x509.Name, issuer_key, path_length: int | None) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
                          key_encipherment=False, data_encipherment=False, key_agreement=False,
                          encipher_only=False, decipher_only=False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


def corporate_intermediate(directory) -> tuple[x509.Certificate, x509.Certificate, object, object]:
    """A root and an intermediate it signed, written as cert.pem (intermediate, then root) and key.pem."""
    root_key, inter_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert(_name("Test Root"), root_key, _name("Test Root"), root_key, 1)
    inter = _ca_cert(_name("Mesh Intermediate"), inter_key, root.subject, root_key, 0)
    pem = serialization.Encoding.PEM
    (directory / "cert.pem").write_bytes(inter.public_bytes(pem) + root.public_bytes(pem))
    (directory / "key.pem").write_bytes(
        inter_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return root, inter, root_key, inter_key


def test_import_ca_with_a_real_intermediate_and_its_chain_under_load(mesh, tmp_path):
    port = small_mesh(mesh)
    root, inter, _, _ = corporate_intermediate(tmp_path)
    load = ContinuousLoad(port, "/call/back/whoami", reconnect_every=1)
    try:
        result = mesh.cli("certs", "import-ca", str(tmp_path / "cert.pem"), str(tmp_path / "key.pem"))
        assert result.returncode == 0, result.stdout + result.stderr
        sent = load.sent
        wait_for(lambda: load.sent >= sent + 30, what="traffic under the imported intermediate")
    finally:
        load.stop()
    assert load.failed == 0, load.errors[:5]
    doc = certs(mesh)
    assert doc["root"]["subject"] == inter.subject.rfc4514_string() and doc["root"]["imported"] is True
    # Each sidecar presents its leaf, then the intermediate and the root: verifiable from the root.
    config = json.loads(mesh.cli("proxy-config", "back@v1#0", "-o", "json", check=True).stdout)
    chain = x509.load_pem_x509_certificates(config["config"]["tls"]["cert_pem"].encode())
    assert [c.subject for c in chain[1:]] == [inter.subject, root.subject]
    leaf = chain[0]
    leaf.verify_directly_issued_by(inter)
    inter.verify_directly_issued_by(root)


def test_leaves_renew_at_two_thirds_of_a_one_minute_lifetime_under_load(mesh):
    port = small_mesh(mesh, mesh_keys="certificates: {leaf_lifetime: 1m}")
    before = {c["owner"]: (c["serial"], c["not_after"]) for c in certs(mesh)["certificates"]}
    renewed_at: dict[str, float] = {}
    load = ContinuousLoad(port, "/call/back/whoami", reconnect_every=1)
    try:
        def all_renewed():
            now = time.time()
            for c in certs(mesh)["certificates"]:
                if c["owner"] in before and c["serial"] != before[c["owner"]][0]:
                    renewed_at.setdefault(c["owner"], now)
            return set(renewed_at) == set(before)

        wait_for(all_renewed, timeout=75, interval=0.5, what="every leaf renewed")
        sent = load.sent
        wait_for(lambda: load.sent >= sent + 30, what="traffic on the renewed leaves")
    finally:
        load.stop()
    assert load.failed == 0, load.errors[:5]
    for owner, (_, not_after) in before.items():
        left = not_after - renewed_at[owner]
        # Renewed with a third of the life (20 s) left, seen within the polling period; never after expiry.
        assert 0 < left <= 20 + 5, (owner, left)
    assert load.sent > 100


def test_renewal_time_is_two_thirds_of_the_life_from_issue_not_from_the_backdated_not_before(ca):
    issued = time.time()
    leaf = ca.issue("spiffe://t.local/service/x", 60)
    assert leaf.not_before < issued - 30  # backdated for skewed clocks
    assert abs(renewal_time(leaf) - (issued + 40)) < 2
