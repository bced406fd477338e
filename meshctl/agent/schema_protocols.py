"""The manifest key for what a service speaks, and the rules that follow from it.

Per service:

    protocol: grpc               # http | grpc | tcp [http]

* `http`: HTTP/1.1 (an app's outbound listener also serves HTTP/2 clients, detected
  from the h2c preface, and relays anything else as opaque TCP);
* `grpc`: HTTP/2 with prior knowledge (h2c) between the app and its sidecar, h2 over
  mTLS between sidecars; `grpc-status` decides success;
* `tcp`: opaque bytes, no detection, so server-speaks-first protocols (Redis replies
  only, but MySQL, SMTP, PostgreSQL greet first) never wait for a client byte.

A `tcp` service has no requests to match: no `routes`, `retries`, `stream_idle_timeout`
(its connections close after 60 s without a byte), `fault`, `mirror` or header/cookie hashing; `split`, `connect_timeout`, `load_balancer`, `outlier_detection`
(connect failures) and `limits` apply per connection. Services that do not speak
HTTP/1.1 (`grpc`, `tcp`) are probed by a TCP connect, so `health.http` is refused there.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

PROTOCOLS = ("http", "grpc", "tcp")
DEFAULT_PROTOCOL = "http"
_NOT_FOR_TCP = {
    "routes": "a tcp service has no requests to route; remove it or use protocol: http",
    "retries": "a tcp service has no requests to retry; remove it or use protocol: http",
    "stream_idle_timeout": "a tcp service has no requests; its connections close after 60s without a byte. "
                           "Remove it, or use protocol: http",
}

SERVICE_PROPERTIES: dict[str, Any] = {
    "protocol": {
        "enum": list(PROTOCOLS),
        "description": "What the app speaks: http (HTTP/1.1, h2c detected), grpc (HTTP/2) or tcp (opaque bytes) [http].",
    },
}


def protocol_of(service: dict[str, Any]) -> str:
    return service.get("protocol", DEFAULT_PROTOCOL)


def protocol_problems(path: tuple, service: dict[str, Any]) -> Iterator[tuple[tuple, str]]:
    """Keys that mean nothing for the service's protocol."""
    protocol = protocol_of(service)
    if protocol == "http":
        return
    if protocol == "tcp":
        for key, message in _NOT_FOR_TCP.items():
            if service.get(key):
                yield path + (key,), message
        balancer = service.get("load_balancer")
        if isinstance(balancer, dict) and ("header" in balancer or "cookie" in balancer):
            yield path + ("load_balancer",), "a tcp service has no headers or cookies to hash; use source_ip"
    for where, health in _healths(service):
        if isinstance(health, dict) and "http" in health:
            yield path + where + ("health", "http"), (
                "a %s service does not answer HTTP/1.1 probes; remove health.http (the probe is a TCP connect)" % protocol)


def _healths(service: dict[str, Any]) -> Iterator[tuple[tuple, Any]]:
    yield (), service.get("health")
    versions = service.get("versions")
    if isinstance(versions, dict):
        for name, version in versions.items():
            if isinstance(version, dict):
                yield ("versions", name), version.get("health")
