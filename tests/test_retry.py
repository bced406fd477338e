"""Pure unit tests of proxy.retry: retry decisions, backoff bounds, the retry budget."""

from __future__ import annotations

import random

import pytest

from meshctl.proxy.retry import (
    ABORT, FAIL, MAX_REPLAY_BODY_BYTES, RETRY, RETRY_STALE, RetryBudget, RetryConfigError, RetryPolicy, after_failure,
)


def policy(**cfg) -> RetryPolicy:
    built = RetryPolicy.from_config({"attempts": 3, **cfg})
    assert built is not None
    return built


def test_from_config_defaults_and_none():
    assert RetryPolicy.from_config(None) is None
    default = RetryPolicy.from_config({})
    assert (default.attempts, default.per_try_timeout, default.non_idempotent) == (3, None, False)
    assert default.retry_on == frozenset({"connect-failure", "refused", "gateway-error"})
    assert (default.backoff_base, default.max_backoff) == (0.025, 0.25)
    assert (default.budget_ratio, default.budget_min_per_second) == (0.2, 10.0)
    full = RetryPolicy.from_config(
        {"attempts": 2, "per_try_timeout": 0.5, "retry_on": ["5xx", 409, "503"], "backoff": 0.01,
         "max_backoff": 0.1, "non_idempotent": True, "budget": {"ratio": 0.5, "min_per_second": 1}}
    )
    assert (full.attempts, full.per_try_timeout, full.non_idempotent) == (2, 0.5, True)
    assert full.retry_on == frozenset({"5xx", "409", "503"})
    assert (full.budget_ratio, full.budget_min_per_second) == (0.5, 1.0)
    assert "attempts=2" in repr(full)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ([], "expected a mapping"),
        ({"attempts": 0}, "attempts: expected an integer >= 1"),
        ({"attempts": True}, "attempts: expected an integer >= 1"),
        ({"attempts": 2.5}, "attempts: expected an integer >= 1"),
        ({"retry_on": ["5xx", "maybe"]}, "retry_on: unknown condition 'maybe'"),
        ({"retry_on": {"5xx": 1}}, "retry_on: expected a list"),
        ({"retry_on": [None]}, "retry_on: expected names or status codes"),
        ({"backoff": -1}, "backoff: must be >= 0"),
        ({"max_backoff": "1s"}, "max_backoff: expected a number"),
        ({"per_try_timeout": 0}, "per_try_timeout: must be > 0"),
        ({"non_idempotent": "yes"}, "non_idempotent: expected true or false"),
        ({"budget": 5}, "budget: expected a mapping"),
        ({"budget": {"ratio": -0.1}}, "budget.ratio: must be >= 0"),
    ],
)
def test_from_config_rejects(cfg, message):
    with pytest.raises(RetryConfigError) as caught:
        RetryPolicy.from_config(cfg)
    assert str(caught.value).startswith(message)


SMALL = 100
# (retry_on, attempt, method, outcome, status, body_size, expected)
DECISIONS = [
    # each retry_on name
    (["connect-failure"], 1, "GET", "connect-failure", None, 0, True),
    (["connect-failure"], 1, "GET", "refused", None, 0, True),
    (["connect-failure"], 1, "GET", "reset", None, 0, False),
    (["connect-failure"], 1, "GET", "response", 503, 0, False),
    (["refused"], 1, "GET", "refused", None, 0, True),
    (["refused"], 1, "GET", "connect-failure", None, 0, False),
    (["reset"], 1, "GET", "reset", None, 0, True),
    (["reset"], 1, "GET", "timeout", None, 0, False),
    (["timeout"], 1, "GET", "timeout", None, 0, True),
    (["5xx"], 1, "GET", "response", 500, 0, True),
    (["5xx"], 1, "GET", "response", 599, 0, True),
    (["5xx"], 1, "GET", "response", 404, 0, False),
    (["5xx"], 1, "GET", "response", 200, 0, False),
    (["5xx"], 1, "GET", "reset", None, 0, True),
    (["5xx"], 1, "GET", "timeout", None, 0, True),
    (["5xx"], 1, "GET", "connect-failure", None, 0, True),
    (["gateway-error"], 1, "GET", "response", 502, 0, True),
    (["gateway-error"], 1, "GET", "response", 503, 0, True),
    (["gateway-error"], 1, "GET", "response", 504, 0, True),
    (["gateway-error"], 1, "GET", "response", 500, 0, False),
    (["gateway-error"], 1, "GET", "refused", None, 0, True),
    (["retriable-4xx"], 1, "GET", "response", 409, 0, True),
    (["retriable-4xx"], 1, "GET", "response", 429, 0, False),
    (["retriable-4xx"], 1, "GET", "reset", None, 0, False),
    (["503"], 1, "GET", "response", 503, 0, True),
    ([503], 1, "GET", "response", 503, 0, True),
    (["503"], 1, "GET", "response", 502, 0, False),
    (["503"], 1, "GET", "connect-failure", None, 0, False),
    (["5xx"], 1, "GET", "response", None, 0, False),
    # attempts exhausted (attempts: 3 = the first try and two retries)
    (["5xx"], 2, "GET", "response", 503, 0, True),
    (["5xx"], 3, "GET", "response", 503, 0, False),
    (["5xx"], 4, "GET", "response", 503, 0, False),
    # method idempotency
    (["5xx"], 1, "PUT", "response", 503, SMALL, True),
    (["5xx"], 1, "DELETE", "response", 503, 0, True),
    (["5xx"], 1, "HEAD", "response", 503, 0, True),
    (["5xx"], 1, "OPTIONS", "response", 503, 0, True),
    (["5xx"], 1, "POST", "response", 503, SMALL, False),
    (["5xx"], 1, "PATCH", "reset", None, SMALL, False),
    # nothing reached the upstream: safe for any method
    (["connect-failure"], 1, "POST", "connect-failure", None, SMALL, True),
    (["connect-failure"], 1, "POST", "refused", None, SMALL, True),
    # body size
    (["5xx"], 1, "PUT", "response", 503, MAX_REPLAY_BODY_BYTES, True),
    (["5xx"], 1, "PUT", "response", 503, MAX_REPLAY_BODY_BYTES + 1, False),
    (["5xx"], 1, "PUT", "response", 503, None, False),
    (["connect-failure"], 1, "GET", "connect-failure", None, None, False),
]


@pytest.mark.parametrize(("retry_on", "attempt", "method", "outcome", "status", "body_size", "expected"), DECISIONS)
def test_should_retry(retry_on, attempt, method, outcome, status, body_size, expected):
    assert policy(retry_on=retry_on).should_retry(attempt, method, outcome, status, body_size) is expected


@pytest.mark.parametrize(("method", "expected"), [("POST", True), ("PATCH", True), ("GET", True)])
def test_non_idempotent_allows_any_method(method, expected):
    assert policy(retry_on=["5xx"], non_idempotent=True).should_retry(1, method, "response", 503, SMALL) is expected


def test_single_attempt_never_retries():
    single = policy(attempts=1, retry_on=["5xx"], per_try_timeout=1.0)
    assert single.per_try_timeout == 1.0
    assert not single.should_retry(1, "GET", "response", 503, 0)


class Fixed:
    def __init__(self, value: float) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(1, 0.025), (2, 0.05), (3, 0.1), (4, 0.2), (5, 0.25), (30, 0.25)],
)
def test_backoff_is_full_jitter_under_a_doubling_capped_ceiling(attempt, ceiling):
    retries = policy(backoff=0.025, max_backoff=0.25)
    assert retries.backoff(attempt, Fixed(0.0)) == 0.0
    assert retries.backoff(attempt, Fixed(0.999999)) == pytest.approx(ceiling, rel=1e-5)
    rng = random.Random(attempt)
    samples = [retries.backoff(attempt, rng) for _ in range(500)]
    assert all(0.0 <= sample <= ceiling for sample in samples)
    assert max(samples) > ceiling * 0.9  # jitter covers the range


def test_backoff_default_rng():
    assert 0.0 <= policy().backoff(1) <= 0.025


def test_budget_floor_allows_min_per_second_times_window():
    budget = RetryBudget(ratio=0.2, min_per_second=1.0, window=10.0)
    spent = [budget.try_spend(100.0) for _ in range(12)]
    assert spent == [True] * 10 + [False] * 2


def test_budget_ratio_above_the_floor():
    budget = RetryBudget(ratio=0.2, min_per_second=0.5, window=10.0)  # floor: 5 retries
    for _ in range(100):
        budget.record_request(100.0)
    spent = sum(budget.try_spend(100.5) for _ in range(30))
    assert spent == 20  # 20 % of 100 requests


def test_budget_zero_floor_zero_requests():
    budget = RetryBudget(ratio=0.2, min_per_second=0.0)
    assert not budget.try_spend(5.0)
    for _ in range(5):
        budget.record_request(5.0)
    assert budget.try_spend(5.0)
    assert not budget.try_spend(5.0)


def test_budget_window_expiry():
    budget = RetryBudget(ratio=0.0, min_per_second=0.2, window=10.0)  # 2 retries per window
    assert budget.try_spend(100.2) and budget.try_spend(103.0)
    assert not budget.try_spend(109.9)
    assert budget.try_spend(110.0)  # the retry of second 100 has left the window
    assert not budget.try_spend(112.0)
    assert budget.try_spend(113.0)  # the one of second 103 too
    assert budget.try_spend(500.0) and budget.try_spend(500.0)  # a long gap clears all
    assert not budget.try_spend(500.0)


def test_budget_requests_expire_too():
    budget = RetryBudget(ratio=0.5, min_per_second=0.0, window=2.0)
    for _ in range(10):
        budget.record_request(10.0)
    assert budget.try_spend(11.0)
    assert not budget.try_spend(12.5)  # the requests of second 10 have left the window
    assert "ratio=0.5" in repr(budget)


def test_budget_from_policy():
    budget = policy(budget={"ratio": 0.1, "min_per_second": 2}).make_budget()
    assert (budget.ratio, budget.min_per_second, budget.window) == (0.1, 2.0, 10.0)


def test_budget_tolerates_a_clock_step_back():
    budget = RetryBudget(ratio=0.0, min_per_second=0.1, window=10.0)  # 1 retry per window
    assert budget.try_spend(50.0)
    assert not budget.try_spend(49.0)


RESETS = policy(retry_on=["reset", "connect-failure"])


@pytest.mark.parametrize(
    ("case", "outcome", "route_policy", "attempt", "method", "body_size", "replayable", "budget_left", "flags", "expected"),
    [
        ("response bytes went out", "reset", RESETS, 1, "GET", 0, True, True, {"response_started": True}, ABORT),
        ("started wins over final", "timeout", RESETS, 1, "GET", 0, True, True, {"response_started": True, "final": True}, ABORT),
        ("request timeout is final", "timeout", policy(retry_on=["timeout"]), 1, "GET", 0, True, True, {"final": True}, FAIL),
        ("no copy to send again", "reset", RESETS, 1, "GET", None, False, True, {}, FAIL),
        ("stale: again at once", "reset", None, 1, "POST", None, True, False, {"stale_connection": True}, RETRY_STALE),
        ("stale but final", "timeout", None, 1, "GET", 0, True, True, {"stale_connection": True, "final": True}, FAIL),
        ("stale without a copy", "reset", RESETS, 1, "GET", None, False, True, {"stale_connection": True}, FAIL),
        ("reset, GET", "reset", RESETS, 1, "GET", 0, True, True, {}, RETRY),
        ("reset, POST", "reset", RESETS, 1, "POST", 0, True, True, {}, FAIL),
        ("budget spent", "reset", RESETS, 1, "GET", 0, True, False, {}, FAIL),
        ("attempts used", "reset", RESETS, 3, "GET", 0, True, True, {}, FAIL),
        ("body streamed", "reset", RESETS, 1, "GET", None, True, True, {}, FAIL),
        ("body too large", "reset", RESETS, 1, "PUT", MAX_REPLAY_BODY_BYTES + 1, True, True, {}, FAIL),
        ("not in retry_on", "timeout", RESETS, 1, "GET", 0, True, True, {}, FAIL),
        ("no route policy: refused POST", "refused", None, 1, "POST", 0, True, True, {}, RETRY),
        ("no route policy: reset", "reset", None, 1, "GET", 0, True, True, {}, FAIL),
        ("no route policy: third try", "connect-failure", None, 3, "GET", 0, True, True, {}, FAIL),
    ],
)
def test_after_failure(case, outcome, route_policy, attempt, method, body_size, replayable, budget_left, flags, expected):
    assert after_failure(outcome, route_policy, attempt, method, body_size, replayable, budget_left, **flags) == expected, case


def test_budget_allows_agrees_with_try_spend_and_spends_nothing():
    budget = RetryBudget(ratio=0.0, min_per_second=0.2, window=10)  # a floor of 2 retries
    for _ in range(2):
        assert budget.allows(5.0)
        assert budget.allows(5.0)
        assert budget.try_spend(5.0)
    assert not budget.allows(5.0) and not budget.try_spend(5.0)
    assert budget.allows(16.0)  # the window moved past both
