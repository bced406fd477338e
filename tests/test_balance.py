"""Pure unit tests of proxy.balance: each kind, health, exclusion, panic, ring hashing."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from meshctl.proxy.balance import (
    BalancerConfigError,
    ConsistentHashBalancer,
    Endpoint,
    LeastRequestBalancer,
    RandomBalancer,
    RoundRobinBalancer,
    make_balancer,
    stable_hash,
)

NOW = 1000.0


def endpoints(count: int, version: str = "v1", start: int = 0) -> list[Endpoint]:
    return [Endpoint("cart@%s#%d" % (version, i), version, ("127.0.0.1", 43000 + i)) for i in range(start, start + count)]


@pytest.mark.parametrize(
    ("cfg", "kind"),
    [
        (None, LeastRequestBalancer),
        ({"kind": "least_request"}, LeastRequestBalancer),
        ({}, LeastRequestBalancer),
        ("round_robin", RoundRobinBalancer),
        ({"kind": "round_robin"}, RoundRobinBalancer),
        ({"kind": "random"}, RandomBalancer),
        ({"kind": "consistent_hash", "header": "X-User"}, ConsistentHashBalancer),
        ({"kind": "consistent_hash", "cookie": "session"}, ConsistentHashBalancer),
        ({"kind": "consistent_hash", "source_ip": True}, ConsistentHashBalancer),
    ],
)
def test_make_balancer_kinds(cfg, kind):
    assert type(make_balancer(cfg, endpoints(2))) is kind


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"kind": "fastest"}, "load_balancer.kind: unknown kind 'fastest'"),
        ({"kind": "consistent_hash"}, "load_balancer: consistent_hash needs exactly one"),
        ({"kind": "consistent_hash", "header": "a", "cookie": "b"}, "load_balancer: consistent_hash needs exactly one"),
        ({"kind": "consistent_hash", "header": ""}, "load_balancer.header: expected a name"),
        ({"kind": "consistent_hash", "source_ip": "yes"}, "load_balancer.source_ip: expected true"),
        (["round_robin"], "load_balancer: expected a mapping"),
    ],
)
def test_make_balancer_rejects_bad_config(cfg, message):
    with pytest.raises(BalancerConfigError) as caught:
        make_balancer(cfg, endpoints(2))
    assert str(caught.value).startswith(message)


def test_endpoint_from_config_and_availability():
    endpoint = Endpoint.from_config({"id": "cart@v1#0", "version": "v1", "address": ["127.0.0.1", 43001]})
    assert (endpoint.id, endpoint.version, endpoint.address, endpoint.active) == ("cart@v1#0", "v1", ("127.0.0.1", 43001), 0)
    assert endpoint.available(NOW)
    endpoint.ejected_until = NOW + 1
    assert not endpoint.available(NOW) and endpoint.available(NOW + 1)


@pytest.mark.parametrize("kind", ["least_request", "round_robin", "random", "consistent_hash"])
def test_versions_are_kept_apart(kind):
    cfg = {"kind": kind, "header": "x-user"} if kind == "consistent_hash" else {"kind": kind}
    balancer = make_balancer(cfg, endpoints(3, "v1") + endpoints(2, "v2"), rng=random.Random(1))
    assert {balancer.pick("v2", "k%d" % i, now=NOW).version for i in range(50)} == {"v2"}
    assert {balancer.pick("v1", None, now=NOW).version for i in range(50)} == {"v1"}
    assert balancer.pick("v9", now=NOW) is None
    assert make_balancer(cfg, []).pick("v1", now=NOW) is None


def test_least_request_prefers_the_less_loaded():
    pool = endpoints(2)
    pool[0].active = 10
    balancer = make_balancer(None, pool, rng=random.Random(3))
    assert {balancer.pick("v1", now=NOW).id for _ in range(100)} == {pool[1].id}


def test_least_request_spreads_when_equal_and_avoids_the_busiest():
    pool = endpoints(5)
    pool[4].active = 100
    balancer = make_balancer(None, pool, rng=random.Random(4))
    picks = Counter(balancer.pick("v1", now=NOW).id for _ in range(4000))
    assert pool[4].id not in picks  # two distinct choices: the busiest always loses
    assert all(700 < picks[endpoint.id] < 1300 for endpoint in pool[:4]), picks


def test_round_robin_cycles():
    pool = endpoints(3)
    balancer = make_balancer({"kind": "round_robin"}, pool, rng=random.Random(5))
    first = [balancer.pick("v1", now=NOW).id for _ in range(3)]
    assert sorted(first) == sorted(endpoint.id for endpoint in pool)
    assert [balancer.pick("v1", now=NOW).id for _ in range(6)] == first * 2


def test_random_covers_all():
    pool = endpoints(4)
    balancer = make_balancer({"kind": "random"}, pool, rng=random.Random(6))
    picks = Counter(balancer.pick("v1", now=NOW).id for _ in range(4000))
    assert all(800 < picks[endpoint.id] < 1200 for endpoint in pool), picks


KINDS = [{"kind": "least_request"}, {"kind": "round_robin"}, {"kind": "random"}, {"kind": "consistent_hash", "header": "x-user"}]


@pytest.mark.parametrize("cfg", KINDS)
def test_exclude_prefers_another_endpoint(cfg):
    pool = endpoints(3)
    balancer = make_balancer(cfg, pool, rng=random.Random(7))
    tried = frozenset({pool[0].id, pool[1].id})
    assert {balancer.pick("v1", "user-%d" % i, tried, NOW).id for i in range(50)} == {pool[2].id}


@pytest.mark.parametrize("cfg", KINDS)
def test_exclude_falls_back_when_everything_was_tried(cfg):
    pool = endpoints(2)
    balancer = make_balancer(cfg, pool, rng=random.Random(8))
    everything = frozenset(endpoint.id for endpoint in pool)
    assert balancer.pick("v1", "user", everything, NOW) in pool
    single = make_balancer(cfg, endpoints(1))
    assert single.pick("v1", "user", frozenset({"cart@v1#0"}), NOW).id == "cart@v1#0"


@pytest.mark.parametrize("cfg", KINDS)
def test_ejected_endpoints_are_skipped(cfg):
    pool = endpoints(3)
    pool[0].ejected_until = NOW + 30
    pool[2].ejected_until = NOW + 30
    balancer = make_balancer(cfg, pool, rng=random.Random(9))
    assert {balancer.pick("v1", "user-%d" % i, now=NOW).id for i in range(50)} == {pool[1].id}
    # Once the ejection expires they are back.
    assert len({balancer.pick("v1", "user-%d" % i, now=NOW + 30).id for i in range(200)}) == 3


@pytest.mark.parametrize("cfg", KINDS)
def test_panic_mode_when_all_are_ejected(cfg):
    pool = endpoints(3)
    for endpoint in pool:
        endpoint.ejected_until = NOW + 30
    balancer = make_balancer(cfg, pool, rng=random.Random(10))
    assert len({balancer.pick("v1", "user-%d" % i, now=NOW).id for i in range(200)}) == 3


@pytest.mark.parametrize("cfg", KINDS)
def test_healthy_excluded_beats_ejected(cfg):
    pool = endpoints(2)
    pool[1].ejected_until = NOW + 30
    balancer = make_balancer(cfg, pool, rng=random.Random(11))
    assert balancer.pick("v1", "user", frozenset({pool[0].id}), NOW) is pool[0]


@pytest.mark.parametrize(
    ("cfg", "headers", "client_ip", "key"),
    [
        ({"kind": "consistent_hash", "header": "X-User"}, {"x-user": "alice"}, "127.0.0.1", "alice"),
        ({"kind": "consistent_hash", "header": "x-user"}, {"other": "1"}, "127.0.0.1", None),
        ({"kind": "consistent_hash", "header": "x-user"}, None, "127.0.0.1", None),
        ({"kind": "consistent_hash", "cookie": "session"}, {"cookie": "a=1; session=s42; b=2"}, "1.2.3.4", "s42"),
        ({"kind": "consistent_hash", "cookie": "session"}, {"cookie": "sessionx=1"}, "1.2.3.4", None),
        ({"kind": "consistent_hash", "cookie": "session"}, {}, "1.2.3.4", None),
        ({"kind": "consistent_hash", "source_ip": True}, None, "10.0.0.7", "10.0.0.7"),
        ({"kind": "least_request"}, {"x-user": "alice"}, "10.0.0.7", None),
    ],
)
def test_hash_key_for(cfg, headers, client_ip, key):
    assert make_balancer(cfg, endpoints(2)).hash_key_for(headers, client_ip) == key


@pytest.mark.parametrize(
    ("cfg", "needs_headers"),
    [
        (None, False),
        ({"kind": "consistent_hash", "header": "x"}, True),
        ({"kind": "consistent_hash", "cookie": "x"}, True),
        ({"kind": "consistent_hash", "source_ip": True}, False),
    ],
)
def test_needs_headers(cfg, needs_headers):
    assert make_balancer(cfg, endpoints(2)).needs_headers is needs_headers


def test_stable_hash_is_stable():
    # Fixed value: the ring must place keys identically in every process.
    assert stable_hash("alice") == 0x4DEAEC0CCE54DA89


def test_consistent_hash_sticks_across_calls_and_balancers():
    cfg = {"kind": "consistent_hash", "header": "x-user"}
    first = make_balancer(cfg, endpoints(4), rng=random.Random(1))
    second = make_balancer(cfg, endpoints(4), rng=random.Random(2))
    for i in range(200):
        key = "user-%d" % i
        owner = first.pick("v1", key, now=NOW).id
        assert first.pick("v1", key, now=NOW).id == owner
        assert second.pick("v1", key, now=NOW).id == owner


def test_consistent_hash_spreads_keys():
    balancer = make_balancer({"kind": "consistent_hash", "header": "x-user"}, endpoints(4))
    picks = Counter(balancer.pick("v1", "user-%d" % i, now=NOW).id for i in range(10_000))
    assert all(1500 < count < 3500 for count in picks.values()), picks


def test_consistent_hash_moves_few_keys_when_a_replica_joins():
    cfg = {"kind": "consistent_hash", "header": "x-user"}
    four = make_balancer(cfg, endpoints(4))
    five = make_balancer(cfg, endpoints(5))
    keys = ["user-%d" % i for i in range(10_000)]
    moved = sum(four.pick("v1", key, now=NOW).id != five.pick("v1", key, now=NOW).id for key in keys)
    # Ideal is 1/5 = 20 %; a modulo hash would move 80 %.
    assert moved / len(keys) < 0.3, moved


def test_consistent_hash_ejection_moves_only_that_endpoints_keys():
    pool = endpoints(4)
    balancer = make_balancer({"kind": "consistent_hash", "header": "x-user"}, pool)
    keys = ["user-%d" % i for i in range(2000)]
    before = {key: balancer.pick("v1", key, now=NOW).id for key in keys}
    pool[0].ejected_until = NOW + 30
    after = {key: balancer.pick("v1", key, now=NOW).id for key in keys}
    assert all(after[key] == before[key] for key in keys if before[key] != pool[0].id)
    assert pool[0].id not in after.values()


def test_consistent_hash_without_key_still_balances():
    pool = endpoints(3)
    balancer = make_balancer({"kind": "consistent_hash", "header": "x-user"}, pool, rng=random.Random(12))
    assert len({balancer.pick("v1", None, now=NOW).id for _ in range(200)}) == 3


def test_repr_is_readable():
    text = repr(make_balancer(None, endpoints(2) + endpoints(1, "v2")))
    assert "3 endpoints" in text and "v1=2" in text and "v2=1" in text
    assert "cart@v1#0" in repr(endpoints(1)[0])
