"""Bursts of new client connections through the ingress: none becomes a mesh-generated error.

Each request comes on its own connection (`connection: close`), thousands at a time, as
from a crowd of browsers. Before the pool bounded connection establishment, each of them
made the ingress open its own mTLS connection to the service's sidecar; the handshakes
queued up on one core and the 1 s connect timeout turned them into 502
upstream-connect-failed (issue 24). The client is bench/burst.py (asyncio raw sockets over
two processes), run as a process of its own.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.meshharness import Mesh, free_port

ROOT = Path(__file__).resolve().parent.parent
BURST = ROOT / "bench" / "burst.py"
NGINX_APP = ROOT / "bench" / "nginx-app.sh"
TEMPLATE = ROOT / "templates" / "shopfast.yaml"


def burst(port: int, requests: int, concurrency: int, path: str = "/") -> dict:
    done = subprocess.run(
        [sys.executable, str(BURST), "--port", str(port), "--requests", str(requests), "--concurrency", str(concurrency),
         "--processes", "2", "--path", path],
        capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout)


@pytest.mark.timeout(600)
@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed (make test-deps installs nginx-light when run as root)")
def test_bursts_of_new_connections_through_the_ingress_to_nginx_all_succeed(mesh: Mesh, tmp_path: Path) -> None:
    manifest = {
        "mesh": "burst",
        "services": {"web": {"command": ["sh", str(NGINX_APP)], "env": {"BENCH_TMP": str(tmp_path)}, "health": {"http": "/"}}},
        "ingress": {"port": free_port(), "routes": [{"path": "/", "service": "web"}]},
    }
    mesh.write_manifest(json.dumps(manifest))  # JSON is YAML
    mesh.up()
    port = mesh.status()["ingress"]["port"]

    results = {concurrency: burst(port, 4000, concurrency) for concurrency in (500, 1000, 2000)}

    failed = {concurrency: (result["failed"], result["failures"]) for concurrency, result in results.items() if result["failed"]}
    assert not failed, "failed requests by concurrency: %s" % failed


@pytest.mark.timeout(600)
def test_a_burst_on_the_demo_shop_gets_no_mesh_generated_error(mesh: Mesh) -> None:
    port = free_port()
    text = TEMPLATE.read_text().replace("port: 8080", "port: %d" % port).replace("workdir: ..", "workdir: %s" % ROOT)
    assert "port: %d" % port in text, "the template's ingress port line changed; update this test"
    mesh.write_manifest(text)
    mesh.up()

    # The shop's JSON API (frontend, then catalog): every hop a burst meets, at a fraction of the
    # front page's Python cost, so a loaded test machine keeps it well inside the 15 s timeout.
    result = burst(port, 500, 500, "/api/products")

    from_mesh = {reason: count for reason, count in result["failures"].items() if "not from the mesh" not in reason}
    assert not from_mesh, "mesh-generated failures: %s (all: %s)" % (from_mesh, result)
