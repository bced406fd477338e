"""Every error the sidecar generates, and the one place that turns it into a response.

Each error has a stable code (shown to users in the `x-mesh-error` header) and an HTTP
status, as listed in meshctl/proxy/policy.md. The body is one line naming the service, so that
"which hop failed and why" is readable from a curl in a terminal.
"""

from __future__ import annotations

STATUS_BY_CODE: dict[str, int] = {
    "bad-request": 400,
    "header-too-large": 431,
    "body-too-large": 413,
    "route-not-found": 404,
    "egress-denied": 403,
    "forbidden": 403,
    "upstream-connect-failed": 502,
    "upstream-reset": 502,
    "no-healthy-endpoints": 503,
    "circuit-open": 503,
    "fault-abort": 503,  # the configured status replaces this one
    "timeout": 504,
    "header-timeout": 408,
}

_REASONS = {
    400: b"Bad Request",
    403: b"Forbidden",
    404: b"Not Found",
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
}


class MeshError(Exception):
    """An error the sidecar answers itself; `code` is stable, `status` follows from it."""

    code = "internal"

    def __init__(self, code: str, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status if status is not None else STATUS_BY_CODE.get(code, 500)


class ProtocolError(MeshError):
    """The peer sent bytes that are not acceptable HTTP/1.1 (raised by proxy.http1)."""


def reason_phrase(status: int) -> bytes:
    return _REASONS.get(status, b"Error")


def error_response(code: str, detail: str, status: int | None = None, close: bool = False, request_id: bytes | None = None) -> bytes:
    """The complete response bytes for a sidecar-generated error, with the request's id when known."""
    if status is None:
        status = STATUS_BY_CODE.get(code, 500)
    body = ("%s: %s\n" % (code, detail.replace("\r", " ").replace("\n", " "))).encode("utf-8", "replace")
    head = b"HTTP/1.1 %d %s\r\nx-mesh-error: %s\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: %d\r\n" % (
        status,
        reason_phrase(status),
        code.encode("ascii"),
        len(body),
    )
    if request_id:
        head += b"x-request-id: %s\r\n" % request_id
    if close:
        head += b"connection: close\r\n"
    return head + b"\r\n" + body


def response_for(error: MeshError, close: bool = False, request_id: bytes | None = None) -> bytes:
    return error_response(error.code, error.detail, error.status, close, request_id)
