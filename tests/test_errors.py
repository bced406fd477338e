"""proxy.errors: one answer per generated error, for HTTP/1.1, HTTP/2 and gRPC clients alike."""

import pytest

from meshctl.proxy.errors import ANSWERS, MeshError, error_response, grpc_code, grpc_error_head, h2_error_head


@pytest.mark.parametrize(
    ("code", "status", "grpc"),
    [
        ("forbidden", 403, 7),
        ("egress-denied", 403, 7),
        ("route-not-found", 404, 12),
        ("timeout", 504, 4),
        ("no-healthy-endpoints", 503, 14),
        ("circuit-open", 503, 14),
        ("upstream-connect-failed", 502, 14),
        ("upstream-reset", 502, 14),
        ("body-too-large", 413, 8),
        ("header-too-large", 431, 8),
        ("bad-request", 400, 13),
    ],
)
def test_each_code_has_one_http_and_one_grpc_status(code, status, grpc):
    assert (ANSWERS[code].status, ANSWERS[code].grpc) == (status, grpc)
    assert MeshError(code, "x").status == status
    assert error_response(code, "x").startswith(b"HTTP/1.1 %d " % status)
    head, grpc_status = grpc_error_head(code, "x", status, "svc")
    assert grpc_status == grpc and (b"grpc-status", b"%d" % grpc) in head and (b"x-mesh-error", code.encode()) in head
    head, _ = h2_error_head(code, "x", status, "svc")
    assert (b":status", b"%d" % status) in head


@pytest.mark.parametrize(("status", "grpc"), [(403, 7), (404, 12), (429, 14), (503, 14), (504, 14), (400, 13), (401, 16), (418, 2), (500, 2)])
def test_a_fault_abort_maps_its_status_as_grpc_does(status, grpc):
    assert grpc_code("fault-abort", status) == grpc


def test_unknown_code_is_internal():
    assert MeshError("no-such-code", "x").status == 500 and grpc_code("no-such-code") == 13


def test_grpc_message_names_code_and_service_and_is_percent_encoded():
    head, _ = grpc_error_head("forbidden", "caf\u00e9 100% denied\r\nnext", 403, "cart")
    message = dict(head)[b"grpc-message"]
    assert message == b"forbidden: cart: caf%C3%A9 100%25 denied  next"
    assert dict(head)[b":status"] == b"200" and dict(head)[b"content-type"] == b"application/grpc"
