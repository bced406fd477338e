"""`meshctl record`: the requests a service's inbound receives, kept to be replayed.

The agent sends `{"type": "record", "id", "limit", "include_secrets"}` to the sidecars of
one service and `{"type": "unrecord", "id"}` when done; while a recording is open,
proxy.observe calls `record_events()` for every finished inbound exchange and each
recording gets `{"type": "record-event", "id", "event"}` lines, at most `limit` of them.

An event is what `meshctl replay` needs to send the request again: method, path, the
headers (hop-by-hop, framing and per-request trace headers dropped; authorization,
cookie and set-cookie values redacted unless `include_secrets`), the body when it was at
most 64 KiB (text as `body`, anything else base64 as `body_b64`; a larger one is left
out and `body_truncated` is true), and the status the app answered.
"""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING, Any, Callable

from meshctl.proxy.capture import dechunk
from meshctl.proxy.http1 import HOP_BY_HOP
from meshctl.proxy.tracing import TRACE_HEADERS

if TYPE_CHECKING:
    from meshctl.proxy.exchange import Exchange

SECRET_HEADERS = frozenset({b"authorization", b"proxy-authorization", b"cookie", b"set-cookie"})
REDACTED = "<redacted>"
NOT_RECORDED = HOP_BY_HOP | frozenset(TRACE_HEADERS) | frozenset({b"content-length", b"transfer-encoding", b"x-request-id"})


class Recording:
    """One open `meshctl record` in this sidecar."""

    __slots__ = ("id", "limit", "include_secrets", "sent")

    def __init__(self, raw: dict[str, Any]) -> None:
        self.id = int(raw.get("id", 0))
        limit = raw.get("limit")
        self.limit = int(limit) if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None
        self.include_secrets = raw.get("include_secrets") is True
        self.sent = 0

    def __repr__(self) -> str:
        return "<Recording %d, %d sent%s>" % (self.id, self.sent, "" if self.limit is None else " of %d" % self.limit)


def recorded_request(exchange: Exchange, status: int, include_secrets: bool) -> dict[str, Any]:
    head = exchange.head
    headers = [
        [name.decode("latin-1"), REDACTED if name in SECRET_HEADERS and not include_secrets else value.decode("latin-1")]
        for name, value in head.headers
        if name not in NOT_RECORDED
    ]
    event: dict[str, Any] = {
        "ts": time.time(),
        "method": exchange.method.decode("latin-1"),
        "path": head.target.decode("latin-1"),
        "headers": headers,
        "status": status,
    }
    body = _body(exchange)
    if body is None:
        event["body_truncated"] = True
    elif body:
        try:
            event["body"] = body.decode("utf-8")
        except UnicodeDecodeError:
            event["body_b64"] = base64.b64encode(body).decode("ascii")
    return event


def _body(exchange: Exchange) -> bytes | None:
    """The request's decoded body, or None when it was not kept whole (over 64 KiB)."""
    replay = exchange.replay
    if replay is None or not exchange.request_done:
        return None
    raw = b"".join(replay[1:])
    if not exchange.head.chunked:
        return raw
    try:
        return dechunk(raw)
    except ValueError:
        return None


def record_events(recordings: dict[int, Recording], exchange: Exchange, status: int, send: Callable[[dict], None]) -> None:
    """Send one finished inbound exchange to every recording that still wants one."""
    event: dict[str, Any] | None = None
    secret_event: dict[str, Any] | None = None
    for recording in recordings.values():
        if recording.limit is not None and recording.sent >= recording.limit:
            continue
        recording.sent += 1
        if recording.include_secrets:
            secret_event = secret_event or recorded_request(exchange, status, True)
            send({"type": "record-event", "id": recording.id, "event": secret_event})
        else:
            event = event or recorded_request(exchange, status, False)
            send({"type": "record-event", "id": recording.id, "event": event})
