"""Listener kinds: where a request that arrived on a listener goes.

Pure decisions, one per kind (docs/protocols.md, part 1):

* inbound: to the local app, headers untouched;
* outbound: to the one service the listener is for;
* ingress: the longest matching path prefix picks the service, else 404 route-not-found;
* forward: absolute-form requests (or the Host header); `cart` and `cart.mesh` are
  service cart, other hosts only when listed in `egress` (then straight to host:port),
  otherwise 403 egress-denied. `CONNECT host:port` to an egress host becomes a TCP
  tunnel (an opaque relay, proxy.dispatch); CONNECT to a mesh service is a 400 that says to send plain
  HTTP instead, since the mesh itself secures traffic between sidecars.

`resolve()` returns a `Target`; the exchange does the I/O. `open_listeners()` turns the
inherited, already-bound sockets into servers.
"""

from __future__ import annotations

import asyncio
import functools
import socket
from typing import Callable

from meshctl.proxy.detect import DETECT_TIMEOUT_S
from meshctl.proxy.errors import MeshError
from meshctl.proxy.http1 import Head
from meshctl.proxy.peers import PeerGate
from meshctl.proxy.snapshot import IngressRoute, Listener, Service, Snapshot
from meshctl.proxy.tls import InboundAcceptor, IngressTLS, TLSConfig

MESH_DOMAIN = b".mesh"
LISTEN_BACKLOG = 4096  # as the agent listens (meshctl/agent/ports.py); create_server listens again
# Listeners only the mesh's own processes use. The ingress is the mesh's front door, for
# browsers and clients of any user (and of other hosts when it binds beyond loopback).
GATED_KINDS = frozenset({"inbound", "outbound", "forward"})


class Target:
    """Where one request goes: a mesh service, or a fixed address (the app, an egress host)."""

    __slots__ = ("service", "address", "label", "request_target", "rewrite", "tunnel")

    def __init__(
        self,
        service: Service | None,
        address: tuple[str, int] | None,
        label: str,
        request_target: bytes | None,
        rewrite: bool,
        tunnel: bool = False,
    ) -> None:
        self.tunnel = tunnel  # a CONNECT tunnel to `address`, not an HTTP exchange
        self.service = service
        self.address = address
        self.label = label  # names the destination in error bodies
        self.request_target = request_target  # origin-form target when absolute-form must be rewritten
        self.rewrite = rewrite  # add x-request-id / forwarding headers, drop hop-by-hop

    def __repr__(self) -> str:
        return "<Target %s>" % self.label


def _service(snapshot: Snapshot, name: str) -> Service:
    service = snapshot.services.get(name)
    if service is None:
        raise MeshError("route-not-found", "no service %r in this sidecar's config" % name)
    return service


def _split_absolute(target: bytes) -> tuple[bytes, int, bytes]:
    """(host, port, origin-form target) of an absolute-form http:// target."""
    if target[:7].lower() != b"http://":
        if target[:8].lower() == b"https://":
            raise MeshError("bad-request", "https:// targets go through a CONNECT tunnel, not an absolute-form request")
        raise MeshError("bad-request", "forward proxy needs an absolute http:// target")
    rest = target[7:]
    slash = rest.find(b"/")
    query = rest.find(b"?")
    cut = min(i for i in (slash, query, len(rest)) if i >= 0)
    authority, path = rest[:cut], rest[cut:]
    if not path.startswith(b"/"):
        path = b"/" + path
    host, port = _split_authority(authority)
    return host, port, path


def _split_authority(authority: bytes) -> tuple[bytes, int]:
    if b"@" in authority:
        raise MeshError("bad-request", "userinfo in the target is not allowed")
    host, sep, port = authority.rpartition(b":")
    if not sep or b"]" in port:
        host, port = authority, b"80"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise MeshError("bad-request", "invalid host in the target")
    return host.lower(), int(port)


def _resolve_connect(snapshot: Snapshot, head: Head) -> Target:
    authority = head.target
    host, sep, port = authority.rpartition(b":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536 or b"@" in host or b"/" in authority:
        raise MeshError("bad-request", "CONNECT needs an authority-form target host:port")
    if host.startswith(b"[") and host.endswith(b"]"):
        host = host[1:-1]
    host = host.lower()
    name = host[: -len(MESH_DOMAIN)] if host.endswith(MESH_DOMAIN) else host
    text = host.decode("ascii", "replace")
    with_port = "%s:%d" % (text, int(port))
    if name.decode("ascii", "replace") in snapshot.services:
        raise MeshError(
            "bad-request",
            "CONNECT to mesh service %s: send plain HTTP through this proxy instead (http://%s/...); "
            "the mesh secures traffic between sidecars itself" % (with_port, name.decode("ascii", "replace") + ".mesh"),
        )
    if text in snapshot.egress or with_port in snapshot.egress:
        return Target(None, (text, int(port)), "egress tunnel %s" % with_port, None, False, tunnel=True)
    raise MeshError("egress-denied", "CONNECT %s: not in egress" % with_port)


def _resolve_forward(snapshot: Snapshot, head: Head) -> Target:
    if head.method == b"CONNECT":
        return _resolve_connect(snapshot, head)
    if head.target.startswith(b"/"):
        authority = head.get(b"host")
        if not authority:
            raise MeshError("bad-request", "no absolute target and no host header")
        host, port = _split_authority(authority)
        origin = None
    else:
        host, port, origin = _split_absolute(head.target)
    name = host[: -len(MESH_DOMAIN)] if host.endswith(MESH_DOMAIN) else host
    service = snapshot.services.get(name.decode("ascii", "replace"))
    if service is not None:
        return Target(service, None, service.name, origin, True)
    text = host.decode("ascii", "replace")
    with_port = "%s:%d" % (text, port)
    if text in snapshot.egress or with_port in snapshot.egress:
        return Target(None, (text, port), "egress %s" % with_port, origin, True)
    raise MeshError("egress-denied", "%s is not a mesh service and not in egress" % with_port)


def _fixed_target(listener: Listener, snapshot: Snapshot) -> Target:
    """The one destination of an outbound or inbound listener, built once per snapshot."""
    if listener.kind == "outbound":
        service = listener.service
        assert service is not None  # an outbound listener names its service (proxy.snapshot.Listener)
        return Target(_service(snapshot, service), None, service, None, True)
    app = listener.app
    assert app is not None  # the other fixed one is inbound, to its app's address
    return Target(None, app, "%s (app %s:%d)" % (snapshot.instance, app[0], app[1]), None, False)


def resolve(listener: Listener, snapshot: Snapshot, head: Head) -> Target:
    """The destination of `head` arriving on `listener`; raises MeshError when there is none."""
    kind = listener.kind
    if head.method == b"CONNECT" and kind != "forward":
        raise MeshError("bad-request", "CONNECT is only accepted on the forward proxy listener")
    if kind == "outbound" or kind == "inbound":
        target = snapshot.fixed_targets.get(listener.name)
        if target is None:
            target = snapshot.fixed_targets[listener.name] = _fixed_target(listener, snapshot)
        return target
    if kind == "ingress":
        route = _ingress_route(listener, head.target)
        target = snapshot.fixed_targets.get(route)
        if target is None:
            target = snapshot.fixed_targets[route] = Target(_service(snapshot, route.service), None, route.service, None, True)
        return target
    return _resolve_forward(snapshot, head)


def _ingress_route(listener: Listener, path: bytes) -> IngressRoute:
    for route in listener.routes:  # longest prefix first
        if route.matches(path):
            return route
    raise MeshError("route-not-found", "ingress: no route for path %s" % path.decode("ascii", "replace")[:200])


def ingress_service(listener: Listener, path: bytes) -> str:
    """The service an ingress request for `path` goes to (HTTP/2 streams); MeshError route-not-found otherwise."""
    return _ingress_route(listener, path).service


async def open_listeners(
    loop: asyncio.AbstractEventLoop,
    snapshot: Snapshot,
    factory: Callable[[Listener], Callable[[], asyncio.Protocol]],
    current_tls: Callable[[], TLSConfig | None] = lambda: None,
    current_ingress_tls: Callable[[], IngressTLS | None] = lambda: None,
    gate: PeerGate | None = None,
) -> list[asyncio.AbstractServer | InboundAcceptor]:
    """Start serving on every inherited listening socket of the first snapshot.

    The inbound listener gets the InboundAcceptor, which applies the TLS mode and the
    certificate current at each accept (see proxy.tls); the others are plain servers.
    `factory(listener)` already knows the listener's protocol (proxy.dispatch).
    With a `gate` (the snapshot's `local_uid`), every listener but the ingress admits only
    connections from that uid, so they all accept through an InboundAcceptor too.
    """
    servers: list[asyncio.AbstractServer | InboundAcceptor] = []
    for listener in snapshot.listeners.values():
        sock = socket.socket(fileno=listener.fd)
        sock.setblocking(False)
        admits = None
        if gate is not None and listener.kind in GATED_KINDS:
            admits = functools.partial(gate.admits, listener=listener.kind)
        if listener.kind == "inbound":
            silent = DETECT_TIMEOUT_S if listener.protocol == "tcp" else None  # server-first apps speak first
            servers.append(InboundAcceptor(loop, sock, factory(listener), current_tls, silent, admits))
        elif listener.kind == "ingress" and snapshot.ingress_tls is not None:
            servers.append(InboundAcceptor(loop, sock, factory(listener), current_ingress_tls))
        elif admits is not None:
            servers.append(InboundAcceptor(loop, sock, factory(listener), lambda: None, None, admits))
        else:
            servers.append(await loop.create_server(factory(listener), sock=sock, backlog=LISTEN_BACKLOG))
    return servers
