"""The dashboard's HTTP, sans-IO: parse a request head, decide who may in, write responses.

The dashboard serves on 127.0.0.1 only, yet any web page the user opens can make the
browser send requests there, and any local user can connect. So, as Jupyter does, the
server holds a random token and admits only requests that present it:

* `GET /anything?token=T` with the right token is a login: the answer sets an HttpOnly,
  SameSite=Strict cookie holding the token and redirects to the same URL without it, so the
  token leaves the address bar and the history;
* every other request, the event streams included, must carry that cookie: else 401;
* the Host header must name this server (127.0.0.1 or localhost with its port), which
  defeats DNS rebinding; else 403;
* a POST (every change is one) must also come with an Origin of this server: else 403.
  SameSite=Strict already keeps the cookie off cross-site requests; the Origin check is the
  second lock, as the issue asks.

The cookie's name carries the port: cookies are per host, not per port, and two meshes'
dashboards on one host must not overwrite each other's.
"""

from __future__ import annotations

import enum
import hmac
import json
import secrets
from dataclasses import dataclass
from http import HTTPStatus
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

LOCAL_HOSTS = ("127.0.0.1", "localhost")
MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 64 * 1024
TOKEN_BYTES = 32
# What the page may load: only itself. Styles and scripts come from files, never inline.
SECURITY_HEADERS = (
    ("Content-Security-Policy",
     "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
     "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
)


class BadHttp(Exception):
    """A request the dashboard cannot read; answered 400 with this message."""


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased; a repeated header keeps its last value

    @property
    def content_length(self) -> int:
        raw = self.headers.get("content-length", "0")
        if not raw.isdigit():
            raise BadHttp("content-length must be a whole number")
        return int(raw)


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def parse_head(head: bytes) -> Request:
    """The request line and headers of one HTTP/1.x request (the bytes up to the blank line)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise BadHttp("undecodable request") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise BadHttp("expected a request line like GET / HTTP/1.1")
    method, target, _version = parts
    if not target.startswith("/"):
        raise BadHttp("the request target must be a path")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise BadHttp(f"malformed header line {line[:40]!r}")
        headers[name.lower()] = value.strip()
    url = urlsplit(target)
    return Request(method, url.path, dict(parse_qsl(url.query)), headers)


def cookie_name(port: int) -> str:
    return f"meshctl-dashboard-{port}"


def presented_cookie(request: Request, port: int) -> str | None:
    raw = request.headers.get("cookie")
    if not raw:
        return None
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(raw)
    except CookieError:
        return None
    morsel = jar.get(cookie_name(port))
    return morsel.value if morsel is not None else None


def _same(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


class Verdict(enum.Enum):
    ADMIT = "admit"
    LOGIN = "login"  # the right token in the URL: set the cookie, redirect to the clean URL
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"


@dataclass(frozen=True)
class Access:
    verdict: Verdict
    reason: str = ""


def own_origins(port: int) -> tuple[str, ...]:
    return tuple(f"http://{host}:{port}" for host in LOCAL_HOSTS)


def check_access(request: Request, token: str, port: int) -> Access:
    """Whether `request` may be served, following the rules in this module's docstring."""
    if request.headers.get("host") not in tuple(f"{host}:{port}" for host in LOCAL_HOSTS):
        return Access(Verdict.FORBIDDEN, "the Host header must be 127.0.0.1 or localhost with the dashboard's port")
    if request.method == "GET" and "token" in request.query:
        if _same(request.query["token"], token):
            return Access(Verdict.LOGIN)
        return Access(Verdict.UNAUTHORIZED, "wrong token in the URL")
    if not _same(presented_cookie(request, port), token):
        return Access(Verdict.UNAUTHORIZED, "no valid dashboard cookie")
    if request.method not in ("GET", "HEAD") and request.headers.get("origin") not in own_origins(port):
        return Access(Verdict.FORBIDDEN, "a change must come from the dashboard's own page (Origin header)")
    return Access(Verdict.ADMIT)


def clean_location(request: Request) -> str:
    """The URL of a login request without its token, where the browser is sent next."""
    rest = {name: value for name, value in request.query.items() if name != "token"}
    return request.path + ("?" + urlencode(rest) if rest else "")


def login_cookie(token: str, port: int) -> str:
    return f"{cookie_name(port)}={token}; HttpOnly; SameSite=Strict; Path=/"


def response(status: int, body: bytes = b"", content_type: str = "text/plain; charset=utf-8",
             extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    """One complete response; the connection closes after it."""
    head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}", f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}", "Connection: close"]
    head += [f"{name}: {value}" for name, value in (*SECURITY_HEADERS, *extra)]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def json_response(status: int, payload: Any) -> bytes:
    return response(status, json.dumps(payload, separators=(",", ":")).encode(), "application/json")


def error_response(status: int, code: str, message: str) -> bytes:
    return json_response(status, {"ok": False, "error": {"code": code, "message": message}})


def denied_response(access: Access) -> bytes:
    if access.verdict is Verdict.UNAUTHORIZED:
        return error_response(401, "unauthorized", f"{access.reason}: open the URL that `meshctl dashboard` prints")
    return error_response(403, "forbidden", access.reason)


def event_stream_head() -> bytes:
    head = ["HTTP/1.1 200 OK", "Content-Type: text/event-stream; charset=utf-8", "Connection: close",
            "X-Accel-Buffering: no", *(f"{name}: {value}" for name, value in SECURITY_HEADERS)]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1")


def event_frame(kind: str, payload: Any) -> bytes:
    """One server-sent event; JSON never holds a raw newline, so one data line suffices."""
    return b"event: %s\ndata: %s\n\n" % (kind.encode(), json.dumps(payload, separators=(",", ":")).encode())
