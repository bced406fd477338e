"""Request routing: which version of a service a request goes to, and with which policy.

``Router(service, cfg)`` compiles one ``services.<name>`` block of a config snapshot
(shapes in meshctl/proxy/policy.md) once per snapshot; ``router.route(...)`` then runs per
request and returns a shared, precomputed ``RouteAction``. Routes are tried in order,
the first match wins, and the service-level split comes last.

Matching, as in Istio and the Gateway API:

* path: ``exact``, ``prefix`` (plain string prefix) or ``regex`` (full match, so
  ``"/items/[0-9]+"`` and ``"^/items/[0-9]+$"`` mean the same); a bare string is a prefix;
* methods: any of the listed methods (case-insensitive in the config);
* headers: every listed header must be present and match (``exact``, ``prefix`` or
  ``regex`` full match). The caller passes header names in lower case;
* query: every listed parameter must have the exact value (any of its occurrences).

Both the normalised form written by the agent and the manifest shorthand are accepted:
``path: {prefix: /x}`` or ``{kind: prefix, value: /x}``; ``method: GET`` or
``methods: [GET]``; ``headers: {x-user: {regex: ...}}`` or a list of
``{name, kind, value}``; a route ``version: v2`` means ``split: {v2: 100}``.

A bad block raises ``RouterError`` at construction, its message starting with the key
path (``services.cart.routes[0].split: weights sum to 90``); ``route()`` never raises.
"""

from __future__ import annotations

import bisect
import random
import re
from typing import Any, Callable
from urllib.parse import parse_qsl

from meshctl.proxy.retry import RetryConfigError, RetryPolicy
from meshctl.proxy.compare import compare_spec

DEFAULT_TIMEOUT = None  # no whole-request limit, as in Istio and Linkerd: streams and long polls live on
DEFAULT_STREAM_IDLE_TIMEOUT = 300.0  # Envoy's default: cut only when no byte moved either way for this long
_MATCH_KINDS = ("exact", "prefix", "regex")


class RouterError(ValueError):
    """A service block the sidecar cannot route with; the engine NACKs with the message."""

    code = "config-invalid"


class RouteAction:
    """What to do with a request: the chosen version and the policy of the matched rule.

    Instances are precomputed per (rule, version) and shared by all requests: read them,
    never mutate them.
    """

    __slots__ = ("version", "timeout", "idle_timeout", "retries", "retry_policy", "fault", "mirror", "rule")

    def __init__(
        self,
        version: str,
        timeout: float | None,
        idle_timeout: float | None,
        retries: dict | None,
        retry_policy: RetryPolicy | None,
        fault: dict | None,
        mirror: dict | None,
        rule: int,
    ) -> None:
        self.version = version
        self.timeout = timeout  # None: no limit on the whole request
        self.idle_timeout = idle_timeout  # None: a silent stream is never cut
        self.retries = retries  # the raw block, route's or else the service's
        self.retry_policy = retry_policy  # the same block, validated and compiled
        self.fault = fault
        self.mirror = mirror
        self.rule = rule  # index of the matched route; -1 for the service split

    def __repr__(self) -> str:
        return "RouteAction(version=%r, rule=%d, timeout=%r, idle_timeout=%r)" % (self.version, self.rule, self.timeout, self.idle_timeout)


class _Split:
    """A weighted choice of precomputed actions: bisect on cumulative weights."""

    __slots__ = ("pick",)

    def __init__(self, actions: list[RouteAction], weights: list[float], rng: random.Random) -> None:
        live = [(action, weight) for action, weight in zip(actions, weights) if weight > 0]
        if len(live) == 1:
            only = live[0][0]
            self.pick: Callable[[], RouteAction] = lambda: only
            return
        total = float(sum(weight for _, weight in live))
        cumulative = []
        running = 0.0
        for _, weight in live:
            running += weight
            cumulative.append(running / total)
        cumulative[-1] = 1.0
        choices = [action for action, _ in live]
        last = len(choices) - 1
        draw = rng.random

        def pick() -> RouteAction:
            index = bisect.bisect_right(cumulative, draw())
            return choices[index if index <= last else last]

        self.pick = pick


_Predicate = Callable[[str, str, Any, Any], bool]


class _Rule:
    """One compiled route: predicates over (method, path, query, headers), all must hold.

    `conditions` names each predicate as written (`header x-user exact alice`), for
    `Router.explain`; the hot path never reads it.
    """

    __slots__ = ("predicates", "split", "conditions")

    def __init__(self, predicates: list[tuple[_Predicate, str]], split: _Split) -> None:
        self.predicates = tuple(predicate for predicate, _ in predicates)
        self.conditions = tuple(condition for _, condition in predicates)
        self.split = split


class Router:
    """Routes requests for one upstream service; see the module docstring."""

    __slots__ = ("service", "versions", "needs_request_details", "_rules", "_default")

    def __init__(self, service: str, cfg: dict[str, Any], rng: random.Random | None = None) -> None:
        self.service = service
        prefix = "services.%s" % service
        if not isinstance(cfg, dict):
            raise RouterError("%s: expected a mapping, got %r" % (prefix, cfg))
        rng = rng or random.Random()
        self.versions = _versions(cfg, prefix)
        timeout = _timeout(cfg.get("timeout"), "%s.timeout" % prefix, DEFAULT_TIMEOUT)
        idle = _timeout(cfg.get("stream_idle_timeout"), "%s.stream_idle_timeout" % prefix, DEFAULT_STREAM_IDLE_TIMEOUT)
        retries = cfg.get("retries")
        retry_policy = _retry_policy(retries, "%s.retries" % prefix)
        split = cfg.get("split")
        if split is None:
            split = {self.versions[0]: 100}
        # A live shadow (`meshctl shadow`) is the mirror of every request, whatever route it takes.
        shadow = self._mirror(cfg.get("shadow"), "%s.shadow" % prefix)
        self._default = self._compile_split(split, "%s.split" % prefix, -1, (timeout, idle), retries, retry_policy, None, shadow, rng)

        routes = cfg.get("routes")
        if routes is None:
            routes = []
        if not isinstance(routes, list):
            raise RouterError("%s.routes: expected a list, got %r" % (prefix, routes))
        self._rules: tuple[_Rule, ...] = tuple(
            self._compile_route(route, "%s.routes[%d]" % (prefix, index), index, (timeout, idle), retries, retry_policy, shadow, rng)
            for index, route in enumerate(routes)
        )
        self.needs_request_details = bool(self._rules)

    def route(self, method: str, path: str, query: str = "", headers: dict[str, str] | None = None) -> RouteAction:
        """The action for one request: first matching route, else the service split."""
        if self._rules:
            for rule in self._rules:
                for predicate in rule.predicates:
                    if not predicate(method, path, query, headers):
                        break
                else:
                    return rule.split.pick()
        return self._default.pick()

    def conditions(self, index: int) -> tuple[str, ...]:
        """Rule `index`'s conditions in words (`header x-user exact alice`)."""
        return self._rules[index].conditions if 0 <= index < len(self._rules) else ()

    def explain(self, method: str, path: str, query: str = "", headers: dict[str, str] | None = None) -> tuple[int, list[tuple[int, str]]]:
        """Which rule `route()` matches (-1: the service split) and, for each rule tried
        before it, the first condition that did not hold. Not for the hot path."""
        misses = []
        for index, rule in enumerate(self._rules):
            for predicate, condition in zip(rule.predicates, rule.conditions):
                if not predicate(method, path, query, headers):
                    misses.append((index, condition))
                    break
            else:
                return index, misses
        return -1, misses

    def __repr__(self) -> str:
        return "Router(%r, %d routes, versions=%s)" % (self.service, len(self._rules), ",".join(self.versions))

    def _compile_split(
        self,
        split: Any,
        where: str,
        rule: int,
        timeouts: tuple[float | None, float | None],
        retries: dict | None,
        retry_policy: RetryPolicy | None,
        fault: dict | None,
        mirror: dict | None,
        rng: random.Random,
    ) -> _Split:
        if not isinstance(split, dict) or not split:
            raise RouterError("%s: expected a mapping of version to weight, got %r" % (where, split))
        actions, weights = [], []
        for version, weight in split.items():
            if version not in self.versions:
                raise RouterError(
                    "%s: unknown version %r (service %s has %s)" % (where, version, self.service, ", ".join(self.versions))
                )
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 100:
                raise RouterError("%s.%s: weight must be a number from 0 to 100, got %r" % (where, version, weight))
            actions.append(RouteAction(version, *timeouts, retries, retry_policy, fault, mirror, rule))
            weights.append(weight)
        total = sum(weights)
        if abs(total - 100) > 1e-6:
            raise RouterError("%s: weights sum to %g, not 100" % (where, total))
        return _Split(actions, weights, rng)

    def _compile_route(
        self,
        route: Any,
        where: str,
        index: int,
        service_timeouts: tuple[float | None, float | None],
        service_retries: dict | None,
        service_retry_policy: RetryPolicy | None,
        shadow: dict | None,
        rng: random.Random,
    ) -> _Rule:
        if not isinstance(route, dict):
            raise RouterError("%s: expected a mapping, got %r" % (where, route))
        predicates = _compile_match(route.get("match"), "%s.match" % where)
        timeouts = (
            _timeout(route.get("timeout"), "%s.timeout" % where, service_timeouts[0]),
            _timeout(route.get("stream_idle_timeout"), "%s.stream_idle_timeout" % where, service_timeouts[1]),
        )
        retries = route.get("retries")
        if retries is None:
            retries, retry_policy = service_retries, service_retry_policy
        else:
            retry_policy = _retry_policy(retries, "%s.retries" % where)
        fault = _fault(route.get("fault"), "%s.fault" % where)
        mirror = shadow or self._mirror(route.get("mirror"), "%s.mirror" % where)
        split = route.get("split")
        if split is None and route.get("version") is not None:
            split = {route["version"]: 100}
        if split is None:
            raise RouterError("%s: a route needs a split or a version" % where)
        split_where = "%s.%s" % (where, "split" if "split" in route else "version")
        return _Rule(
            predicates,
            self._compile_split(split, split_where, index, timeouts, retries, retry_policy, fault, mirror, rng),
        )

    def _mirror(self, mirror: Any, where: str) -> dict | None:
        if mirror is None:
            return None
        if not isinstance(mirror, dict):
            raise RouterError("%s: expected a mapping, got %r" % (where, mirror))
        version = mirror.get("version")
        if version not in self.versions:
            raise RouterError("%s.version: unknown version %r (service %s has %s)" % (where, version, self.service, ", ".join(self.versions)))
        try:
            compare = compare_spec(mirror.get("compare"), "%s.compare" % where)
        except ValueError as exc:
            raise RouterError(str(exc)) from None
        return {"version": version, "percent": _percent(mirror.get("percent", 100), "%s.percent" % where), "compare": compare}


def _versions(cfg: dict, prefix: str) -> tuple[str, ...]:
    versions = cfg.get("versions")
    if versions is None:
        # Hand-written configs may leave versions out: take them from the splits.
        seen: dict[str, None] = {}
        routes = cfg.get("routes")
        route_splits = [r.get("split") for r in routes if isinstance(r, dict)] if isinstance(routes, list) else []
        for split in [cfg.get("split"), *route_splits]:
            if isinstance(split, dict):
                seen.update(dict.fromkeys(split))
        versions = list(seen)
    if not isinstance(versions, (list, tuple)) or not versions or not all(isinstance(v, str) for v in versions):
        raise RouterError("%s.versions: expected a non-empty list of version names, got %r" % (prefix, versions))
    return tuple(versions)


def _timeout(value: Any, where: str, default: float | None) -> float | None:
    """Seconds, or None for no limit: 0 switches a limit off (a route can so lift its service's)."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise RouterError("%s: expected a number of seconds, 0 for no limit, got %r" % (where, value))
    return float(value) or None


def _retry_policy(retries: Any, where: str) -> RetryPolicy | None:
    try:
        return RetryPolicy.from_config(retries)
    except RetryConfigError as exc:
        key = "%s.%s" % (where, exc.key) if exc.key else where
        raise RouterError("%s: %s" % (key, exc.reason)) from None


def _percent(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 100:
        raise RouterError("%s: expected a percentage from 0 to 100, got %r" % (where, value))
    return float(value)


def _fault(fault: Any, where: str) -> dict | None:
    if fault is None:
        return None
    if not isinstance(fault, dict):
        raise RouterError("%s: expected a mapping, got %r" % (where, fault))
    delay, abort = fault.get("delay"), fault.get("abort")
    result: dict[str, dict | None] = {"delay": None, "abort": None}
    if delay is not None:
        if not isinstance(delay, dict):
            raise RouterError("%s.delay: expected a mapping, got %r" % (where, delay))
        fixed = delay.get("fixed")
        if isinstance(fixed, bool) or not isinstance(fixed, (int, float)) or fixed < 0:
            raise RouterError("%s.delay.fixed: expected seconds >= 0, got %r" % (where, fixed))
        result["delay"] = {"fixed": float(fixed), "percent": _percent(delay.get("percent", 100), "%s.delay.percent" % where)}
    if abort is not None:
        if not isinstance(abort, dict):
            raise RouterError("%s.abort: expected a mapping, got %r" % (where, abort))
        status = abort.get("status")
        if isinstance(status, bool) or not isinstance(status, int) or not 200 <= status <= 599:
            raise RouterError("%s.abort.status: expected an HTTP status from 200 to 599, got %r" % (where, status))
        result["abort"] = {"status": status, "percent": _percent(abort.get("percent", 100), "%s.abort.percent" % where)}
    if result["delay"] is None and result["abort"] is None:
        return None
    return result


def _kind_and_value(spec: Any, where: str) -> tuple[str, str]:
    """Read ``{kind, value}``, ``{prefix: v}`` style or a bare string (a prefix)."""
    if isinstance(spec, str):
        return "prefix", spec
    if isinstance(spec, dict):
        if "kind" in spec:
            kind, value = spec.get("kind"), spec.get("value")
        else:
            present = [kind for kind in _MATCH_KINDS if kind in spec]
            if len(present) != 1:
                raise RouterError("%s: expected exactly one of exact, prefix, regex, got %r" % (where, spec))
            kind, value = present[0], spec[present[0]]
        if kind not in _MATCH_KINDS:
            raise RouterError("%s.kind: expected exact, prefix or regex, got %r" % (where, kind))
        if not isinstance(value, str):
            raise RouterError("%s.%s: expected a string, got %r" % (where, kind, value))
        return kind, value
    raise RouterError("%s: expected a string or a mapping, got %r" % (where, spec))


def _string_test(kind: str, value: str, where: str) -> Callable[[str], bool]:
    if kind == "exact":
        return value.__eq__
    if kind == "prefix":
        return lambda text: text.startswith(value)
    try:
        compiled = re.compile(value)
    except re.error as exc:
        raise RouterError("%s.regex: invalid regular expression %r: %s" % (where, value, exc)) from None
    fullmatch = compiled.fullmatch
    return lambda text: fullmatch(text) is not None


def _named_specs(specs: Any, where: str, value_means: str) -> list[tuple[str, Any, str]]:
    """Headers or query as (name, spec, where): from a list of {name, ...} or a mapping."""
    if specs is None:
        return []
    if isinstance(specs, dict):
        return [(str(name), spec, "%s.%s" % (where, name)) for name, spec in specs.items()]
    if isinstance(specs, list):
        named = []
        for index, spec in enumerate(specs):
            item_where = "%s[%d]" % (where, index)
            if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
                raise RouterError("%s: expected a mapping with a name, got %r" % (item_where, spec))
            rest = {key: value for key, value in spec.items() if key != "name"}
            named.append((spec["name"], rest["value"] if set(rest) == {"value"} else rest, item_where))
        return named
    raise RouterError("%s: expected a mapping of name to %s, or a list, got %r" % (where, value_means, specs))


def _header_spec(spec: Any, where: str) -> tuple[str, str]:
    if isinstance(spec, str):
        return "exact", spec
    return _kind_and_value(spec, where)


def _compile_match(match: Any, where: str) -> list[tuple[_Predicate, str]]:
    """Each condition of a route's match as (predicate, how it reads)."""
    if match is None:
        return []
    if not isinstance(match, dict):
        raise RouterError("%s: expected a mapping, got %r" % (where, match))
    predicates: list[tuple[_Predicate, str]] = []
    known = {"path", "method", "methods", "headers", "query"}
    unknown = sorted(set(match) - known)
    if unknown:
        raise RouterError("%s.%s: unknown match field (known: %s)" % (where, unknown[0], ", ".join(sorted(known))))

    # Cheapest tests first: a route usually fails on the method or the path.
    methods = match.get("methods", match.get("method"))
    if methods is not None:
        if isinstance(methods, str):
            methods = [methods]
        if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
            raise RouterError("%s.methods: expected a method or a non-empty list of methods, got %r" % (where, methods))
        allowed = frozenset(m.upper() for m in methods)
        predicates.append((lambda method, path, query, headers: method in allowed or method.upper() in allowed,
                           "method in %s" % ", ".join(sorted(allowed))))

    if match.get("path") is not None:
        kind, value = _kind_and_value(match["path"], "%s.path" % where)
        predicates.append((_path_predicate(kind, value, "%s.path" % where), "path %s %s" % (kind, value)))

    for name, spec, item_where in _named_specs(match.get("headers"), "%s.headers" % where, "value"):
        kind, value = _header_spec(spec, item_where)
        predicates.append((_header_predicate(name.lower(), _string_test(kind, value, item_where)),
                           "header %s %s %s" % (name.lower(), kind, value)))

    for name, spec, item_where in _named_specs(match.get("query"), "%s.query" % where, "value"):
        kind, value = _header_spec(spec, item_where)
        predicates.append((_query_predicate(name, _string_test(kind, value, item_where)), "query %s %s %s" % (name, kind, value)))
    return predicates


def _path_predicate(kind: str, value: str, where: str) -> _Predicate:
    if kind == "exact":
        return lambda method, path, query, headers: path == value
    if kind == "prefix":
        return lambda method, path, query, headers: path.startswith(value)
    test = _string_test(kind, value, where)
    return lambda method, path, query, headers: test(path)


def _header_predicate(name: str, test: Callable[[str], bool]) -> _Predicate:
    def predicate(method: str, path: str, query: str, headers: Any) -> bool:
        if not headers:
            return False
        value = headers.get(name)
        return value is not None and test(value)

    return predicate


def _query_predicate(name: str, test: Callable[[str], bool]) -> _Predicate:
    # Parsing a query string costs far more than a substring test, so a name that reads
    # the same percent-encoded rules out most requests before any parsing.
    literal = name if _URL_SAFE.fullmatch(name) else ""

    def predicate(method: str, path: str, query: str, headers: Any) -> bool:
        if not query or (literal and literal not in query):
            return False
        try:
            pairs = parse_qsl(query, keep_blank_values=True)
        except ValueError:
            return False
        return any(key == name and test(value) for key, value in pairs)

    return predicate


_URL_SAFE = re.compile(r"[A-Za-z0-9._~-]+")
