"""Observability end to end: known load in, exact numbers out; plus the pure seams.

The mesh: ingress -> front -> back (front calls back on /call/back/...), mTLS on, every
trace sampled, access log on errors.
"""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from meshctl.agent.control_obs import edges_from
from meshctl.agent.observability import merge_expositions, metrics_from_snapshot
from meshctl.proxy.admin import answer
from meshctl.proxy.metrics import Metrics
from meshctl.proxy.observe import TapFilter, service_of_identity
from tests.meshharness import REPO, free_port, http_get, wait_for

MESH = """
mesh: obs
observability: {{access_log: errors, tracing: {{sampling: 1.0}}}}
services:
  back:
    health: {{http: /healthz}}
    versions:
      v1: {{command: {PY} {APPS}/echo.py}}
  front:
    health: {{http: /healthz}}
    upstreams: [back]
    versions:
      v1: {{command: {PY} {APPS}/echo.py}}
ingress:
  port: {port}
  routes: [{{path: /, service: front}}]
"""


@pytest.mark.parametrize(
    "identity, service",
    [
        ("spiffe://obs.local/service/cart", "cart"),
        ("spiffe://obs.local/ingress", "ingress"),
        (None, "unknown"),
        ("spiffe://obs.local/", "unknown"),
    ],
)
def test_service_of_identity(identity, service):
    assert service_of_identity(identity) == service


@pytest.mark.parametrize(
    "filter_, event, wanted",
    [
        ({"service": "back"}, {"source": "front", "destination": "back", "path": "/x", "method": "GET", "status": 200}, True),
        ({"service": "cart"}, {"source": "front", "destination": "back", "path": "/x", "method": "GET", "status": 200}, False),
        ({"status": "5xx"}, {"source": "a", "destination": "b", "path": "/x", "method": "GET", "status": 503}, True),
        ({"status": "5xx"}, {"source": "a", "destination": "b", "path": "/x", "method": "GET", "status": 404}, False),
        ({"path_prefix": "/api"}, {"source": "a", "destination": "b", "path": "/x", "method": "GET", "status": 200}, False),
    ],
)
def test_tap_filter(filter_, event, wanted):
    assert TapFilter(filter_).matches(event) is wanted


def _registry(instance: str) -> Metrics:
    metrics = Metrics(instance, "back", "v1")
    metrics.record_request("inbound", "front", "back", "v1", b"GET", 200, 0.003, False, b"/a")
    metrics.record_request("inbound", "front", "back", "v1", b"GET", 500, 0.2, False, b"/a")
    metrics.tcp_opened("inbound", "front")
    metrics.count_retry("back", "v1")
    metrics.set_certificate_expiry("back", 2e9)
    return metrics


def test_snapshot_round_trip_gives_the_same_exposition():
    metrics = _registry("back@v1#0")
    assert metrics_from_snapshot(metrics.snapshot()).exposition() == metrics.exposition()


def test_merged_exposition_parses_and_keeps_every_instance():
    merged = merge_expositions([_registry("back@v1#0").exposition(), _registry("back@v1#1").exposition()])
    families = {family.name: family for family in text_string_to_metric_families(merged)}
    requests = families["mesh_requests"]
    assert {sample.labels["instance"] for sample in requests.samples} == {"back@v1#0", "back@v1#1"}
    assert sum(s.value for s in requests.samples if s.name == "mesh_requests_total") == 4
    assert merged.count("# TYPE mesh_requests_total counter") == 1


@pytest.mark.parametrize(
    "line, status",
    [(b"GET /metrics HTTP/1.1", 200), (b"GET /stats HTTP/1.1", 200), (b"GET /ready HTTP/1.1", 200),
     (b"POST /metrics HTTP/1.1", 405), (b"GET /nope HTTP/1.1", 404), (b"garbage", 400)],
)
def test_admin_answers(line, status):
    class Holder:
        metrics = _registry("back@v1#0")

    assert answer(line, Holder()).startswith(b"HTTP/1.1 %d " % status)  # type: ignore[arg-type]


def test_admin_is_unavailable_before_the_first_snapshot():
    assert answer(b"GET /ready HTTP/1.1", None).startswith(b"HTTP/1.1 503 ")


def test_edges_from_outbound_rows():
    snapshot = _registry("front@v1#0").snapshot()
    snapshot["requests"] = [["outbound", "front", "back", "v1", "GET", 200, False, 3, 0.1, [3] + [0] * 14]]
    snapshot["started_at"], snapshot["time"] = 1000.0, 1002.0  # three requests in the sidecar's first 2 s
    pushed = {"front": {"tls": {"identity": "spiffe://obs.local/service/front"},
                        "services": {"back": {"tls": {"identity": "spiffe://obs.local/service/back"}}}}}
    [edge] = edges_from([(None, snapshot)], pushed, "obs.local")
    assert edge == {"source": "front", "destination": "back", "client_identity": "spiffe://obs.local/service/front",
                    "server_identity": "spiffe://obs.local/service/back", "mtls": True, "requests": 3, "rps": 1.5,
                    "success_rate": 1.0}


# -- a real mesh -----------------------------------------------------------------------------


def _json(mesh, *args):
    return json.loads(mesh.cli(*args, "-o", "json", check=True).stdout)


def test_known_load_gives_exact_numbers(mesh):
    port = free_port()
    mesh.write_manifest(MESH.format(port=port, PY="{PY}", APPS="{APPS}"))
    mesh.up()
    base = f"http://127.0.0.1:{port}"
    for index in range(200):
        path = "/call/back/status/500" if index % 10 == 0 else "/call/back/sleep?ms=30"
        http_get(base + path)

    def back_stats():
        rows = [r for r in _json(mesh, "stat", "--window", "2m") if r["service"] == "back"]
        return rows if rows and rows[0]["requests"] >= 200 else None

    [back] = wait_for(back_stats, timeout=20, what="200 requests at back")
    assert back["requests"] == 200, back
    assert back["success_rate"] == 0.9
    assert 25 <= back["p50_ms"] <= 50  # the 30 ms sleeps land in the 25..50 ms bucket

    url = mesh.cli("metrics", check=True).stdout.strip()
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    instances = {sample.labels.get("instance") for family in text_string_to_metric_families(text) for sample in family.samples}
    assert {"front@v1#0", "back@v1#0", "ingress"} <= instances

    status = mesh.status()
    admin_port = next(i["admin_port"] for i in status["instances"] if i["id"] == "back@v1#0")
    code, _, body = http_get(f"http://127.0.0.1:{admin_port}/metrics")
    assert code == 200 and b"mesh_requests_total" in body

    frame = mesh.cli("top", "--once", check=True).stdout
    assert "front@v1" in frame and "back@v1" in frame

    edges = _json(mesh, "edges")
    front_back = next(e for e in edges if e["source"] == "front" and e["destination"] == "back")
    assert front_back["mtls"] is True
    assert front_back["client_identity"] == "spiffe://obs.local/service/front"
    assert front_back["server_identity"] == "spiffe://obs.local/service/back"

    def two_hop_trace():
        for summary in _json(mesh, "trace"):
            if {"front", "back"} <= set(summary["services"]):
                return summary
        return None

    summary = wait_for(two_hop_trace, timeout=20, what="a trace across front and back")
    spans = _json(mesh, "trace", summary["trace_id"])["spans"]
    assert {span["service"] for span in spans} >= {"front", "back"}
    waterfall = mesh.cli("trace", summary["trace_id"][:12], check=True).stdout
    assert "back" in waterfall and "front" in waterfall

    access = [json.loads(line) for line in mesh.cli("logs", "--access", check=True).stdout.splitlines() if line.strip()]
    assert access and all(event["status"] >= 500 for event in access)


def test_tap_sees_a_request(mesh):
    port = free_port()
    mesh.write_manifest(MESH.format(port=port, PY="{PY}", APPS="{APPS}"))
    mesh.up()
    tap = subprocess.Popen(
        [sys.executable, "-m", "meshctl.cli", "tap", "front"], env=mesh.env, cwd=REPO,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert "tapping" in tap.stderr.readline()
        http_get(f"http://127.0.0.1:{port}/call/back/whoami", headers={"x-request-id": "tap-test-1"})
        # front's call to back (seen by both sidecars), then the ingress's call to front, each as it ends
        lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in tap.stdout], daemon=True).start()
        seen = [lines.get(timeout=20) for _ in range(3)]
        assert any("/whoami" in line and "front -> " in line and "tls=yes" in line for line in seen), seen
        [line] = [line for line in seen if "/call/back/whoami" in line]
        assert "200" in line and "tls=yes" in line and "id=tap-test-1" in line  # the request's own x-request-id
    finally:
        tap.kill()
        tap.communicate()  # reaps it and closes both pipes
