"""Pure units of the agent: the state machine, restart decisions, apply plans, snapshots."""

from __future__ import annotations

import random

import pytest

from meshctl.agent.compile import Endpoint, SidecarIdentity, SidecarListeners, compile_sidecar
from meshctl.agent.lifecycle import IllegalTransition, State, decide_after_exit, transition
from meshctl.agent.model import Ingress, IngressRoute, Manifest, RestartPolicy, ServiceSpec, VersionSpec
from meshctl.agent.process import expand_vars
from meshctl.agent.plan import desired_instances, env_name, plan_apply

POLICY = RestartPolicy(policy="on_failure", backoff_s=1.0, max_backoff_s=8.0, max_quick_crashes=3, stable_after_s=10.0)


@pytest.mark.parametrize(
    "current,new,ok",
    [
        (State.STOPPED, State.STARTING, True),
        (State.STARTING, State.READY, True),
        (State.READY, State.BACKOFF, True),
        (State.BACKOFF, State.STARTING, True),
        (State.STARTING, State.FAILED, True),
        (State.READY, State.STOPPING, True),
        (State.STOPPING, State.STOPPED, True),
        (State.STOPPED, State.READY, False),
        (State.STOPPING, State.STARTING, False),
        (State.FAILED, State.READY, False),
        (State.BACKOFF, State.READY, False),
    ],
)
def test_transitions(current, new, ok):
    if ok:
        assert transition(current, new) is new
    else:
        with pytest.raises(IllegalTransition):
            transition(current, new)


@pytest.mark.parametrize(
    "code,ran_for,quick,expect_state,expect_count,delay_range",
    [
        (1, 0.5, 0, State.BACKOFF, 1, (0.5, 1.0)),  # first quick crash: base 1 s, jittered
        (1, 0.5, 1, State.BACKOFF, 2, (1.0, 2.0)),  # doubles
        (1, 0.5, 2, State.FAILED, 3, (0.0, 0.0)),  # third quick crash in a row: give up
        (1, 60.0, 2, State.BACKOFF, 0, (0.0, 0.0)),  # a stable run resets count and delay
        (0, 0.5, 0, State.FAILED, 0, (0.0, 0.0)),  # on_failure: a clean exit is not restarted
        (-9, 0.5, 0, State.BACKOFF, 1, (0.5, 1.0)),
    ],
)
def test_decide_after_exit(code, ran_for, quick, expect_state, expect_count, delay_range):
    decision = decide_after_exit(POLICY, code, ran_for, quick, random.Random(1))
    assert decision.state is expect_state
    assert decision.quick_crashes == expect_count
    assert delay_range[0] <= decision.delay_s <= delay_range[1]


def test_backoff_is_capped():
    decision = decide_after_exit(
        RestartPolicy(backoff_s=1.0, max_backoff_s=4.0, max_quick_crashes=100), 1, 0.1, 20, random.Random(2)
    )
    assert decision.delay_s <= 4.0


def test_policy_always_restarts_clean_exit_and_no_never():
    assert decide_after_exit(RestartPolicy(policy="always"), 0, 0.1, 0).state is State.BACKOFF
    assert decide_after_exit(RestartPolicy(policy="no"), 1, 0.1, 0).state is State.FAILED


def _manifest(cart_replicas=2, cart_cmd=("python", "cart.py")):
    catalog = ServiceSpec("catalog", (VersionSpec("v1", ("python", "catalog.py"), workdir="/"),))
    cart = ServiceSpec(
        "cart",
        (VersionSpec("v1", cart_cmd, replicas=cart_replicas, workdir="/"), VersionSpec("v2", cart_cmd, workdir="/")),
        upstreams=("catalog",),
    )
    return Manifest("shop", (catalog, cart), Ingress(8080, routes=(IngressRoute("/", "cart"),)))


def test_plan_apply_start_stop_replace_keep():
    before = desired_instances(_manifest())
    after = desired_instances(_manifest(cart_replicas=1, cart_cmd=("python", "cart2.py")))
    plan = plan_apply(before, after)
    assert plan.start == ()
    assert plan.stop == ("cart@v1#1",)
    assert set(plan.replace) == {"cart@v1#0", "cart@v2#0"}
    assert plan.keep == ("catalog@v1#0",)
    fresh = plan_apply({}, after)
    assert fresh.start == tuple(after)


def test_compile_sidecar_lists_only_ready_endpoints_of_upstreams():
    manifest = _manifest()
    snapshot = compile_sidecar(
        manifest,
        SidecarIdentity("cart@v1#0", "cart", "v1", ("catalog",)),
        SidecarListeners(inbound_fd=5, app_port=4000, outbound_fds=(("catalog", 6),)),
        [Endpoint("catalog@v1#0", "catalog", "v1", 5001), Endpoint("cart@v2#0", "cart", "v2", 5002)],
    )
    assert snapshot["listeners"] == [
        {"name": "inbound", "kind": "inbound", "fd": 5, "app": ["127.0.0.1", 4000], "protocol": "http"},
        {"name": "outbound:catalog", "kind": "outbound", "fd": 6, "service": "catalog", "protocol": "http"},
    ]
    assert list(snapshot["services"]) == ["catalog"]
    assert snapshot["services"]["catalog"]["endpoints"] == [
        {"id": "catalog@v1#0", "version": "v1", "address": ["127.0.0.1", 5001]}
    ]
    assert snapshot["services"]["catalog"]["split"] == {"v1": 100}


def test_compile_ingress_routes_longest_prefix_first():
    manifest = Manifest(
        "shop",
        _manifest().services,
        Ingress(8080, routes=(IngressRoute("/", "cart"), IngressRoute("/api/catalog", "catalog"))),
    )
    snapshot = compile_sidecar(manifest, SidecarIdentity("ingress", None, None), SidecarListeners(ingress_fd=9), [])
    assert snapshot["listeners"][0]["routes"] == [
        {"path": "/api/catalog", "service": "catalog"},
        {"path": "/", "service": "cart"},
    ]
    assert set(snapshot["services"]) == {"cart", "catalog"}


@pytest.mark.parametrize(
    "arg,expected",
    [("--port=$PORT", "--port=4000"), ("${PORT}x", "4000x"), ("$MISSING", "$MISSING"), ("plain", "plain")],
)
def test_expand_vars(arg, expected):
    assert expand_vars(arg, {"PORT": "4000"}) == expected


@pytest.mark.parametrize("name,expected", [("cart", "CART"), ("order-history", "ORDER_HISTORY")])
def test_env_name(name, expected):
    assert env_name(name) == expected
