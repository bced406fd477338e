"""Every error the sidecar generates, and the one place that turns it into an answer.

Each error has a stable code (shown to users in the `x-mesh-error` header), an HTTP
status and a gRPC status, all in `ANSWERS` (meshctl/proxy/policy.md lists them). The
HTTP/1.1 response, the HTTP/2 response and the gRPC trailers-only answer are all built
from that one row, so a code means the same thing whatever the client speaks. The body
(or grpc-message) is one line naming the service and the code, so that "which hop failed
and why" is readable from a curl or a gRPC client's error in a terminal.
"""

from __future__ import annotations

from typing import NamedTuple

# gRPC status codes (grpc/doc/statuscodes.md).
GRPC_OK = 0
GRPC_CANCELLED = 1
GRPC_UNKNOWN = 2
GRPC_DEADLINE_EXCEEDED = 4
GRPC_PERMISSION_DENIED = 7
GRPC_RESOURCE_EXHAUSTED = 8
GRPC_UNIMPLEMENTED = 12
GRPC_INTERNAL = 13
GRPC_UNAVAILABLE = 14
GRPC_UNAUTHENTICATED = 16


class Answer(NamedTuple):
    """What one generated error becomes: an HTTP status, and a gRPC status for gRPC clients."""

    status: int
    grpc: int


ANSWERS: dict[str, Answer] = {
    "bad-request": Answer(400, GRPC_INTERNAL),
    "header-too-large": Answer(431, GRPC_RESOURCE_EXHAUSTED),
    "body-too-large": Answer(413, GRPC_RESOURCE_EXHAUSTED),
    "route-not-found": Answer(404, GRPC_UNIMPLEMENTED),
    "egress-denied": Answer(403, GRPC_PERMISSION_DENIED),
    "forbidden": Answer(403, GRPC_PERMISSION_DENIED),
    "upstream-connect-failed": Answer(502, GRPC_UNAVAILABLE),
    "upstream-reset": Answer(502, GRPC_UNAVAILABLE),
    "no-healthy-endpoints": Answer(503, GRPC_UNAVAILABLE),
    "circuit-open": Answer(503, GRPC_UNAVAILABLE),
    "fault-abort": Answer(503, GRPC_UNAVAILABLE),  # the configured status replaces both (grpc_for_http)
    "timeout": Answer(504, GRPC_DEADLINE_EXCEEDED),
    "stream-idle-timeout": Answer(504, GRPC_DEADLINE_EXCEEDED),
    "header-timeout": Answer(408, GRPC_DEADLINE_EXCEEDED),
}
_INTERNAL = Answer(500, GRPC_INTERNAL)

# How a gRPC client reads a bare HTTP status (grpc/doc/http-grpc-status-mapping.md).
_GRPC_BY_HTTP = {400: GRPC_INTERNAL, 401: GRPC_UNAUTHENTICATED, 403: GRPC_PERMISSION_DENIED, 404: GRPC_UNIMPLEMENTED,
                 429: GRPC_UNAVAILABLE, 502: GRPC_UNAVAILABLE, 503: GRPC_UNAVAILABLE, 504: GRPC_UNAVAILABLE}

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
_MESSAGE_LIMIT = 200  # bytes of detail in a grpc-message or an HTTP/2 body


def http_status(code: str) -> int:
    return ANSWERS.get(code, _INTERNAL).status


def grpc_for_http(status: int) -> int:
    """The gRPC status a client derives from HTTP `status`, as gRPC's own mapping table says."""
    return _GRPC_BY_HTTP.get(status, GRPC_UNKNOWN)


def grpc_code(code: str, status: int | None = None) -> int:
    """The gRPC status of error `code`; a status other than the code's own (a fault abort's) maps as gRPC does."""
    answer = ANSWERS.get(code, _INTERNAL)
    if status is not None and status != answer.status:
        return grpc_for_http(status)
    return answer.grpc


class MeshError(Exception):
    """An error the sidecar answers itself; `code` is stable, `status` follows from it.

    `service` names the destination the error is about, where the raiser knows it better
    than the answering connection does (HTTP/2 and gRPC answers name it).
    """

    code = "internal"

    def __init__(self, code: str, detail: str, status: int | None = None, service: str | None = None) -> None:
        super().__init__(detail)
        self.code = code
        self.detail = detail
        self.status = status if status is not None else http_status(code)
        self.service = service


class ProtocolError(MeshError):
    """The peer sent bytes that are not acceptable HTTP/1.1 (raised by proxy.http1)."""


def reason_phrase(status: int) -> bytes:
    return _REASONS.get(status, b"Error")


def _one_line(code: str, detail: str) -> bytes:
    return ("%s: %s" % (code, detail.replace("\r", " ").replace("\n", " "))).encode("utf-8", "replace")


def error_response(code: str, detail: str, status: int | None = None, close: bool = False, request_id: bytes | None = None) -> bytes:
    """The complete HTTP/1.1 response bytes for a sidecar-generated error, with the request's id when known."""
    if status is None:
        status = http_status(code)
    body = _one_line(code, detail) + b"\n"
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


def _percent_encode(text: bytes) -> bytes:
    """grpc-message is percent-encoded: printable ASCII stays, '%' and everything else is %XX."""
    return b"".join(bytes((byte,)) if 0x20 <= byte <= 0x7E and byte != 0x25 else b"%%%02X" % byte for byte in text)


def h2_error_head(code: str, detail: str, status: int, service: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """(response head, body) of a generated error on an HTTP/2 stream that is not gRPC."""
    body = _one_line(code, "%s: %s" % (service, detail))[:_MESSAGE_LIMIT] + b"\n"
    head = [(b":status", b"%d" % status), (b"x-mesh-error", code.encode("ascii")),
            (b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"%d" % len(body))]
    return head, body


def grpc_error_trailers(code: str, detail: str, status: int, service: str) -> tuple[list[tuple[bytes, bytes]], int]:
    """(trailer fields, gRPC status) of a generated error: grpc-status, grpc-message, x-mesh-error."""
    grpc = grpc_code(code, status)
    message = _percent_encode(_one_line(code, "%s: %s" % (service, detail))[:_MESSAGE_LIMIT])
    return [(b"grpc-status", b"%d" % grpc), (b"grpc-message", message), (b"x-mesh-error", code.encode("ascii"))], grpc


def grpc_error_head(code: str, detail: str, status: int, service: str) -> tuple[list[tuple[bytes, bytes]], int]:
    """(trailers-only response head, gRPC status) of a generated error on a gRPC stream.

    Trailers-only with :status 200: a bare HTTP error status would reach the client as a
    vaguer code (gRPC maps 502 and 504 alike to UNAVAILABLE).
    """
    trailers, grpc = grpc_error_trailers(code, detail, status, service)
    return [(b":status", b"200"), (b"content-type", b"application/grpc"), *trailers], grpc
