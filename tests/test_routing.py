"""Pure unit tests of proxy.routing: matching, splits, per-route policy, config errors."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshctl.proxy.retry import RetryPolicy
from meshctl.proxy.routing import DEFAULT_TIMEOUT, RouteAction, Router, RouterError

VERSIONS = ["v1", "v2", "v3"]


def service(*routes: dict, split: dict | None = None, **extra) -> dict:
    cfg = {"versions": VERSIONS, "split": split or {"v1": 100}, "routes": list(routes)}
    cfg.update(extra)
    return cfg


def to(version: str, match: dict | None, **extra) -> dict:
    return {"match": match, "split": {version: 100}, **extra}


# Each case: one route to v2 with this match, then a request; expected version.
MATCH_CASES = [
    # path, normalised form
    ({"path": {"kind": "exact", "value": "/a"}}, ("GET", "/a", "", None), "v2"),
    ({"path": {"kind": "exact", "value": "/a"}}, ("GET", "/a/b", "", None), "v1"),
    ({"path": {"kind": "prefix", "value": "/api"}}, ("GET", "/api/items", "", None), "v2"),
    ({"path": {"kind": "prefix", "value": "/api"}}, ("GET", "/ap", "", None), "v1"),
    ({"path": {"kind": "regex", "value": "^/items/[0-9]+$"}}, ("GET", "/items/42", "", None), "v2"),
    ({"path": {"kind": "regex", "value": "/items/[0-9]+"}}, ("GET", "/items/42/x", "", None), "v1"),
    ({"path": None}, ("GET", "/anything", "", None), "v2"),
    # path, manifest shorthand
    ({"path": {"exact": "/a"}}, ("GET", "/a", "", None), "v2"),
    ({"path": {"prefix": "/api"}}, ("POST", "/api", "", None), "v2"),
    ({"path": {"regex": "/x[0-9]"}}, ("GET", "/x7", "", None), "v2"),
    ({"path": "/api"}, ("GET", "/api/v1", "", None), "v2"),
    # methods
    ({"methods": ["GET", "HEAD"]}, ("HEAD", "/", "", None), "v2"),
    ({"methods": ["GET", "HEAD"]}, ("POST", "/", "", None), "v1"),
    ({"method": "post"}, ("POST", "/", "", None), "v2"),
    ({"methods": None}, ("DELETE", "/", "", None), "v2"),
    # headers, normalised form
    ({"headers": [{"name": "x-canary", "kind": "exact", "value": "true"}]}, ("GET", "/", "", {"x-canary": "true"}), "v2"),
    ({"headers": [{"name": "x-canary", "kind": "exact", "value": "true"}]}, ("GET", "/", "", {"x-canary": "yes"}), "v1"),
    ({"headers": [{"name": "x-canary", "kind": "exact", "value": "true"}]}, ("GET", "/", "", None), "v1"),
    ({"headers": [{"name": "x-canary", "kind": "exact", "value": "true"}]}, ("GET", "/", "", {}), "v1"),
    ({"headers": [{"name": "user-agent", "kind": "prefix", "value": "curl/"}]}, ("GET", "/", "", {"user-agent": "curl/8"}), "v2"),
    ({"headers": [{"name": "x-user", "kind": "regex", "value": "u[0-4]"}]}, ("GET", "/", "", {"x-user": "u3"}), "v2"),
    ({"headers": [{"name": "x-user", "kind": "regex", "value": "u[0-4]"}]}, ("GET", "/", "", {"x-user": "u37"}), "v1"),
    ({"headers": [{"name": "x-user", "regex": "u[0-4]"}]}, ("GET", "/", "", {"x-user": "u3"}), "v2"),
    ({"headers": [{"name": "x-user", "value": "u3"}]}, ("GET", "/", "", {"x-user": "u3"}), "v2"),
    # headers, shorthand; names match case-insensitively from the config side
    ({"headers": {"X-Canary": "true"}}, ("GET", "/", "", {"x-canary": "true"}), "v2"),
    ({"headers": {"x-user": {"regex": "a.*"}}}, ("GET", "/", "", {"x-user": "alice"}), "v2"),
    ({"headers": {"x-user": {"prefix": "b"}}}, ("GET", "/", "", {"x-user": "alice"}), "v1"),
    ({"headers": {"a": "1", "b": "2"}}, ("GET", "/", "", {"a": "1"}), "v1"),
    ({"headers": {"a": "1", "b": "2"}}, ("GET", "/", "", {"a": "1", "b": "2"}), "v2"),
    # query
    ({"query": [{"name": "beta", "value": "1"}]}, ("GET", "/", "beta=1", None), "v2"),
    ({"query": [{"name": "beta", "value": "1"}]}, ("GET", "/", "beta=2", None), "v1"),
    ({"query": {"beta": "1"}}, ("GET", "/", "a=b&beta=2&beta=1", None), "v2"),
    ({"query": {"beta": "1"}}, ("GET", "/", "", None), "v1"),
    ({"query": {"q": "a b"}}, ("GET", "/", "q=a+b", None), "v2"),
    ({"query": {"flag": ""}}, ("GET", "/", "flag", None), "v2"),
    ({"query": {"a b": "1"}}, ("GET", "/", "a%20b=1", None), "v2"),
    ({"query": {"a b": "1"}}, ("GET", "/", "a+b=1", None), "v2"),
    ({"query": {"beta": {"regex": "[0-9]+"}}}, ("GET", "/", "beta=42", None), "v2"),
    ({"query": {"beta": "1"}}, ("GET", "/", "alphabeta=1", None), "v1"),
    # every condition must hold
    ({"path": {"prefix": "/api"}, "method": "GET", "headers": {"x-canary": "1"}, "query": {"b": "1"}}, ("GET", "/api", "b=1", {"x-canary": "1"}), "v2"),
    ({"path": {"prefix": "/api"}, "method": "GET", "headers": {"x-canary": "1"}, "query": {"b": "1"}}, ("GET", "/api", "b=1", {"x-canary": "0"}), "v1"),
    ({"path": {"prefix": "/api"}, "method": "GET", "headers": {"x-canary": "1"}, "query": {"b": "1"}}, ("PUT", "/api", "b=1", {"x-canary": "1"}), "v1"),
]


@pytest.mark.parametrize(("match", "request_", "expected"), MATCH_CASES)
def test_match(match, request_, expected):
    router = Router("cart", service(to("v2", match)))
    action = router.route(*request_)
    assert action.version == expected
    assert action.rule == (0 if expected == "v2" else -1)


def test_first_match_wins_and_service_split_comes_last():
    router = Router(
        "cart",
        service(
            to("v2", {"path": {"prefix": "/api/admin"}}),
            to("v3", {"path": {"prefix": "/api"}}),
            to("v2", {"path": {"prefix": "/api/items"}}),
        ),
    )
    assert (router.route("GET", "/api/admin/x").version, router.route("GET", "/api/admin/x").rule) == ("v2", 0)
    assert (router.route("GET", "/api/items").version, router.route("GET", "/api/items").rule) == ("v3", 1)
    assert (router.route("GET", "/home").version, router.route("GET", "/home").rule) == ("v1", -1)


def test_no_routes_needs_no_request_details():
    plain = Router("cart", service())
    assert plain.needs_request_details is False
    assert plain.route("GET", "/").version == "v1"
    assert Router("cart", service(to("v2", None))).needs_request_details is True


def test_defaults_when_keys_are_missing():
    router = Router("cart", {"versions": ["v1", "v2"]})
    action = router.route("GET", "/")
    assert (action.version, action.timeout, action.retries, action.fault, action.mirror) == ("v1", DEFAULT_TIMEOUT, None, None, None)
    # Hand-written configs may leave the version list out.
    assert Router("cart", {"split": {"a": 50, "b": 50}}).versions == ("a", "b")


def test_route_policy_overrides_service_policy():
    service_retries = {"attempts": 3, "retry_on": ["5xx"]}
    route_retries = {"attempts": 2, "retry_on": ["reset"]}
    router = Router(
        "cart",
        service(
            to("v2", {"path": {"prefix": "/slow"}}, timeout=30.0, retries=route_retries),
            to("v2", {"path": {"prefix": "/inherit"}}, retries=None),
            timeout=2.0,
            retries=service_retries,
        ),
    )
    slow = router.route("GET", "/slow")
    assert (slow.timeout, slow.retries) == (30.0, route_retries)
    assert isinstance(slow.retry_policy, RetryPolicy) and slow.retry_policy.attempts == 2
    inherit = router.route("GET", "/inherit")
    assert (inherit.timeout, inherit.retries) == (2.0, service_retries)
    assert inherit.retry_policy.retry_on == frozenset({"5xx"})
    default = router.route("GET", "/")
    assert (default.timeout, default.retries, default.rule) == (2.0, service_retries, -1)


def test_no_whole_request_timeout_by_default_and_a_five_minute_stream_idle_timeout():
    action = Router("cart", service()).route("GET", "/")
    assert (action.timeout, action.idle_timeout) == (None, 300.0)


def test_zero_lifts_a_timeout_and_routes_inherit_the_stream_idle_timeout():
    router = Router(
        "cart",
        service(
            to("v2", {"path": {"prefix": "/events"}}, timeout=0, stream_idle_timeout=0),
            to("v2", {"path": {"prefix": "/watch"}}, stream_idle_timeout=3600.0),
            to("v2", {"path": {"prefix": "/inherit"}}),
            timeout=2.0,
            stream_idle_timeout=30.0,
        ),
    )
    assert (router.route("GET", "/events").timeout, router.route("GET", "/events").idle_timeout) == (None, None)
    assert (router.route("GET", "/watch").timeout, router.route("GET", "/watch").idle_timeout) == (2.0, 3600.0)
    assert (router.route("GET", "/inherit").timeout, router.route("GET", "/inherit").idle_timeout) == (2.0, 30.0)
    with pytest.raises(RouterError, match=r"^services.cart.stream_idle_timeout: expected a number of seconds"):
        Router("cart", service(stream_idle_timeout="5m"))


def test_fault_and_mirror_are_normalised():
    router = Router(
        "cart",
        service(
            to(
                "v1",
                None,
                fault={"delay": {"fixed": 0.1, "percent": 10}, "abort": {"status": 503, "percent": 5}},
                mirror={"version": "v2", "percent": 10},
            )
        ),
    )
    action = router.route("GET", "/")
    assert action.fault == {"delay": {"fixed": 0.1, "percent": 10.0}, "abort": {"status": 503, "percent": 5.0}}
    assert action.mirror == {"version": "v2", "percent": 10.0, "compare": None}


def test_a_shadow_is_the_mirror_of_every_route_with_its_comparison():
    cfg = service(to("v1", None, mirror={"version": "v1", "percent": 5}))
    cfg["shadow"] = {"version": "v2", "percent": 50, "compare": {"path": "/api", "ignore_json": ["$.ts"]}}
    router = Router("cart", cfg)
    for action in (router.route("GET", "/"), router.route("GET", "/other")):
        assert action.mirror["version"] == "v2" and action.mirror["percent"] == 50.0
        assert action.mirror["compare"].path_prefix == b"/api" and action.mirror["compare"].ignore.json_patterns == ("$.ts",)


def test_a_bad_comparison_names_its_key():
    with pytest.raises(RouterError, match=r"services.cart.routes\[0\].mirror.compare.path: expected a path prefix"):
        Router("cart", service(to("v1", None, mirror={"version": "v2", "compare": {"path": "x"}})))


def test_route_version_shorthand():
    router = Router("cart", service({"match": {"headers": {"x-canary": "1"}}, "version": "v3"}))
    assert router.route("GET", "/", "", {"x-canary": "1"}).version == "v3"


def test_actions_are_shared_not_rebuilt():
    router = Router("cart", service())
    assert router.route("GET", "/a") is router.route("POST", "/b")
    assert isinstance(router.route("GET", "/"), RouteAction)


@pytest.mark.parametrize(
    ("weights", "seed"),
    [({"v1": 90, "v2": 10}, 1), ({"v1": 50, "v2": 50}, 2), ({"v1": 34, "v2": 33, "v3": 33}, 3), ({"v1": 1, "v2": 99}, 4)],
)
def test_split_distribution_within_two_points(weights, seed):
    router = Router("cart", service(split=weights), rng=random.Random(seed))
    picks = Counter(router.route("GET", "/").version for _ in range(10_000))
    for version, weight in weights.items():
        assert abs(picks[version] / 100.0 - weight) < 2.0, (version, picks)


def test_route_split_distribution_within_two_points():
    router = Router("cart", service({"match": None, "split": {"v2": 80, "v3": 20}}), rng=random.Random(7))
    picks = Counter(router.route("GET", "/").version for _ in range(10_000))
    assert abs(picks["v2"] / 100.0 - 80) < 2.0 and abs(picks["v3"] / 100.0 - 20) < 2.0


def test_zero_weight_version_never_picked():
    router = Router("cart", service(split={"v1": 100, "v2": 0}), rng=random.Random(5))
    assert {router.route("GET", "/").version for _ in range(1000)} == {"v1"}


BAD_CONFIGS = [
    ({"versions": VERSIONS, "split": {"v1": 90}}, "services.cart.split: weights sum to 90"),
    ({"versions": VERSIONS, "split": {"v1": 60, "v2": 60}}, "services.cart.split: weights sum to 120"),
    ({"versions": VERSIONS, "split": {"v9": 100}}, "services.cart.split: unknown version 'v9'"),
    ({"versions": VERSIONS, "split": {"v1": -5, "v2": 105}}, "services.cart.split.v1: weight must be"),
    ({"versions": VERSIONS, "split": {"v1": "100"}}, "services.cart.split.v1: weight must be"),
    ({"versions": VERSIONS, "split": []}, "services.cart.split: expected a mapping"),
    ({"versions": []}, "services.cart.versions: expected a non-empty list"),
    (service(to("v2", {"path": {"regex": "("}})), "services.cart.routes[0].match.path.regex: invalid regular expression"),
    (service(to("v2", None), to("v2", {"headers": {"x": {"regex": "[a"}}})), "services.cart.routes[1].match.headers.x.regex: invalid"),
    (service({"match": None, "split": {"v1": 50, "v2": 40}}), "services.cart.routes[0].split: weights sum to 90"),
    (service({"match": None, "version": "v7"}), "services.cart.routes[0].version: unknown version 'v7'"),
    (service({"match": None}), "services.cart.routes[0]: a route needs a split or a version"),
    (service(to("v2", {"path": {"kind": "glob", "value": "/x"}})), "services.cart.routes[0].match.path.kind: expected exact, prefix or regex"),
    (service(to("v2", {"path": {"prefix": "/a", "exact": "/b"}})), "services.cart.routes[0].match.path: expected exactly one"),
    (service(to("v2", {"host": "x"})), "services.cart.routes[0].match.host: unknown match field"),
    (service(to("v2", {"methods": []})), "services.cart.routes[0].match.methods: expected a method"),
    (service(to("v2", {"headers": [{"kind": "exact", "value": "1"}]})), "services.cart.routes[0].match.headers[0]: expected a mapping with a name"),
    (service(to("v2", None, timeout=-1)), "services.cart.routes[0].timeout: expected a number of seconds, 0 for no limit"),
    (service(to("v2", None, retries={"attempts": 0})), "services.cart.routes[0].retries.attempts: expected an integer >= 1"),
    (service(to("v2", None, retries={"retry_on": ["sometimes"]})), "services.cart.routes[0].retries.retry_on: unknown condition 'sometimes'"),
    (service(retries="yes"), "services.cart.retries: expected a mapping"),
    (service(to("v2", None, fault={"abort": {"status": 99}})), "services.cart.routes[0].fault.abort.status: expected an HTTP status"),
    (service(to("v2", None, fault={"delay": {"fixed": 0.1, "percent": 101}})), "services.cart.routes[0].fault.delay.percent: expected a percentage"),
    (service(to("v2", None, mirror={"version": "v9"})), "services.cart.routes[0].mirror.version: unknown version 'v9'"),
    (service(routes=None) | {"routes": {"a": 1}}, "services.cart.routes: expected a list"),
    ([], "services.cart: expected a mapping"),
]


@pytest.mark.parametrize(("cfg", "message"), BAD_CONFIGS)
def test_bad_config_names_the_key(cfg, message):
    with pytest.raises(RouterError) as caught:
        Router("cart", cfg)
    assert str(caught.value).startswith(message)
    assert isinstance(caught.value, ValueError) and caught.value.code == "config-invalid"


ROUTER = Router(
    "cart",
    service(
        to("v2", {"path": {"regex": "^/items/[0-9]+$"}, "methods": ["GET"]}),
        to("v2", {"headers": [{"name": "x-user", "kind": "regex", "value": "(a|b)+c"}]}),
        to("v3", {"headers": {"cookie": {"prefix": "s="}}, "query": {"beta": {"regex": ".*1"}}}),
        split={"v1": 50, "v2": 50},
    ),
)

text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40) | st.text(max_size=40)


@settings(max_examples=300, deadline=None)
@given(
    method=text,
    path=text,
    query=text,
    headers=st.none() | st.dictionaries(st.sampled_from(["x-user", "cookie", "host"]) | text, text, max_size=4),
)
def test_route_never_raises(method, path, query, headers):
    action = ROUTER.route(method, path, query, headers)
    assert action.version in VERSIONS


def test_accepts_the_agents_normalised_shape():
    retries = {"attempts": 3, "per_try_timeout": None, "retry_on": ["connect-failure", "refused", "gateway-error", 503],
               "backoff": 0.025, "max_backoff": 0.25, "non_idempotent": False,
               "budget": {"ratio": 0.2, "min_per_second": 10.0}}
    cfg = {
        "split": {"v1": 90, "v2": 10},
        "versions": ["v1", "v2"],
        "routes": [
            {"match": {"path": {"kind": "prefix", "value": "/api"}, "methods": ["GET", "HEAD"],
                       "headers": [{"name": "x-canary", "kind": "exact", "value": "true"}],
                       "query": [{"name": "beta", "value": "1"}]},
             "split": {"v2": 100}, "timeout": None, "retries": retries,
             "fault": {"delay": None, "abort": {"status": 503, "percent": 5.0}},
             "mirror": {"version": "v2", "percent": 10.0}},
            {"match": {"path": None, "methods": None, "headers": [], "query": []},
             "split": {"v1": 100}, "timeout": 2.5, "retries": None, "fault": None, "mirror": None},
        ],
        "timeout": 15.0, "connect_timeout": 1.0, "retries": None,
        "load_balancer": {"kind": "least_request"},
        "outlier_detection": {"enabled": True, "consecutive_errors": 5, "interval": 10.0, "base_ejection_time": 30.0,
                              "max_ejection_percent": 10.0, "max_ejection_time": 300.0},
        "limits": {"max_connections": 1024, "max_pending": 1024},
    }
    router = Router("cart", cfg)
    canary = router.route("GET", "/api/items", "beta=1", {"x-canary": "true"})
    assert (canary.version, canary.rule, canary.timeout) == ("v2", 0, 15.0)
    assert canary.retry_policy.retry_on == frozenset({"connect-failure", "refused", "gateway-error", "503"})
    assert canary.fault == {"delay": None, "abort": {"status": 503, "percent": 5.0}}
    other = router.route("POST", "/api/items", "beta=1", {"x-canary": "true"})
    assert (other.version, other.rule, other.timeout, other.retries) == ("v1", 1, 2.5, None)
