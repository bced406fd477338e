"""Retry decisions: which failed tries may be tried again, how long to wait, and a budget.

Pure and sans-IO: the engine reports what happened to a try and acts on the answer.

Outcomes the engine reports for a try:

* ``connect-failure``: the TCP connect failed or timed out (nothing was sent);
* ``refused``: the connection was refused (nothing was sent);
* ``reset``: the connection closed or reset before any response byte arrived;
* ``timeout``: the per-try timeout fired before a response head arrived;
* ``response``: a full response head arrived, with its ``status``.

Names accepted in ``retry_on`` (as in Envoy/Istio):

* ``connect-failure``: connect failures, connection refused included;
* ``refused``: connection refused only;
* ``reset``: reset before a response;
* ``timeout``: per-try timeout;
* ``5xx``: any 5xx response, and every outcome without a response (connect failure,
  refused, reset, per-try timeout), which the sidecar would report as a 502 or 504;
* ``gateway-error``: 502, 503 and 504 responses, and every outcome without a response
  (for the same reason);
* ``retriable-4xx``: 409 Conflict;
* a status code, ``503`` or ``"503"``: that status in a response.

Method safety: only idempotent methods (GET HEAD OPTIONS PUT DELETE TRACE) are retried
unless ``non_idempotent`` is set, except after ``connect-failure`` and ``refused``, where
the request provably never reached the upstream, so retrying any method is safe.
A request whose body size is unknown (streamed) or above 64 KiB is never retried, as in
Linkerd: the sidecar does not buffer more than that for a replay.

A route without a ``retries`` block still retries what provably sent nothing:
``CONNECT_RETRIES``, two more tries after ``connect-failure`` or ``refused`` (Istio's default
policy retries ``connect-failure`` and ``refused-stream`` twice), within the budget.

`after_failure()` is the whole decision after a try that got no usable response: abort the
client connection, answer with the error, retry, or replace a stale pooled connection.
"""

from __future__ import annotations

import math
import random
from typing import Any, Protocol

MAX_REPLAY_BODY_BYTES = 64 * 1024
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})

DEFAULT_ATTEMPTS = 3
DEFAULT_RETRY_ON = ("connect-failure", "refused", "gateway-error")
DEFAULT_BACKOFF = 0.025
DEFAULT_MAX_BACKOFF = 0.25
DEFAULT_BUDGET_RATIO = 0.2
DEFAULT_BUDGET_MIN_PER_SECOND = 10.0
DEFAULT_BUDGET_WINDOW = 10.0

_NO_RESPONSE = frozenset({"connect-failure", "refused", "reset", "timeout"})
_NOTHING_SENT = frozenset({"connect-failure", "refused"})
_OUTCOMES_BY_NAME = {
    "connect-failure": frozenset({"connect-failure", "refused"}),
    "refused": frozenset({"refused"}),
    "reset": frozenset({"reset"}),
    "timeout": frozenset({"timeout"}),
    "5xx": _NO_RESPONSE,
    "gateway-error": _NO_RESPONSE,
    "retriable-4xx": frozenset(),
}
_STATUSES_BY_NAME = {
    "5xx": frozenset(range(500, 600)),
    "gateway-error": frozenset({502, 503, 504}),
    "retriable-4xx": frozenset({409}),
}
_EMPTY: frozenset = frozenset()


class RandomSource(Protocol):
    """Where jitter comes from: the `random` module, or a seeded `random.Random` in tests."""

    def random(self) -> float: ...


class RetryConfigError(ValueError):
    """A retries block that cannot be used. ``key`` is the offending key inside the block
    ("" for the block itself); the message starts with it."""

    code = "config-invalid"

    def __init__(self, key: str, reason: str) -> None:
        super().__init__("%s: %s" % (key, reason) if key else reason)
        self.key = key
        self.reason = reason


def _number(cfg: dict[str, Any], key: str, default: float, minimum: float) -> float:
    """`cfg[key]` validated, or `default` when it is missing or null."""
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise RetryConfigError(key, "expected a number, got %r" % (value,))
    if value < minimum:
        raise RetryConfigError(key, "must be >= %s, got %r" % (minimum, value))
    return float(value)


class RetryPolicy:
    """A validated ``retries`` block. Build it once per config snapshot, share it."""

    __slots__ = (
        "attempts",
        "per_try_timeout",
        "retry_on",
        "backoff_base",
        "max_backoff",
        "non_idempotent",
        "budget_ratio",
        "budget_min_per_second",
        "_retry_outcomes",
        "_retry_statuses",
    )

    def __init__(
        self,
        attempts: int = DEFAULT_ATTEMPTS,
        per_try_timeout: float | None = None,
        retry_on: frozenset[str] | set[str] = frozenset(DEFAULT_RETRY_ON),
        backoff: float = DEFAULT_BACKOFF,
        max_backoff: float = DEFAULT_MAX_BACKOFF,
        non_idempotent: bool = False,
        budget_ratio: float = DEFAULT_BUDGET_RATIO,
        budget_min_per_second: float = DEFAULT_BUDGET_MIN_PER_SECOND,
    ) -> None:
        self.attempts = attempts
        self.per_try_timeout = per_try_timeout
        self.retry_on = frozenset(retry_on)
        self.backoff_base = backoff
        self.max_backoff = max_backoff
        self.non_idempotent = non_idempotent
        self.budget_ratio = budget_ratio
        self.budget_min_per_second = budget_min_per_second
        outcomes: set[str] = set()
        statuses: set[int] = set()
        for name in self.retry_on:
            if name.isdigit():
                statuses.add(int(name))
                continue
            if name not in _OUTCOMES_BY_NAME:
                raise RetryConfigError(
                    "retry_on",
                    "unknown condition %r (known: %s, or a status code)"
                    % (name, ", ".join(sorted(_OUTCOMES_BY_NAME))),
                )
            outcomes |= _OUTCOMES_BY_NAME[name]
            statuses |= _STATUSES_BY_NAME.get(name, _EMPTY)
        self._retry_outcomes = frozenset(outcomes)
        self._retry_statuses = frozenset(statuses)

    @classmethod
    def from_config(cls, cfg: dict[str, Any] | None) -> RetryPolicy | None:
        """Validate a ``retries`` block; None means no retries."""
        if cfg is None:
            return None
        if not isinstance(cfg, dict):
            raise RetryConfigError("", "expected a mapping, got %r" % (cfg,))
        attempts = cfg.get("attempts", DEFAULT_ATTEMPTS)
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise RetryConfigError("attempts", "expected an integer >= 1, got %r" % (attempts,))
        retry_on = cfg.get("retry_on", DEFAULT_RETRY_ON)
        if isinstance(retry_on, (str, int)):
            retry_on = [retry_on]
        if not isinstance(retry_on, (list, tuple, set, frozenset)):
            raise RetryConfigError("retry_on", "expected a list, got %r" % (retry_on,))
        names = set()
        for name in retry_on:
            if isinstance(name, bool) or not isinstance(name, (str, int)):
                raise RetryConfigError("retry_on", "expected names or status codes, got %r" % (name,))
            names.add(str(name).strip().lower())
        non_idempotent = cfg.get("non_idempotent", False)
        if not isinstance(non_idempotent, bool):
            raise RetryConfigError("non_idempotent", "expected true or false, got %r" % (non_idempotent,))
        budget = cfg.get("budget") or {}
        if not isinstance(budget, dict):
            raise RetryConfigError("budget", "expected a mapping, got %r" % (budget,))
        try:
            ratio = _number(budget, "ratio", DEFAULT_BUDGET_RATIO, 0.0)
            min_per_second = _number(budget, "min_per_second", DEFAULT_BUDGET_MIN_PER_SECOND, 0.0)
        except RetryConfigError as exc:
            raise RetryConfigError("budget." + exc.key, exc.reason) from None
        backoff = _number(cfg, "backoff", DEFAULT_BACKOFF, 0.0)
        max_backoff = _number(cfg, "max_backoff", DEFAULT_MAX_BACKOFF, 0.0)
        per_try_timeout = _number(cfg, "per_try_timeout", 0.0, 0.0) if cfg.get("per_try_timeout") is not None else None
        if per_try_timeout == 0.0:
            raise RetryConfigError("per_try_timeout", "must be > 0, got 0")
        return cls(
            attempts=attempts,
            per_try_timeout=per_try_timeout,
            retry_on=names,
            backoff=backoff,
            max_backoff=max_backoff,
            non_idempotent=non_idempotent,
            budget_ratio=ratio,
            budget_min_per_second=min_per_second,
        )

    def should_retry(
        self, attempt: int, method: str, outcome: str, status: int | None, body_size: int | None
    ) -> bool:
        """May the request be tried again after its ``attempt``-th try ended with ``outcome``?"""
        if attempt >= self.attempts or body_size is None or body_size > MAX_REPLAY_BODY_BYTES:
            return False
        if outcome == "response":
            if status not in self._retry_statuses:
                return False
        elif outcome not in self._retry_outcomes:
            return False
        if self.non_idempotent or outcome in _NOTHING_SENT:
            return True
        return method in IDEMPOTENT_METHODS

    def explain(self, attempt: int, method: str, outcome: str, status: int | None, body_size: int | None) -> tuple[bool, str]:
        """`should_retry`'s answer with its reason in words: the `retry_on` condition that
        matched, or why none applies. For `meshctl why`, never on the hot path."""
        if attempt >= self.attempts:
            return False, "attempts used (%d of %d)" % (attempt, self.attempts)
        if body_size is None:
            return False, "the request body was streamed, not kept for a replay"
        if body_size > MAX_REPLAY_BODY_BYTES:
            return False, "body too large to replay (%d bytes, more than %d KiB)" % (body_size, MAX_REPLAY_BODY_BYTES // 1024)
        matched = self.matching_condition(outcome, status)
        if matched is None:
            what = "status %s" % status if outcome == "response" else outcome
            return False, "%s is not in retry_on (%s)" % (what, ", ".join(sorted(self.retry_on)))
        if not (self.non_idempotent or outcome in _NOTHING_SENT or method in IDEMPOTENT_METHODS):
            return False, "%s is not idempotent (retries.non_idempotent is false)" % method
        return True, "retry_on: %s" % matched

    def matching_condition(self, outcome: str, status: int | None) -> str | None:
        """The `retry_on` name that covers this outcome, the most specific one first."""
        for name in sorted(self.retry_on, key=lambda name: (name != outcome, not name.isdigit(), name)):
            if name.isdigit():
                if outcome == "response" and status == int(name):
                    return name
            elif outcome == "response":
                if status in _STATUSES_BY_NAME.get(name, _EMPTY):
                    return name
            elif outcome in _OUTCOMES_BY_NAME[name]:
                return name
        return None

    def backoff(self, attempt: int, rng: RandomSource = random) -> float:
        """Seconds to wait before the next try: full jitter over base * 2^(attempt-1), capped."""
        ceiling = self.backoff_base * (2.0 ** (max(attempt, 1) - 1))
        if ceiling > self.max_backoff:
            ceiling = self.max_backoff
        return rng.random() * ceiling

    def make_budget(self, window: float = DEFAULT_BUDGET_WINDOW) -> RetryBudget:
        """A fresh budget with this policy's ratio and floor (one per upstream service)."""
        return RetryBudget(self.budget_ratio, self.budget_min_per_second, window)

    def __repr__(self) -> str:
        return "RetryPolicy(attempts=%d, retry_on=%s, per_try_timeout=%r, non_idempotent=%r)" % (
            self.attempts,
            ",".join(sorted(self.retry_on)),
            self.per_try_timeout,
            self.non_idempotent,
        )


CONNECT_RETRIES = RetryPolicy(attempts=DEFAULT_ATTEMPTS, retry_on=frozenset({"connect-failure"}))

# What to do after a try failed (after_failure).
ABORT = "abort"  # response bytes went out: only aborting the client connection can tell it
FAIL = "fail"  # answer the client with the mesh error for the outcome
RETRY = "retry"  # another try after a backoff: it counts as a try and spends a retry from the budget
RETRY_STALE = "retry-stale"  # at once, not counted: the peer had closed the pooled connection we reused


def after_failure(
    outcome: str,
    policy: RetryPolicy | None,
    attempt: int,
    method: str,
    body_size: int | None,
    replayable: bool,
    budget_left: bool,
    response_started: bool = False,
    final: bool = False,
    stale_connection: bool = False,
) -> str:
    """ABORT, FAIL, RETRY or RETRY_STALE after the ``attempt``-th try ended with ``outcome`` (no usable response).

    `policy` is the route's (None: `CONNECT_RETRIES`); `body_size` as for `should_retry`;
    `replayable`: the request bytes sent so far are still at hand; `budget_left`: the
    service's retry budget would give one more (RetryBudget.allows); `final`: a limit that
    covers every try fired (the request timeout, the stream idle timeout); `stale_connection`:
    the try went out on a reused keep-alive connection that closed before a response byte
    arrived, the race every HTTP/1.1 client has with a peer's idle timeout.
    """
    if response_started:
        return ABORT
    if final or not replayable:
        return FAIL
    if stale_connection:
        return RETRY_STALE
    if budget_left and (policy or CONNECT_RETRIES).should_retry(attempt, method, outcome, None, body_size):
        return RETRY
    return FAIL


class RetryBudget:
    """Keeps retries a bounded share of traffic, so they cannot multiply an outage.

    The rule, Linkerd's retry budget with a fixed time-to-live: a retry may be spent when

        retries_in_window + 1 <= max(ratio * requests_in_window, min_per_second * window)

    where both counts cover the last ``window`` seconds. Every original request deposits
    ``ratio`` retries; ``min_per_second`` is a floor so a quiet service can still retry.
    Counts live in one-second buckets in a fixed ring (``ceil(window)`` buckets), so the
    window slides in whole buckets: a count leaves between ``window - 1`` and ``window``
    seconds after it was recorded. Time is whatever clock the caller passes (monotonic).
    """

    __slots__ = (
        "ratio",
        "min_per_second",
        "window",
        "_floor",
        "_buckets",
        "_requests",
        "_retries",
        "_total_requests",
        "_total_retries",
        "_current",
    )

    def __init__(
        self,
        ratio: float = DEFAULT_BUDGET_RATIO,
        min_per_second: float = DEFAULT_BUDGET_MIN_PER_SECOND,
        window: float = DEFAULT_BUDGET_WINDOW,
    ) -> None:
        if window <= 0:
            raise ValueError("window: must be > 0, got %r" % (window,))
        self.ratio = ratio
        self.min_per_second = min_per_second
        self.window = window
        self._floor = min_per_second * window
        self._buckets = max(1, math.ceil(window))
        self._requests = [0] * self._buckets
        self._retries = [0] * self._buckets
        self._total_requests = 0
        self._total_retries = 0
        self._current: int | None = None

    def _advance(self, now: float) -> int:
        second = int(now)
        current = self._current
        if current is None or second - current >= self._buckets:
            self._requests = [0] * self._buckets
            self._retries = [0] * self._buckets
            self._total_requests = self._total_retries = 0
        elif second > current:
            for expired in range(current + 1, second + 1):
                slot = expired % self._buckets
                self._total_requests -= self._requests[slot]
                self._total_retries -= self._retries[slot]
                self._requests[slot] = self._retries[slot] = 0
        else:
            # A clock that did not move (or a caller's older timestamp) stays in the bucket.
            return current % self._buckets
        self._current = second
        return second % self._buckets

    def record_request(self, now: float) -> None:
        """Count an original request (not a retry)."""
        slot = self._advance(now)
        self._requests[slot] += 1
        self._total_requests += 1

    def allows(self, now: float) -> bool:
        """Whether `try_spend` would give a retry now; spends nothing."""
        self._advance(now)
        return self._total_retries + 1 <= self._allowance()

    def try_spend(self, now: float) -> bool:
        """Take one retry from the budget if the rule allows it; False means do not retry."""
        slot = self._advance(now)
        if self._total_retries + 1 > self._allowance():
            return False
        self._retries[slot] += 1
        self._total_retries += 1
        return True

    def _allowance(self) -> float:
        allowance = self.ratio * self._total_requests
        return allowance if allowance > self._floor else self._floor

    def __repr__(self) -> str:
        return "RetryBudget(%d requests, %d retries in %gs, ratio=%g, min_per_second=%g)" % (
            self._total_requests,
            self._total_retries,
            self.window,
            self.ratio,
            self.min_per_second,
        )
