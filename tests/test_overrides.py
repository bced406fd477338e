"""Pure units: live route overrides, their persistence, redaction, and the promote decisions."""

from __future__ import annotations

import asyncio
import os
import stat

import pytest

from meshctl.agent import overrides as ovr
from meshctl.agent.control import REDACTED, redact
from meshctl.agent.model import Manifest, ServiceSpec, VersionSpec
from meshctl.agent.promote import Action, Promotion, Thresholds, decide, split_for

ROUTE = {"match": {"path": {"kind": "prefix", "value": "/beta"}, "methods": None, "headers": [], "query": []},
         "split": {"v2": 100}, "timeout": None, "retries": None, "fault": None, "mirror": None}
API = ServiceSpec(
    "api",
    (VersionSpec("v1", ("x",), replicas=2), VersionSpec("v2", ("x",))),
    traffic={"split": {"v1": 100}, "versions": ["v1", "v2"], "routes": [ROUTE]},
)
WEB = ServiceSpec("web", (VersionSpec("v1", ("x",)),), upstreams=("api",))
MANIFEST = Manifest("m", (API, WEB))
NONE = ovr.MeshOverrides()


@pytest.mark.parametrize(
    "split, error, message",
    [
        ({"v1": 90, "v2": 10}, None, None),
        ({"v2": 100}, None, None),
        ({"v1": 90, "v2": 20}, ovr.BadSplit, "sums to 110"),
        ({"v1": 100, "v3": 0}, ovr.UnknownVersion, r"has no version 'v3' \(it has v1, v2\)"),
        ({"v1": 101}, ovr.BadSplit, "whole number from 0 to 100"),
        ({"v1": 50.5, "v2": 49.5}, ovr.BadSplit, "whole number"),
        ({"v1": True}, ovr.BadSplit, "whole number"),
        ({}, ovr.BadSplit, "at least one"),
    ],
)
def test_split_validation(split, error, message):
    if error is None:
        assert ovr.with_split(NONE, MANIFEST, "api", split).service("api").split == split
    else:
        with pytest.raises(error, match=message):
            ovr.with_split(NONE, MANIFEST, "api", split)


@pytest.mark.parametrize(
    "pairs, expected",
    [
        (["v1=90", "v2=10"], {"v1": 90, "v2": 10}),
        (["v1=90", "v1=10"], "given twice"),
        (["v1"], "expected VERSION=WEIGHT"),
        (["=5"], "expected VERSION=WEIGHT"),
        (["v1=-5"], "expected VERSION=WEIGHT"),
    ],
)
def test_parse_weights(pairs, expected):
    if isinstance(expected, dict):
        assert ovr.parse_weights(pairs) == expected
    else:
        with pytest.raises(ovr.BadSplit, match=expected):
            ovr.parse_weights(pairs)


def test_unknown_service_has_its_code():
    with pytest.raises(ovr.UnknownService) as info:
        ovr.with_split(NONE, MANIFEST, "nope", {"v1": 100})
    assert info.value.code == "unknown-service" and "services: api, web" in str(info.value)


def test_rules_go_before_the_manifest_rules_and_replace_their_own_kind():
    ov = ovr.with_rule(NONE, MANIFEST, "api", "X-Canary", "true", "v2")
    ov = ovr.with_rule(ov, MANIFEST, "api", "x-team", "a", "v1")
    ov = ovr.with_rule(ov, MANIFEST, "api", "x-canary", "true", "v1")
    routes = ovr.traffic_overrides(MANIFEST, ov)["api"]["routes"]
    assert [(r["match"]["headers"][0]["name"], r["split"]) for r in routes[:2]] == [
        ("x-canary", {"v1": 100}), ("x-team", {"v1": 100})]
    assert routes[2] == ROUTE and len(routes) == 3
    assert "split" not in ovr.traffic_overrides(MANIFEST, ov)["api"]  # rules leave the split alone
    # The sidecar learns which rules are live overrides (`meshctl why` says where a rule came from).
    assert ovr.traffic_overrides(MANIFEST, ov)["api"]["live"] == {"rules": 2, "split": False}


@pytest.mark.parametrize("header, version, error", [("bad header", "v2", ovr.OverrideError), ("x", "v7", ovr.UnknownVersion)])
def test_bad_rules(header, version, error):
    with pytest.raises(error):
        ovr.with_rule(NONE, MANIFEST, "api", header, "1", version)


def test_reset_goes_back_to_the_manifest_and_keeps_replicas():
    ov = ovr.with_split(NONE, MANIFEST, "api", {"v2": 100})
    ov = ovr.with_replicas(ov, MANIFEST, "api", "v2", 3)
    ov = ovr.without(ov, MANIFEST, "api")
    assert ov.services == {} and ov.replicas == {"api@v2": 3}
    assert ovr.traffic_overrides(MANIFEST, ov) == {}


@pytest.mark.parametrize(
    "split, version, count, error",
    [
        (None, "v1", 3, None),
        (None, "v2", 0, ovr.BadScale),  # a manifest rule still sends /beta to v2
        ({"v1": 100}, "v1", 0, ovr.BadScale),
        (None, "v1", -1, ovr.BadScale),
        (None, "v1", 65, ovr.BadScale),
        (None, "v9", 1, ovr.UnknownVersion),
    ],
)
def test_scale_rules(split, version, count, error):
    ov = NONE if split is None else ovr.with_split(NONE, MANIFEST, "api", split)
    if error is None:
        assert ovr.with_replicas(ov, MANIFEST, "api", version, count).replicas == {f"api@{version}": count}
    else:
        with pytest.raises(error):
            ovr.with_replicas(ov, MANIFEST, "api", version, count)


def test_scale_to_zero_once_no_traffic_reaches_it():
    ov = ovr.with_split(NONE, MANIFEST, "web", {"v1": 100})
    assert ovr.with_replicas(NONE, MANIFEST, "web", "v1", 1).replicas == {}  # the manifest's count: no override
    with pytest.raises(ovr.BadScale):
        ovr.with_replicas(ov, MANIFEST, "web", "v1", 0)
    no_rule = Manifest("m", (ServiceSpec("api", API.versions, traffic={"split": {"v1": 100}, "routes": []}),))
    assert ovr.with_replicas(NONE, no_rule, "api", "v2", 0).replicas == {"api@v2": 0}
    assert ovr.replicas_for(no_rule, ovr.with_replicas(NONE, no_rule, "api", "v2", 0)) == {"api@v1": 2, "api@v2": 0}


def test_reconcile_drops_what_a_new_manifest_no_longer_allows():
    ov = ovr.with_split(NONE, MANIFEST, "api", {"v1": 50, "v2": 50})
    ov = ovr.with_rule(ov, MANIFEST, "api", "x-a", "1", "v1")
    ov = ovr.with_replicas(ov, MANIFEST, "web", "v1", 2)
    assert ovr.reconcile(MANIFEST, ov) == (ov, [])
    smaller = Manifest("m", (ServiceSpec("api", API.versions[:1]),))
    kept, dropped = ovr.reconcile(smaller, ov)
    assert kept == ovr.MeshOverrides()
    assert len(dropped) == 2 and "no version 'v2'" in dropped[0] and "no service 'web'" in dropped[1]


def test_store_round_trip_is_private_atomic_and_per_mesh(tmp_path):
    store = ovr.OverrideStore(str(tmp_path))
    assert store.load("m") == NONE
    ov = ovr.with_rule(ovr.with_split(NONE, MANIFEST, "api", {"v2": 100}), MANIFEST, "api", "x", "1", "v1")
    ov = ovr.with_replicas(ov, MANIFEST, "api", "v1", 3)
    store.save("m", ov)
    store.save("other", NONE)
    assert store.load("m") == ov and store.load("other") == NONE
    assert stat.S_IMODE(os.stat(tmp_path / "overrides.json").st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["overrides.json"]  # no temporary file left behind
    (tmp_path / "overrides.json").write_text("{not json")
    with pytest.raises(ovr.OverrideError, match="not valid JSON"):
        store.load("m")


def test_diff_lists_every_live_difference():
    ov = ovr.with_rule(ovr.with_split(NONE, MANIFEST, "api", {"v2": 100}), MANIFEST, "api", "x", "1", "v1")
    ov = ovr.with_replicas(ov, MANIFEST, "api", "v1", 3)
    assert ovr.diff(MANIFEST, ov) == [
        {"service": "api", "what": "split", "manifest": {"v1": 100}, "live": {"v2": 100}},
        {"service": "api", "what": "rule", "manifest": None, "live": {"header": "x", "value": "1", "version": "v1"}},
        {"service": "api", "what": "replicas v1", "manifest": 2, "live": 3},
    ]


PEM_KEY = "-----BEGIN PRIVATE KEY-----\nabc\n-----END PRIVATE KEY-----\n"
PEM_CERT = "-----BEGIN CERTIFICATE-----\nabc\n-----END CERTIFICATE-----\n"


@pytest.mark.parametrize(
    "snapshot, expected",
    [
        ({"tls": {"key": "k", "cert_pem": PEM_CERT}}, {"tls": {"key": REDACTED, "cert_pem": PEM_CERT}}),
        ({"tls": {"key_pem": PEM_KEY, "ca_pem": PEM_CERT}}, {"tls": {"key_pem": REDACTED, "ca_pem": PEM_CERT}}),
        ({"a": [{"private_key": "x"}, {"key": None}]}, {"a": [{"private_key": REDACTED}, {"key": None}]}),
        ({"services": {"api": {"split": {"v1": 100}}}}, {"services": {"api": {"split": {"v1": 100}}}}),
        (None, None),
    ],
)
def test_redact(snapshot, expected):
    assert redact(snapshot) == expected


LIMITS = Thresholds(step=10, interval_s=30, max_error_rate=0.01, max_p99_ms=300)


@pytest.mark.parametrize(
    "weight, stats, action, new_weight, reason",
    [
        (0, None, Action.STEP, 10, "starting: 0% -> 10%"),  # nothing to judge at 0 %
        (10, None, Action.HOLD, 10, "no traffic"),
        (10, (0, 0, 0.0), Action.HOLD, 10, "no traffic"),
        (10, (1000, 5, 120.0), Action.STEP, 20, "10% -> 20%"),
        (95, (1000, 0, 120.0), Action.STEP, 100, "95% -> 100%"),
        (100, (1000, 0, 120.0), Action.DONE, 100, "all traffic"),
        (30, (1000, 20, 120.0), Action.ROLLBACK, 0, "error rate 2.00% over 1000 requests exceeds 1.00%"),
        (30, (1000, 10, 120.0), Action.STEP, 40, "healthy"),  # exactly at the limit is fine
        (30, (1000, 0, 450.0), Action.ROLLBACK, 0, "p99 450 ms exceeds 300 ms"),
    ],
)
def test_promote_decisions(weight, stats, action, new_weight, reason):
    decision = decide(weight, stats, LIMITS)
    assert (decision.action, decision.weight) == (action, new_weight)
    assert reason in decision.reason


def test_promote_without_a_p99_limit_ignores_latency():
    assert decide(10, (100, 0, 9999.0), Thresholds(max_p99_ms=None)).action is Action.STEP


def test_split_for():
    assert split_for("v2", 30, "v1") == {"v1": 70, "v2": 30}
    assert split_for("v2", 100, "v1") == {"v1": 0, "v2": 100}


class ScriptedStats:
    available = True

    def __init__(self, answers):
        self.answers = list(answers)

    def version_stats(self, service, version, window_s):
        return self.answers.pop(0)


@pytest.mark.parametrize(
    "answers, splits, final",
    [
        ([(100, 0, 10.0), None, (100, 0, 10.0), (100, 0, 10.0)],
         [{"v1": 40, "v2": 60}, {"v1": 0, "v2": 100}, {"v1": 0, "v2": 100}], Action.DONE),
        ([(100, 0, 10.0), (100, 50, 10.0)], [{"v1": 40, "v2": 60}, {"v1": 100, "v2": 0}], Action.ROLLBACK),
    ],
)
def test_promotion_driver_applies_each_decision(answers, splits, final):
    applied = []

    async def apply_split(split):
        applied.append(split)

    async def run():
        limits = Thresholds(step=40, interval_s=0.0, max_error_rate=0.01)
        return await Promotion("api", "v2", "v1", 20, limits, ScriptedStats(answers), apply_split).run()

    assert asyncio.run(run()).action is final
    assert applied == splits
