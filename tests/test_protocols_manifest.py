"""The `protocol` manifest key: validation table and what the compiled snapshot carries."""

from __future__ import annotations

import pytest

from meshctl.agent.compile import Endpoint, SidecarIdentity, SidecarListeners, compile_sidecar
from meshctl.agent.manifest import ManifestError, parse_manifest

BASE = """
mesh: shop
services:
  cache:
    command: redis-server
{extra}
  web:
    command: python web.py
    upstreams: [cache]
"""


def manifest(extra: str):
    return parse_manifest(BASE.format(extra=extra), "/tmp/mesh.yaml")


@pytest.mark.parametrize(
    ("extra", "problem"),
    [
        ("    protocol: tcp", None),
        ("    protocol: grpc", None),
        ("    protocol: http", None),
        ("    protocol: udp", "protocol"),
        ("    protocol: tcp\n    routes: [{match: {path: {prefix: /}}, version: v1}]", "no requests to route"),
        ("    protocol: tcp\n    retries: {attempts: 2}", "no requests to retry"),
        ("    protocol: tcp\n    stream_idle_timeout: 10m", "its connections close after 60s without a byte"),
        ("    protocol: grpc\n    stream_idle_timeout: 10m\n    timeout: 0", None),
        ("    protocol: tcp\n    load_balancer: {kind: consistent_hash, header: x-user}", "no headers or cookies"),
        ("    protocol: grpc\n    health: {http: /healthz}", "does not answer HTTP/1.1 probes"),
        ("    protocol: grpc\n    retries: {attempts: 2}", None),
    ],
)
def test_protocol_validation(extra, problem):
    if problem is None:
        manifest(extra)
        return
    with pytest.raises(ManifestError) as info:
        manifest(extra)
    assert problem in str(info.value)


def test_protocol_reaches_services_and_listeners():
    parsed = manifest("    protocol: tcp")
    assert parsed.service("cache").protocol == "tcp" and parsed.service("web").protocol == "http"
    caller = compile_sidecar(
        parsed, SidecarIdentity("web@v1#0", "web", "v1", ("cache",)),
        SidecarListeners(inbound_fd=5, app_port=4000, outbound_fds=(("cache", 6),)),
        [Endpoint("cache@v1#0", "cache", "v1", 5001)],
    )
    assert caller["services"]["cache"]["protocol"] == "tcp"
    assert [entry["protocol"] for entry in caller["listeners"]] == ["http", "tcp"]
    callee = compile_sidecar(
        parsed, SidecarIdentity("cache@v1#0", "cache", "v1", ()), SidecarListeners(inbound_fd=5, app_port=4000), [],
    )
    assert callee["listeners"][0]["protocol"] == "tcp"
    assert parsed.service("cache").versions[0].health.http is None  # TCP-connect probe
