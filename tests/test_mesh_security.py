"""Security of a whole mesh, through the CLI: permissions, secrets, rotation, policies."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import urllib.request

from tests.meshharness import free_port, http_get, wait_for
from tests.tlspeers import plain_get, user_certificate
from tests.traffic import ContinuousLoad

SECURE = """
mesh: secure
default_policy: allow
certificates: {{leaf_lifetime: 1h}}
services:
  back:
    command: {PY} {APPS}/echo.py
    health: {{http: /healthz}}
    replicas: 2
    authorization:
      deny: [{{from: ["*"], paths: [/admin/*]}}]
      allow: [{{from: [front], methods: [GET]}}]
  front:
    command: {PY} {APPS}/echo.py
    upstreams: [back]
    health: {{http: /healthz}}
ingress:
  port: {port}
  routes: [{{path: /, service: front}}]
"""


def secure_mesh(mesh, port):
    mesh.write_manifest(SECURE.format(port=port, PY="{PY}", APPS="{APPS}"))
    mesh.up()


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_state_files_are_private_and_nothing_secret_is_shown(mesh):
    port = free_port()
    secure_mesh(mesh, port)
    home = mesh.home
    assert mode(home) == 0o700
    assert mode(home / "agent.sock") == 0o600
    assert mode(home / "ca") == 0o700
    assert mode(home / "ca" / "ca.key") == 0o600
    assert mode(home / "agent.pid") == 0o600
    for log in (home / "logs").iterdir():
        assert mode(log) == 0o600
    assert {i["mtls"] for i in mesh.status()["instances"]} == {"strict"}
    outputs = [
        mesh.cli("status", "-o", "json", check=True).stdout,
        mesh.cli("certs", "-o", "json", check=True).stdout,
        mesh.cli("proxy-config", "back@v1#0", "-o", "json", check=True).stdout,
        mesh.cli("proxy-config", "front@v1#0", check=True).stdout,
        mesh.cli("logs", "--tail", "1000", check=True).stdout,
        (home / "agent.log").read_text(),
        *(p.read_text() for p in (home / "logs").iterdir()),
    ]
    for text in outputs:
        assert "PRIVATE KEY" not in text
    # An app gets its upstream URLs, never key material nor the way to the agent.
    app_pid = mesh.instance("front@v1#0")["pid"]
    with open(f"/proc/{app_pid}/environ", "rb") as fh:
        environ = fh.read().decode("utf-8", "replace")
    assert "PRIVATE KEY" not in environ and "MESHCTL_" not in environ
    assert "BACK_URL=http://127.0.0.1:" in environ


def test_agent_refuses_a_world_writable_state_directory(tmp_path):
    home = tmp_path / "loose"
    home.mkdir()
    os.chmod(home, 0o777)
    result = subprocess.run(
        [sys.executable, "-m", "meshctl.agent", "--home", str(home)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert "writable by others" in result.stderr and "chmod 700" in result.stderr
    assert not (home / "agent.sock").exists()


def test_plaintext_into_a_strict_mesh_is_refused(mesh):
    port = free_port()
    secure_mesh(mesh, port)
    back = mesh.instance("back@v1#0")
    assert plain_get(back["inbound_port"]) is None
    assert http_get(f"http://127.0.0.1:{port}/call/back/whoami")[0] == 200  # the mesh itself works


def test_policies_are_enforced_and_policy_check_agrees(mesh):
    port = free_port()
    secure_mesh(mesh, port)
    assert http_get(f"http://127.0.0.1:{port}/call/back/whoami")[0] == 200
    code, _, body = http_get(f"http://127.0.0.1:{port}/call/back/admin/x")
    assert code == 403 and b"forbidden" in body  # front's app relays the sidecar's 403 body
    allowed = mesh.cli("policy", "check", "front", "back", "--path", "/whoami")
    assert allowed.returncode == 0 and "ALLOW" in allowed.stdout and "allow[0]" in allowed.stdout
    denied = mesh.cli("policy", "check", "front", "back", "--path", "/admin/x")
    assert denied.returncode == 1 and "DENY" in denied.stdout and "deny[0]" in denied.stdout
    ingress = mesh.cli("policy", "check", "ingress", "back")
    assert ingress.returncode == 1 and "allow rules (none matched)" in ingress.stdout


def test_rotations_from_the_cli_under_load_lose_nothing(mesh):
    port = free_port()
    secure_mesh(mesh, port)
    before = {c["owner"]: c["serial"] for c in json.loads(mesh.cli("certs", "-o", "json", check=True).stdout)["certificates"]}
    root_before = json.loads(mesh.cli("certs", "-o", "json", check=True).stdout)["root"]["fingerprint"]
    load = ContinuousLoad(port, "/call/back/whoami", reconnect_every=1)
    try:
        assert mesh.cli("certs", "rotate", "back").returncode == 0
        assert mesh.cli("certs", "rotate").returncode == 0
        assert mesh.cli("certs", "rotate", "--ca").returncode == 0
        sent = load.sent
        wait_for(lambda: load.sent >= sent + 30, what="traffic on the new root")
    finally:
        load.stop()
    assert load.failed == 0, load.errors[:5]
    after_doc = json.loads(mesh.cli("certs", "-o", "json", check=True).stdout)
    after = {c["owner"]: c["serial"] for c in after_doc["certificates"]}
    assert set(after) == set(before) and all(after[o] != before[o] for o in before)
    assert after_doc["root"]["fingerprint"] != root_before and "previous" not in after_doc["root"]


def self_signed(directory) -> tuple[str, str]:
    """A certificate for 127.0.0.1, as a user would bring for the ingress, in two files."""
    cert_pem, key_pem = user_certificate("shop.example")
    cert_path, key_path = directory / "shop.crt", directory / "shop.key"
    cert_path.write_text(cert_pem)
    key_path.write_text(key_pem)
    return str(cert_path), str(key_path)


def test_ingress_serves_https_with_the_users_certificate(mesh):
    import ssl

    port = free_port()
    cert, key = self_signed(mesh.tmp)
    mesh.write_manifest(
        """
        mesh: https
        services:
          web:
            command: {PY} {APPS}/echo.py
            health: {http: /healthz}
        ingress:
          port: PORT
          tls: {cert: CERT, key: KEY}
          routes: [{path: /, service: web}]
        """.replace("PORT", str(port)).replace("CERT", cert).replace("KEY", key)
    )
    mesh.up()
    ctx = ssl.create_default_context(cafile=cert)
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/whoami", context=ctx, timeout=10) as resp:
        assert resp.status == 200 and json.loads(resp.read())["service"] == "web"
    assert plain_get(port) is None  # plain HTTP on the HTTPS port gets no HTTP answer


def test_ingress_tls_with_an_unreadable_key_is_refused_before_anything_starts(mesh):
    port = free_port()
    cert, _ = self_signed(mesh.tmp)
    mesh.write_manifest(
        f"""
        mesh: https
        services:
          web:
            command: {{PY}} {{APPS}}/echo.py
        ingress:
          port: {port}
          tls: {{cert: {cert}, key: {mesh.tmp}/missing.key}}
          routes: [{{path: /, service: web}}]
        """
    )
    result = mesh.up(check=False)
    assert result.returncode == 1 and "ingress.tls:" in result.stderr
    assert mesh.status()["instances"] == []
