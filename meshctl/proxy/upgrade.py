"""HTTP/1.1 Upgrade (WebSocket) pass-through: decide in pure code, then hand over to a relay.

A WebSocket handshake is an HTTP/1.1 GET with `Connection: upgrade` and `Upgrade:
websocket`. Both of those are hop-by-hop headers, which the exchange normally strips;
for an upgrade they must reach the app, so `forward_request_head()` rebuilds the head
without the other hop-by-hop headers but with exactly those two. When the app answers
`101 Switching Protocols` and `check_switch()` accepts it, the HTTP part of both
connections is over: the 101 head goes to the client unchanged and `switch_to_relay()`
turns the two connections into an opaque relay (proxy.opaque), including any bytes
either parser had already buffered past the heads. Any other answer is an ordinary
response and the connection stays HTTP (RFC 9110 7.8: the server declined).

Only `websocket` is passed through. `Upgrade: h2c` is dropped like any hop-by-hop
header, so the request is served as plain HTTP/1.1: between sidecars HTTP/2 is chosen
by ALPN or the prior-knowledge preface instead (see proxy.detect).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Callable, Sequence

from meshctl.proxy.errors import MeshError
from meshctl.proxy.http1 import Head, rebuild_head
from meshctl.proxy.opaque import Relay

__all__ = [
    "PASSED_THROUGH",
    "UpgradeError",
    "check_switch",
    "forward_request_head",
    "requested_upgrade",
    "switch_to_relay",
    "websocket_accept",
]

PASSED_THROUGH = frozenset({b"websocket"})
SWITCHING_PROTOCOLS = 101
_WEBSOCKET_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class UpgradeError(MeshError):
    """The upstream answered an upgrade request with a 101 we cannot relay."""

    def __init__(self, detail: str) -> None:
        super().__init__("upstream-reset", detail)


def _tokens(value: bytes | None) -> frozenset[bytes]:
    if not value:
        return frozenset()
    return frozenset(token.strip().lower() for token in value.split(b",") if token.strip())


def requested_upgrade(head: Head) -> bytes | None:
    """The protocol the request asks to switch to, when it is one the mesh passes through.

    Needs `Connection: upgrade` and an `Upgrade` header naming a protocol in PASSED_THROUGH,
    on a GET (RFC 6455 4.1). Anything else is an ordinary request.
    """
    if head.method != b"GET" or b"upgrade" not in head.connection_tokens:
        return None
    for protocol in _tokens(head.get(b"upgrade")):
        if protocol.split(b"/", 1)[0] in PASSED_THROUGH:
            return protocol
    return None


def forward_request_head(head: Head, protocol: bytes, add: Sequence[bytes] = (), start_line: bytes | None = None) -> bytes:
    """The request head to send upstream: hop-by-hop headers dropped, the upgrade pair kept."""
    return rebuild_head(head, [*add, b"connection: upgrade", b"upgrade: " + protocol], start_line)


def check_switch(request: Head, response: Head) -> bool:
    """Whether `response` switches the connection to the protocol `request` asked for.

    False for any non-101 response (an ordinary answer; the connection stays HTTP).
    Raises UpgradeError for a 101 that does not name the requested protocol, or answers a
    request that asked for no upgrade: relaying it would leave both sides guessing.
    """
    if response.status != SWITCHING_PROTOCOLS:
        return False
    asked = requested_upgrade(request)
    if asked is None:
        raise UpgradeError("101 switching protocols to a request that asked for no upgrade")
    offered = _tokens(response.get(b"upgrade"))
    if asked not in offered:
        raise UpgradeError("101 switching to %r, the request asked for %r" % (b", ".join(sorted(offered)), asked))
    if b"upgrade" not in response.connection_tokens:
        raise UpgradeError("101 without connection: upgrade")
    return True


def websocket_accept(key: bytes) -> bytes:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 4.2.2), for checks and tests."""
    return base64.b64encode(hashlib.sha1(key.strip() + _WEBSOCKET_GUID).digest())


def switch_to_relay(
    loop: asyncio.AbstractEventLoop,
    client: asyncio.Transport,
    client_pending: bytes,
    upstream: asyncio.Transport,
    upstream_pending: bytes,
    idle_timeout: float | None = None,
    on_close: Callable[[Relay], None] | None = None,
) -> Relay:
    """Replace both connections' protocols with an opaque relay, after the 101 went to the client.

    `client_pending` / `upstream_pending` are the bytes each side's parser had read past
    its head (`Parser.take_buffer()`); they are delivered first, in order.
    """
    relay = Relay(loop, idle_timeout=idle_timeout, on_close=on_close)
    relay.adopt_upstream(upstream, b"")
    relay.adopt_downstream(client, client_pending)
    if upstream_pending:
        relay.upstream.data_received(upstream_pending)
    return relay
