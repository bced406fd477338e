"""Shared plumbing for the ShopFast demo services: stdlib HTTP serving, upstream calls, tracing.

The services contain no mesh code. They follow the contract every meshctl app follows:

* listen on 127.0.0.1:$PORT and answer ``GET /healthz`` with 200 ``ok``;
* reach upstream ``catalog`` at ``$CATALOG_URL`` (the sidecar's outbound listener when
  meshed, the upstream app itself when wired by hand);
* copy the trace headers of each incoming request onto every outgoing call made while
  handling it, so that the sidecars can stitch the calls into one trace;
* exit 0 on SIGTERM after finishing the requests in flight.

``MESH_SERVICE``, ``MESH_VERSION`` and ``MESH_REPLICA`` are read only to show who answered.

Parts:

* ``Request`` / ``Response``: plain data; a service is a function from one to the other,
  usually a ``Router``.
* ``Upstream``: a tiny JSON client for one ``<NAME>_URL``; transport failures become
  ``UpstreamUnavailable``, replies of any status become an ``UpstreamReply``.
* ``serve()``: runs the service on a ThreadingHTTPServer (HTTP/1.1, keep-alive) until
  SIGTERM or SIGINT, writing one access-log line per request to stdout.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

TRACE_HEADERS = (
    "traceparent",
    "tracestate",
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-request-id",
)
MAX_BODY_BYTES = 1 << 20
UPSTREAM_TIMEOUT_S = 10.0
# Idle keep-alive connections are closed after this long so that their threads end.
IDLE_CONNECTION_TIMEOUT_S = 120.0
DRAIN_TIMEOUT_S = 5.0
# How often the accept loop checks for shutdown; bounds how long SIGTERM takes to act.
SHUTDOWN_POLL_S = 0.1

access_log = logging.getLogger("shopfast.access")
diagnostics = logging.getLogger("shopfast")


class ShopError(Exception):
    """Base of the errors a service turns into a JSON error response with a stable code."""

    code = "internal"
    status = 500


class BadRequest(ShopError):
    code = "bad-request"
    status = 400


class PayloadTooLarge(ShopError):
    code = "body-too-large"
    status = 413


class UpstreamUnavailable(ShopError):
    """No HTTP reply at all from an upstream: refused, reset, timed out."""

    code = "upstream-unavailable"
    status = 502

    def __init__(self, upstream: str, reason: str) -> None:
        super().__init__("%s unreachable: %s" % (upstream, reason))
        self.upstream = upstream
        self.reason = reason


@dataclass(frozen=True)
class Identity:
    """Who is answering, for display: ``cart@v2#0``."""

    service: str
    version: str
    replica: str

    @classmethod
    def from_env(cls, default_service: str, environ: Mapping[str, str] = os.environ) -> Identity:
        return cls(
            service=environ.get("MESH_SERVICE") or default_service,
            version=environ.get("MESH_VERSION") or "v1",
            replica=environ.get("MESH_REPLICA") or "0",
        )

    def as_dict(self) -> dict[str, str]:
        return {"service": self.service, "version": self.version, "replica": self.replica}

    def __str__(self) -> str:
        return "%s@%s#%s" % (self.service, self.version, self.replica)


def propagated_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The trace headers of an incoming request, to copy onto the calls it causes."""
    return {name: headers[name] for name in TRACE_HEADERS if name in headers}


def trace_label(headers: Mapping[str, str]) -> str:
    """What ties a log line to its trace: the W3C or B3 trace id, else the whole request id
    (a mesh's ids may share a per-proxy prefix, so no shortening there)."""
    parts = headers.get("traceparent", "").split("-")
    trace_id = parts[1] if len(parts) >= 2 else ""
    trace_id = trace_id or headers.get("x-b3-traceid") or headers.get("b3", "").split("-")[0]
    if trace_id:
        return "trace=" + trace_id[:8]
    request_id = headers.get("x-request-id", "")
    return "rid=" + request_id[:36] if request_id else ""


@dataclass(frozen=True)
class Request:
    method: str
    path: str  # without the query string
    query: Mapping[str, str]  # first value of each parameter
    headers: Mapping[str, str]  # names lower-cased
    body: bytes = b""

    @classmethod
    def build(cls, method: str, target: str, headers: Mapping[str, str], body: bytes) -> Request:
        split = urllib.parse.urlsplit(target)
        query = {key: values[0] for key, values in urllib.parse.parse_qs(split.query).items()}
        lowered = {name.lower(): value for name, value in headers.items()}
        return cls(method, split.path or "/", query, lowered, body)

    def json(self) -> Any:
        try:
            return json.loads(self.body or b"null")
        except ValueError as exc:
            raise BadRequest("body is not valid JSON: %s" % exc) from exc

    def form(self) -> dict[str, str]:
        pairs = urllib.parse.parse_qs(self.body.decode("utf-8", "replace"))
        return {key: values[0] for key, values in pairs.items()}

    def cookie(self, name: str) -> str | None:
        jar = SimpleCookie()
        try:
            jar.load(self.headers.get("cookie", ""))
        except CookieError:
            return None
        morsel = jar.get(name)
        return morsel.value if morsel else None

    def trace_headers(self) -> dict[str, str]:
        return propagated_headers(self.headers)


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: tuple[tuple[str, str], ...] = ()


def json_response(status: int, payload: Any, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()
    return Response(status, body, "application/json", headers)


def text_response(status: int, text: str) -> Response:
    return Response(status, text.encode(), "text/plain; charset=utf-8")


def html_response(status: int, html: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, html.encode(), "text/html; charset=utf-8", headers)


def redirect(location: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(303, b"", "text/plain", (("Location", location), *headers))


def error_response(
    status: int, code: str, message: str, /, *, headers: tuple[tuple[str, str], ...] = (), **details: Any
) -> Response:
    return json_response(status, {"error": code, "message": message, **details}, headers)


@dataclass(frozen=True)
class UpstreamReply:
    upstream: str
    status: int
    data: Any  # the decoded JSON body, or {"message": text} for a non-JSON body
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def failed(self) -> bool:
        """A server-side failure: the caller should report it as a bad gateway."""
        return self.status >= 500

    def failure_detail(self) -> dict[str, Any]:
        detail: dict[str, Any] = {"upstream": self.upstream, "upstream_status": self.status}
        if self.headers.get("x-mesh-error"):
            detail["mesh_error"] = self.headers["x-mesh-error"]
        if isinstance(self.data, dict):
            detail["detail"] = self.data
        return detail

    def relay(self) -> Response:
        """Pass a reply through to our caller; an upstream 5xx becomes our 502."""
        if self.failed:
            return error_response(
                502, "upstream-failed", "%s answered %d" % (self.upstream, self.status), **self.failure_detail()
            )
        return json_response(self.status, self.data)


class Upstream:
    """JSON over HTTP/1.1 to one upstream, one short-lived connection per call."""

    def __init__(self, name: str, base_url: str) -> None:
        split = urllib.parse.urlsplit(base_url)
        if split.scheme != "http" or not split.hostname:
            raise ValueError("%s: expected an http:// URL, got %r" % (name, base_url))
        self.name = name
        self.host = split.hostname
        self.port = split.port or 80
        self.base_path = split.path.rstrip("/")

    def __repr__(self) -> str:
        return "<Upstream %s http://%s:%d%s>" % (self.name, self.host, self.port, self.base_path)

    def call(
        self,
        method: str,
        path: str,
        *,
        cause: Request,
        payload: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> UpstreamReply:
        """Send one request made while handling `cause`, whose trace headers it carries."""
        outgoing = {"accept": "application/json", **cause.trace_headers(), **(headers or {})}
        body = None
        if payload is not None:
            body = json.dumps(payload).encode()
            outgoing["content-type"] = "application/json"
        connection = http.client.HTTPConnection(self.host, self.port, timeout=UPSTREAM_TIMEOUT_S)
        try:
            connection.request(method, self.base_path + path, body=body, headers=outgoing)
            response = connection.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise UpstreamUnavailable(self.name, str(exc) or type(exc).__name__) from exc
        finally:
            connection.close()
        reply_headers = {name.lower(): value for name, value in response.getheaders()}
        return UpstreamReply(self.name, response.status, _decode_body(raw, reply_headers), reply_headers)


def _decode_body(raw: bytes, headers: Mapping[str, str]) -> Any:
    if "json" in headers.get("content-type", ""):
        try:
            return json.loads(raw)
        except ValueError:
            pass
    return {"message": raw.decode("utf-8", "replace").strip()[:300]}


def upstream_env_var(name: str) -> str:
    return name.upper().replace("-", "_") + "_URL"


def upstreams_from_env(names: tuple[str, ...], environ: Mapping[str, str] = os.environ) -> dict[str, Upstream]:
    """The configured upstreams; exits with a usage message when a variable is missing."""
    missing = [upstream_env_var(name) for name in names if not environ.get(upstream_env_var(name))]
    if missing:
        sys.exit("missing environment: %s (e.g. %s=http://127.0.0.1:8001)" % (", ".join(missing), missing[0]))
    return {name: Upstream(name, environ[upstream_env_var(name)]) for name in names}


Handler = Callable[..., Response]


class Router:
    """Maps method and path (a regex, named groups become arguments) to a handler."""

    def __init__(self) -> None:
        self._routes: list[tuple[str, re.Pattern[str], Handler]] = []
        self.add("GET", "/healthz", lambda request: text_response(200, "ok"))

    def add(self, method: str, pattern: str, handler: Handler) -> None:
        self._routes.append((method, re.compile(pattern), handler))

    def route(self, method: str, pattern: str) -> Callable[[Handler], Handler]:
        def register(handler: Handler) -> Handler:
            self.add(method, pattern, handler)
            return handler

        return register

    def __call__(self, request: Request) -> Response:
        allowed: list[str] = []
        for method, pattern, handler in self._routes:
            match = pattern.fullmatch(request.path)
            if match is None:
                continue
            if request.method == method or (request.method == "HEAD" and method == "GET"):
                return handler(request, **match.groupdict())
            allowed.append(method)
        if allowed:
            return error_response(
                405,
                "method-not-allowed",
                "%s not allowed on %s" % (request.method, request.path),
                headers=(("Allow", ", ".join(allowed)),),
            )
        return error_response(404, "not-found", "no route for %s %s" % (request.method, request.path))


class InFlight:
    """Counts requests being handled, so that shutdown can wait for them."""

    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition()

    def __enter__(self) -> None:
        with self._idle:
            self._count += 1

    def __exit__(self, *exc_info: object) -> None:
        with self._idle:
            self._count -= 1
            self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout)


class ShopServer(ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections must not hold up exit
    # socketserver's default backlog is 5: when a busy machine delays the accept thread, a
    # burst of new connections from the sidecar overflows it, their SYNs are dropped and
    # retried only after 1 s, past the sidecar's connect timeout (502 upstream-connect-failed).
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], app: Callable[[Request], Response], identity: Identity) -> None:
        self.app = app
        self.identity = identity
        self.in_flight = InFlight()
        super().__init__(address, _ShopRequestHandler)


class _ShopRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = IDLE_CONNECTION_TIMEOUT_S
    # Headers and body go out in separate writes; with Nagle on, a keep-alive client's
    # delayed ACK would stall every response by ~40 ms.
    disable_nagle_algorithm = True
    server: ShopServer

    def do_GET(self) -> None:
        self._dispatch(send_body=True)

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def do_HEAD(self) -> None:
        self._dispatch(send_body=False)

    def log_message(self, format: str, *args: Any) -> None:
        diagnostics.debug(format, *args)

    def _dispatch(self, send_body: bool) -> None:
        started = time.perf_counter()
        with self.server.in_flight:
            request = None
            try:
                request = Request.build(self.command, self.path, dict(self.headers.items()), self._read_body())
                response = self.server.app(request)
            except ShopError as exc:
                response = error_response(exc.status, exc.code, str(exc))
                if request is None:
                    self.close_connection = True  # the body was not read: the stream is out of step
            except Exception:
                diagnostics.exception("%s: unexpected error on %s %s", self.server.identity, self.command, self.path)
                response = error_response(500, "internal", "unexpected error, see the service's log")
            self._write(response, send_body)
        elapsed_ms = (time.perf_counter() - started) * 1000
        label = trace_label(request.headers if request else {})
        access_log.info(
            "%s %s %s %d %.1fms%s",
            self.server.identity,
            self.command,
            self.path,
            response.status,
            elapsed_ms,
            " " + label if label else "",
        )

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked_body()
        declared = self.headers.get("Content-Length")
        if not declared:
            return b""
        try:
            length = int(declared)
        except ValueError as exc:
            raise BadRequest("bad Content-Length %r" % declared) from exc
        if length < 0:
            raise BadRequest("bad Content-Length %r" % declared)
        if length > MAX_BODY_BYTES:
            raise PayloadTooLarge("body of %d bytes exceeds %d" % (length, MAX_BODY_BYTES))
        return self.rfile.read(length)

    def _read_chunked_body(self) -> bytes:
        chunks = []
        total = 0
        while True:
            size_line = self.rfile.readline(1024)
            try:
                size = int(size_line.split(b";")[0].strip(), 16)
            except ValueError as exc:
                raise BadRequest("bad chunk size %r" % size_line) from exc
            if size == 0:
                while self.rfile.readline(65536).strip():
                    pass  # trailers are dropped
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                raise PayloadTooLarge("chunked body exceeds %d bytes" % MAX_BODY_BYTES)
            chunks.append(self.rfile.read(size))
            self.rfile.readline(16)

    def _write(self, response: Response, send_body: bool) -> None:
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        for name, value in response.headers:
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if send_body:
            self.wfile.write(response.body)


def configure_logging() -> None:
    """Access lines on stdout (the mesh collects them as the app's log), diagnostics on stderr."""
    access_handler = logging.StreamHandler(sys.stdout)
    access_handler.setFormatter(logging.Formatter("%(asctime)s.%(msecs)03d %(message)s", "%H:%M:%S"))
    access_log.addHandler(access_handler)
    access_log.setLevel(logging.INFO)
    access_log.propagate = False
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")


def serve(app: Callable[[Request], Response], identity: Identity) -> int:
    """Serve `app` on 127.0.0.1:$PORT until SIGTERM or SIGINT; returns the exit status."""
    configure_logging()
    port = int(os.environ.get("PORT", "0"))
    server = ShopServer(("127.0.0.1", port), app, identity)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    threading.Thread(target=server.serve_forever, args=(SHUTDOWN_POLL_S,), name="http-accept", daemon=True).start()
    diagnostics.info("%s listening on http://127.0.0.1:%d", identity, server.server_port)
    stop.wait()
    server.shutdown()
    server.server_close()
    if not server.in_flight.wait_idle(DRAIN_TIMEOUT_S):
        diagnostics.warning("%s: requests still in flight after %.0fs, exiting", identity, DRAIN_TIMEOUT_S)
    diagnostics.info("%s stopped", identity)
    return 0
