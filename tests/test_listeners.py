"""proxy.listeners.resolve: where a request goes, per listener kind (pure: snapshot and head in)."""

from __future__ import annotations

import pytest

from meshctl.proxy.errors import MeshError
from meshctl.proxy.http1 import Parser
from meshctl.proxy.listeners import resolve
from meshctl.proxy.snapshot import SnapshotError, compile_snapshot

SERVICE = {
    "endpoints": [{"id": "web@v1#0", "version": "v1", "address": ["127.0.0.1", 9]}],
    "versions": ["v1"], "split": {"v1": 100}, "routes": [], "timeout": 15.0, "connect_timeout": 1.0,
    "retries": None, "load_balancer": {"kind": "round_robin"}, "outlier_detection": None,
    "limits": {"max_connections": 1024, "max_pending": 1024},
}


def _snapshot(service: dict = SERVICE):
    listener = {"name": "ingress", "kind": "ingress", "fd": -1,
                "routes": [{"path": "/api", "service": "api"}, {"path": "/", "service": "web"}]}
    config = {
        "instance": "ingress", "service": "None", "version": "v1", "drain_timeout": 5.0, "listeners": [listener],
        "services": {"web": service, "api": SERVICE}, "egress": [],
        "http": {"max_header_bytes": 65536, "max_body_bytes": None, "header_timeout": 10.0, "idle_timeout": 60.0},
        "tracing": {"sampling": 0.0}, "access_log": "off",
    }
    return compile_snapshot({"type": "config", "version": 1, "config": config}, None)


def _head(target: bytes):
    parser = Parser(True)
    parser.feed(b"GET %s HTTP/1.1\r\nHost: a\r\n\r\n" % target)
    return parser.next_event()


@pytest.mark.parametrize("path, service", [(b"/", "web"), (b"/x", "web"), (b"/api", "api"), (b"/api/v1?q", "api"), (b"/apix", "web")])
def test_ingress_routes_by_longest_prefix_and_reuses_its_target(path, service):
    snapshot = _snapshot()
    listener = snapshot.listeners["ingress"]
    target = resolve(listener, snapshot, _head(path))
    assert (target.service.name, target.label, target.rewrite, target.request_target) == (service, service, True, None)
    assert resolve(listener, snapshot, _head(path)) is target  # built once per route and snapshot
    assert resolve(listener, _snapshot(), _head(path)) is not target  # a new snapshot, new services


def test_ingress_without_a_matching_route_is_route_not_found():
    snapshot = _snapshot()
    snapshot.listeners["ingress"].routes = [route for route in snapshot.listeners["ingress"].routes if route.prefix == b"/api"]
    with pytest.raises(MeshError) as info:
        resolve(snapshot.listeners["ingress"], snapshot, _head(b"/web"))
    assert info.value.code == "route-not-found"


def test_the_tcp_connect_and_the_tls_handshake_have_their_own_limits():
    assert (_snapshot().services["web"].connect_timeout, _snapshot().services["web"].handshake_timeout) == (1.0, 10.0)
    assert _snapshot(dict(SERVICE, handshake_timeout=2.5)).services["web"].handshake_timeout == 2.5
    for bad in (0, -1, "10s", True):
        with pytest.raises(SnapshotError, match="services.web.handshake_timeout: expected a number of seconds > 0"):
            _snapshot(dict(SERVICE, handshake_timeout=bad))
