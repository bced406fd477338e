"""Two HTTP responses compared field by field: what shadow traffic reports (Diffy's idea).

Pure. A `Response` is what a sidecar kept of one answer: status, headers, and the body
(None when it was larger than what is kept, and then not compared). `differences()`
names every field that differs, as `where -> (primary's value, other's value)`:

* `status`;
* `header:NAME`, names in lower case, repeated fields joined with ", ". Hop-by-hop
  headers, the framing (content-length, transfer-encoding: the body is compared
  itself) and per-request ones (date, x-request-id, trace headers) are never compared;
* `body:$.json.path` for JSON bodies, leaf by leaf (`$.items[0].price`), a key missing
  on one side shown as `(absent)`;
* `body` for anything else: text compared line by line (the first differing line is
  the example), bytes by length and digest.

`Ignore` holds what the user called noise (`--ignore-header`, `--ignore-json`): a JSON
pattern is a path where `[*]` stands for any index and `*` for any key, and it also
covers everything below it (`$.meta` ignores `$.meta.ts`). A `CompareSpec` (a mirror's
validated `compare` setting) says which requests are compared and what is noise.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable
from typing import Any

ALWAYS_IGNORED_HEADERS = frozenset({
    # hop-by-hop and framing
    "connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "transfer-encoding", "content-length",
    # per request
    "date", "x-request-id", "traceparent", "tracestate", "b3", "x-b3-traceid", "x-b3-spanid", "x-b3-parentspanid",
    "x-b3-sampled", "x-b3-flags",
})
MAX_VALUE_CHARS = 120
MAX_JSON_LEAVES = 10_000
MAX_JSON_DEPTH = 32
ABSENT = "(absent)"
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*$")

Where = str
Differences = dict[Where, tuple[str, str]]


class Response:
    """One captured answer; `body` None means it was too large to keep (or is not known),
    `headers` None that they are not known (a recorded answer keeps its status only)."""

    __slots__ = ("status", "headers", "body")

    def __init__(self, status: int, headers: Iterable[tuple[str, str]] | None, body: bytes | None) -> None:
        self.status = status
        self.headers = None if headers is None else list(headers)
        self.body = body

    def __repr__(self) -> str:
        size = "too large" if self.body is None else "%d bytes" % len(self.body)
        return "<Response %d, %s headers, %s>" % (self.status, "?" if self.headers is None else len(self.headers), size)

    def header(self, name: str) -> str | None:
        values = [value for key, value in self.headers or () if key == name]
        return ", ".join(values) if values else None


class Ignore:
    """Header names and JSON path patterns that are noise by the user's say-so."""

    __slots__ = ("headers", "json_patterns", "_json")

    def __init__(self, headers: Iterable[str] = (), json_paths: Iterable[str] = ()) -> None:
        self.headers = ALWAYS_IGNORED_HEADERS | {name.lower() for name in headers}
        self.json_patterns = tuple(json_paths)
        self._json = [_path_pattern(path) for path in self.json_patterns]

    def __repr__(self) -> str:
        return "<Ignore %d headers, json %s>" % (len(self.headers), list(self.json_patterns))

    def ignores_json(self, path: str) -> bool:
        return any(pattern.match(path) for pattern in self._json)


def json_pattern_error(path: str) -> str | None:
    """Why `path` is not a usable --ignore-json pattern, or None when it is."""
    if not path or not (path.startswith("$") or _IDENTIFIER.match(path.split(".")[0].split("[")[0])):
        return "%r: expected a JSON path such as $.ts, $.items[*].id or meta.generated_at" % path
    return None


def _path_pattern(path: str) -> re.Pattern[str]:
    if not path.startswith("$"):
        path = "$." + path
    pattern = re.escape(path).replace(r"\[\*\]", r"\[\d+\]").replace(r"\.\*", r"\.[^.\[]+")
    return re.compile("^" + pattern + r"(?:[.\[].*)?$", re.DOTALL)


def differences(primary: Response, other: Response, ignore: Ignore) -> Differences:
    """Every field where `other` differs from `primary`, with both values (shortened)."""
    found: Differences = {}
    if primary.status != other.status:
        found["status"] = (str(primary.status), str(other.status))
    known = primary.headers is not None and other.headers is not None
    names = {name for name, _ in primary.headers or ()} | {name for name, _ in other.headers or ()} if known else set()
    for name in sorted(names - ignore.headers):
        mine, theirs = primary.header(name), other.header(name)
        if mine != theirs:
            found["header:" + name] = (_short(mine), _short(theirs))
    if primary.body is not None and other.body is not None and primary.body != other.body:
        found.update(_body_differences(primary, other, ignore))
    return found


def _body_differences(primary: Response, other: Response, ignore: Ignore) -> Differences:
    mine, theirs = _json_of(primary), _json_of(other)
    if mine is not _NOT_JSON and theirs is not _NOT_JSON:
        left, right = _leaves(mine), _leaves(theirs)
        found = {}
        for path in sorted(left.keys() | right.keys(), key=_path_order(left, right)):
            a, b = left.get(path, ABSENT), right.get(path, ABSENT)
            if a != b and not ignore.ignores_json(path):
                found["body:" + path] = (a, b)
        return found
    return {"body": _text_difference(primary.body or b"", other.body or b"")}  # both known: differences() checked


_NOT_JSON = object()


def _json_of(response: Response) -> Any:
    body = response.body or b""
    content_type = (response.header("content-type") or "").lower()
    if "json" not in content_type and body.lstrip()[:1] not in (b"{", b"["):
        return _NOT_JSON
    try:
        return json.loads(body)
    except ValueError:
        return _NOT_JSON


def _leaves(value: Any) -> dict[str, str]:
    """JSON path -> the leaf's JSON text; an empty container is a leaf ({} or [])."""
    out: dict[str, str] = {}
    stack: list[tuple[str, Any, int]] = [("$", value, 0)]
    while stack and len(out) < MAX_JSON_LEAVES:
        path, node, depth = stack.pop()
        if isinstance(node, dict) and node and depth < MAX_JSON_DEPTH:
            for key in reversed(list(node)):
                step = "." + key if _IDENTIFIER.match(key) else "[%s]" % json.dumps(key)
                stack.append((path + step, node[key], depth + 1))
        elif isinstance(node, list) and node and depth < MAX_JSON_DEPTH:
            for index in range(len(node) - 1, -1, -1):
                stack.append(("%s[%d]" % (path, index), node[index], depth + 1))
        else:
            out[path] = _short(json.dumps(node, sort_keys=True))
    return out


def _path_order(left: dict[str, str], right: dict[str, str]) -> Callable[[str], int]:
    """Paths in document order: the primary's first, then those only the other has."""
    order = {path: index for index, path in enumerate([*left, *(p for p in right if p not in left)])}
    return order.__getitem__


def _text_difference(mine: bytes, theirs: bytes) -> tuple[str, str]:
    try:
        left, right = mine.decode("utf-8").splitlines(), theirs.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        return (_digest(mine), _digest(theirs))
    for number in range(max(len(left), len(right))):
        a = left[number] if number < len(left) else ABSENT
        b = right[number] if number < len(right) else ABSENT
        if a != b:
            return (_short("line %d: %s" % (number + 1, a)), _short("line %d: %s" % (number + 1, b)))
    return (_short("%d lines" % len(left)), _short("%d lines (line endings differ)" % len(right)))


def _digest(data: bytes) -> str:
    return "%d bytes sha256:%s" % (len(data), hashlib.sha256(data).hexdigest()[:12])


def _short(value: str | None) -> str:
    if value is None:
        return ABSENT
    return value if len(value) <= MAX_VALUE_CHARS else value[: MAX_VALUE_CHARS - 1] + "…"


# -- which requests are compared ------------------------------------------------------------

UNSAFE_METHODS = frozenset({b"POST", b"PUT", b"PATCH", b"DELETE"})
DEFAULT_REFERENCE_PERCENT = 25.0


class CompareSpec:
    """The validated `compare` part of a mirror: which requests, and what is noise."""

    __slots__ = ("unsafe", "path_prefix", "ignore", "reference_percent", "live")

    def __init__(self, unsafe: bool, path_prefix: bytes, ignore: Ignore, reference_percent: float, live: bool = False) -> None:
        self.live = live  # from `meshctl shadow` rather than the manifest: the agent keeps them apart
        self.unsafe = unsafe
        self.path_prefix = path_prefix
        self.ignore = ignore
        self.reference_percent = reference_percent

    def __repr__(self) -> str:
        return "<CompareSpec%s path %r %r>" % (" unsafe" if self.unsafe else "", self.path_prefix, self.ignore)

    def wants(self, method: bytes, target: bytes) -> bool:
        if method in UNSAFE_METHODS and not self.unsafe:
            return False
        return target.startswith(self.path_prefix)


def compare_spec(raw: Any, where: str) -> CompareSpec | None:
    """A mirror's `compare` value (true, false/absent, or a mapping) as a CompareSpec."""
    if raw is None or raw is False:
        return None
    if raw is True:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError("%s: expected true or a mapping, got %r" % (where, raw))
    path = raw.get("path") or "/"
    headers = raw.get("ignore_headers") or []
    json_paths = raw.get("ignore_json") or []
    reference = raw.get("reference_percent", DEFAULT_REFERENCE_PERCENT)
    if not isinstance(path, str) or not path.startswith("/"):
        raise ValueError("%s.path: expected a path prefix starting with /, got %r" % (where, path))
    if not all(isinstance(h, str) for h in headers) or not all(isinstance(p, str) for p in json_paths):
        raise ValueError("%s: ignore_headers and ignore_json are lists of strings" % where)
    if isinstance(reference, bool) or not isinstance(reference, (int, float)) or not 0 <= reference <= 100:
        raise ValueError("%s.reference_percent: expected a number from 0 to 100, got %r" % (where, reference))
    return CompareSpec(raw.get("unsafe") is True, path.encode("latin-1"), Ignore(headers, json_paths), float(reference),
                       raw.get("live") is True)
