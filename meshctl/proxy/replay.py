"""`meshctl replay`: one recorded request sent again through this sidecar, and compared.

The agent picks a sidecar that routes to the service and sends it, paced, one message
per recorded request: `{"type": "replay", "tag", "service", "version", "compare",
"timeout", "ignore_headers", "ignore_json", "request": {method, path, headers, body,
status}}`. The request goes out as mirror copies do (proxy.mirror: pooled connections,
this sidecar's mTLS identity, the `-shadow` Host and `x-mesh-mirror: 1`):

* with `compare`, one copy to that version (the primary) and one to `version`; their
  answers are compared field by field, as a live shadow's are (proxy.shadow), and for
  REFERENCE_PERCENT of them one more to another instance of the primary's version, so
  that the noise is learned as a live shadow learns it;
* without, one copy to `version`, compared with the recorded status only.

Every request gives one result tagged with the replay's id, a failure included, so the
agent knows when the replay is complete.
"""

from __future__ import annotations

import base64
import binascii
import re
from typing import TYPE_CHECKING, Any, Callable

from meshctl.proxy.compare import CompareSpec, Ignore, Response
from meshctl.proxy.shadow import Comparison

if TYPE_CHECKING:
    from meshctl.proxy.seams import Server

REFERENCE_PERCENT = 50.0  # a replay is short: learn its noise from more requests than a live shadow does
_TOKEN = re.compile(rb"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_TARGET = re.compile(rb"^/[\x21-\x7e]*$")
_VALUE = re.compile(rb"^[\t\x20-\x7e\x80-\xff]*$")
_FRAMING = frozenset({b"content-length", b"transfer-encoding", b"connection", b"keep-alive", b"te", b"upgrade"})


class BadRecordedRequest(ValueError):
    """A recorded request that cannot be sent as HTTP/1.1."""


def request_bytes(service: str, request: dict[str, Any]) -> tuple[bytes, bytes, bytes, bytes]:
    """(method, path, head, body) of a recorded request; BadRecordedRequest when it is not one."""
    method = str(request.get("method") or "GET").encode("latin-1", "replace")
    path = str(request.get("path") or "/").encode("latin-1", "replace")
    if not _TOKEN.match(method):
        raise BadRecordedRequest("method %r is not an HTTP token" % method)
    if not _TARGET.match(path):
        raise BadRecordedRequest("path %r is not an origin-form target" % path[:80])
    body = _body(request)
    lines = [b"%s %s HTTP/1.1" % (method, path)]
    has_host = False
    for pair in request.get("headers") or ():
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise BadRecordedRequest("a header is not a [name, value] pair: %r" % (pair,))
        name, value = (str(part).encode("latin-1", "replace") for part in pair)
        if not _TOKEN.match(name) or not _VALUE.match(value):
            raise BadRecordedRequest("header %r is not a valid field" % name[:80])
        if name.lower() in _FRAMING:
            continue
        has_host = has_host or name.lower() == b"host"
        lines.append(name + b": " + value)
    if not has_host:
        lines.append(b"host: " + service.encode("latin-1"))
    if body or method in (b"POST", b"PUT", b"PATCH"):
        lines.append(b"content-length: %d" % len(body))
    return method, path, b"\r\n".join(lines) + b"\r\n\r\n", body


def _body(request: dict[str, Any]) -> bytes:
    if request.get("body_b64") is not None:
        try:
            return base64.b64decode(str(request["body_b64"]), validate=True)
        except (binascii.Error, ValueError):
            raise BadRecordedRequest("body_b64 is not base64") from None
    return str(request.get("body") or "").encode("utf-8")


def replay_request(state: Server, message: dict[str, Any], sink: Callable[[dict], None]) -> None:
    name = str(message.get("service"))
    version = str(message.get("version"))
    primary = message.get("compare")
    request = message.get("request")
    if not isinstance(request, dict):
        request = {}
    spec = CompareSpec(True, b"/", Ignore(message.get("ignore_headers") or (), message.get("ignore_json") or ()),
                       REFERENCE_PERCENT)
    snapshot = state.snapshot
    service = snapshot.services.get(name) if snapshot is not None else None
    try:
        method, path, head, body = request_bytes(name, request)
    except BadRecordedRequest as exc:
        sink(Comparison(spec, name, version, b"-", b"-", sink, str(message.get("tag"))).failure("not sent: %s" % exc))
        return
    comparison = Comparison(spec, name, version, method, path, sink, str(message.get("tag")))
    if service is None:
        sink(comparison.failure("not sent: this sidecar does not route to %s" % name))
        return
    data = [head, body] if body else [head]
    timeout = float(message.get("timeout") or 15.0)
    now = state.loop.time()
    endpoint = None
    if primary:
        comparison.primary_version = str(primary)
        endpoint = comparison.mirror_to(state.pool, service, str(primary), "primary", data, timeout, now, frozenset())
        if endpoint is None:
            sink(comparison.failure("not sent: no ready endpoint of %s@%s, or too many copies in flight" % (name, primary)))
            return
    else:
        comparison.arrive("primary", Response(int(request.get("status") or 0), None, None), None)
    if comparison.mirror_to(state.pool, service, version, "shadow", data, timeout, now, frozenset()) is None:
        comparison.arrive("shadow", "not sent: no ready endpoint of %s@%s, or too many copies in flight" % (name, version), 0.0)
    elif endpoint is not None:
        comparison.send_reference(state.pool, service, endpoint, data, timeout, now)
