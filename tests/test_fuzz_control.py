"""Property tests of the control API against one real, long-running agent.

Random and malformed JSON lines, and requests naming real ops with arbitrary fields, go
to agent.sock. Whatever arrives, the agent answers within a deadline with one JSON line:
a result, or an error object whose code is one of the stable codes of docs/protocols.md
(never `internal`, which means an unexpected exception), and it keeps answering `ping`.
Its file descriptors do not grow with the number of requests.

Left out: `down` (it stops the mesh by design), `certs-rotate` (it works with any
arguments and each run waits for every sidecar to ACK), `logs` with `follow` (it
streams until the client leaves, by design; so do `tap` and `access-logs` with
`follow`), and `scale`/`restart` of the real service
(valid requests that start processes; their argument checking is still fuzzed).

Bounded in `make test`; `HYPOTHESIS_PROFILE=fuzz` (`make fuzz`) runs 30,000 requests
and 10,000 raw lines.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.meshharness import Mesh, alive
from tests.reliability import fd_count

FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
COMMON = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]}
OPS_PROFILE = settings(max_examples=30_000 if FUZZ else 150, **COMMON)
LINES_PROFILE = settings(max_examples=10_000 if FUZZ else 100, **COMMON)

STABLE_CODES = {
    "bad-request", "unknown-op", "manifest-invalid", "mesh-mismatch", "apply-failed", "unknown-service",
    "unknown-version", "unknown-instance", "bad-split", "bad-scale", "rollout-failed", "not-converged",
    "stats-unavailable", "ca-invalid", "rotation-failed", "no-mesh", "unknown-trace",
}
OPS = [
    "ping", "apply", "status", "logs", "route-show", "route-split", "route-set", "route-reset", "diff",
    "proxy-status", "proxy-config", "scale", "restart", "promote", "certs", "import-ca", "policy-check",
    "debug-traffic", "metrics", "stat", "edges", "trace", "traces", "access-logs",
]
FIELDS = [
    "service", "version", "split", "wait", "header", "value", "instance", "replicas", "step", "interval",
    "max_error_rate", "max_p99_ms", "manifest_path", "tail", "cert_pem", "key_pem", "from", "to", "path",
    "method", "traffic", "window", "id", "limit", "ca",
]
ANSWER_TIMEOUT_S = 20.0

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


@st.composite
def requests(draw) -> dict:
    op = draw(st.sampled_from(OPS) | st.text(max_size=12))
    request = {"op": op}
    for name in draw(st.lists(st.sampled_from(FIELDS) | st.text(max_size=8), max_size=6)):
        request[name] = draw(json_values | st.sampled_from(["app", "v1", "v2", "app@v1#0", "ingress", "/", "GET"]))
    if op in ("logs", "access-logs"):
        request["follow"] = False
    if op in ("scale", "restart") and request.get("service") == "app":
        request["service"] = "app-x"  # real scaling and restarts cost seconds each, not a fuzz case
    if op == "apply" and isinstance(request.get("manifest_path"), str):
        request["manifest_path"] = "/nonexistent/" + request["manifest_path"]  # never /dev/zero & co
    return request


@pytest.fixture(scope="module")
def agent(tmp_path_factory):
    mesh = Mesh(tmp_path_factory.mktemp("fuzz-control"))
    try:
        mesh.write_manifest(
            """
            mesh: fuzz
            services:
              app:
                health: {http: /healthz}
                versions: {v1: {command: {PY} {APPS}/echo.py}, v2: {command: {PY} {APPS}/echo.py}}
                split: {v1: 100}
            """
        )
        mesh.up()
        yield mesh
    finally:
        mesh.cleanup()


def exchange(mesh: Mesh, raw: bytes) -> list[dict]:
    """Send raw bytes, half-close, read every answer line until the agent closes."""
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(ANSWER_TIMEOUT_S)
        sock.connect(str(mesh.home / "agent.sock"))
        try:
            sock.sendall(raw)
            sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the agent answered and closed before reading it all
        received = b""
        try:
            while chunk := sock.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
    return [json.loads(line) for line in received.splitlines() if line.strip()]


def check_answer(answers: list[dict], raw: bytes) -> None:
    final = [a for a in answers if "ok" in a]
    assert len(final) <= 1 and all("event" in a for a in answers if "ok" not in a), answers
    if not final:
        assert not raw.strip(), "no answer to %r" % raw[:200]
        return
    answer = final[0]
    if not answer["ok"]:
        error = answer["error"]
        assert error["code"] in STABLE_CODES, (error, raw[:300])
        assert isinstance(error["message"], str) and error["message"]


def still_answers_ping(mesh: Mesh) -> None:
    [answer] = exchange(mesh, b'{"op": "ping"}\n')
    assert answer["ok"] and answer["result"]["mesh"] == "fuzz"


@OPS_PROFILE
@given(requests())
def test_any_request_gets_a_result_or_a_stable_error(agent, request):
    raw = json.dumps(request).encode() + b"\n"
    check_answer(exchange(agent, raw), raw)
    still_answers_ping(agent)


raw_lines = st.one_of(
    st.binary(max_size=200),
    st.text(max_size=200).map(str.encode),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"", b"\n", b"{", b'{"op": 1}', b'{"op": null}', b'{"op": "ping"', b"[]", b'"ping"',
                     b'{"op": "ping"}{"op": "ping"}', b"\xff\xfe", b'{"op": "\\ud800"}', b"NaN", b"1e999999"]),
).flatmap(lambda line: st.sampled_from([line, line + b"\n", line + b"\n" + line]))


@LINES_PROFILE
@given(raw_lines)
def test_malformed_lines_get_a_bad_request_and_the_agent_lives(agent, raw):
    check_answer(exchange(agent, raw), raw)
    still_answers_ping(agent)


def test_an_oversized_line_is_refused_and_the_agent_lives(agent):
    raw = b'{"op": "ping", "pad": "' + b"x" * (2 << 20) + b'"}\n'
    [answer] = exchange(agent, raw)
    assert answer["ok"] is False and answer["error"]["code"] == "bad-request"
    still_answers_ping(agent)


def test_connections_that_send_nothing_or_half_a_line_leave_nothing_behind(agent):
    agent_pid = agent.agent_pid()
    still_answers_ping(agent)
    baseline = fd_count(agent_pid)
    for raw in (b"", b'{"op": "pi', b"\x00" * 1000):
        for _ in range(50):
            check_answer(exchange(agent, raw), raw)
    still_answers_ping(agent)
    assert alive(agent_pid) and fd_count(agent_pid) <= baseline + 2
