"""Progressive delivery: move a service's split towards one version, step by step, gated on stats.

`decide()` is the whole policy, pure: given the current weight of the canary, its stats
over the last interval and the thresholds, it says hold, step (to which weight), done or
roll back (with a reason). `Promotion` is the thin driver: one named task per promotion
that sleeps an interval, asks a `StatsSource`, decides, and applies the split through a
callback. Stats come from the sidecars' metrics (agent.observability.Observability is the
`StatsSource`), over the last interval only, so a step is judged on its own traffic. A
stream's latency there is the time to its response head (docs/observability.md), and a
stream its caller cancels or the mesh cuts for idling ends as 499 on the version's side,
so long-lived requests neither raise the canary's p99 nor count as its errors.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

log = logging.getLogger(__name__)


class StatsSource(Protocol):
    def version_stats(self, service: str, version: str, window_s: float) -> tuple[int, int, float] | None:
        """(requests, errors, p99 in ms) of `service@version` over the last `window_s`, or None."""


@dataclass(frozen=True)
class Thresholds:
    step: int = 10  # percentage points per step
    interval_s: float = 30.0
    max_error_rate: float = 0.01  # fraction
    max_p99_ms: float | None = None


class Action(enum.Enum):
    HOLD = "hold"
    STEP = "step"
    DONE = "done"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class Decision:
    action: Action
    weight: int  # the canary's weight after this decision
    reason: str


def decide(weight: int, stats: tuple[int, int, float] | None, limits: Thresholds) -> Decision:
    """The next move of a promotion whose canary now has `weight` percent of traffic."""
    if weight <= 0:
        # At 0 % there is nothing to judge yet: the first step is what brings the canary traffic.
        nxt = min(100, limits.step)
        return Decision(Action.STEP, nxt, f"starting: 0% -> {nxt}%")
    if stats is None or stats[0] == 0:
        return Decision(Action.HOLD, weight, "no traffic to the canary in the last interval; holding")
    requests, errors, p99_ms = stats
    rate = errors / requests
    if rate > limits.max_error_rate:
        return Decision(
            Action.ROLLBACK, 0,
            f"error rate {rate:.2%} over {requests} requests exceeds {limits.max_error_rate:.2%}",
        )
    if limits.max_p99_ms is not None and p99_ms > limits.max_p99_ms:
        return Decision(Action.ROLLBACK, 0, f"p99 {p99_ms:g} ms exceeds {limits.max_p99_ms:g} ms")
    if weight >= 100:
        return Decision(Action.DONE, 100, "canary takes all traffic")
    nxt = min(100, weight + limits.step)
    return Decision(Action.STEP, nxt, f"healthy ({requests} requests, {rate:.2%} errors); {weight}% -> {nxt}%")


def split_for(canary: str, weight: int, baseline: str) -> dict[str, int]:
    """The whole split when the canary has `weight`: the rest goes to the baseline version."""
    return {baseline: 100 - weight, canary: weight}


class Promotion:
    """One running promotion; `task` is named `promote:<service>` and cancelled by `route reset`."""

    def __init__(
        self,
        service: str,
        canary: str,
        baseline: str,
        start_weight: int,
        limits: Thresholds,
        source: StatsSource,
        apply_split: Callable[[dict[str, int]], Awaitable[None]],
    ) -> None:
        self.service = service
        self.canary = canary
        self.baseline = baseline
        self.weight = start_weight
        self.limits = limits
        self.source = source
        self.apply_split = apply_split
        self.last: Decision | None = None
        self.task: asyncio.Task | None = None

    def __repr__(self) -> str:
        return f"<Promotion {self.service} {self.canary} at {self.weight}%>"

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=f"promote:{self.service}")

    async def run(self) -> Decision:
        while True:
            await asyncio.sleep(self.limits.interval_s)  # the promotion's pace, not synchronisation
            stats = self.source.version_stats(self.service, self.canary, self.limits.interval_s)
            self.last = decision = decide(self.weight, stats, self.limits)
            log.info("promote %s: %s", self.service, decision.reason)
            if decision.action is Action.HOLD:
                continue
            self.weight = decision.weight
            await self.apply_split(split_for(self.canary, self.weight, self.baseline))
            if decision.action in (Action.DONE, Action.ROLLBACK):
                return decision

    def to_json(self) -> dict:
        return {
            "service": self.service, "canary": self.canary, "weight": self.weight,
            "last": None if self.last is None else {"action": self.last.action.value, "reason": self.last.reason},
        }
