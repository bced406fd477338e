"""The instance state machine and the restart decision, as pure data and functions.

An instance is one app process plus its sidecar. Its states, as `meshctl status` shows them:

    STARTING --ready--> READY --exit--> BACKOFF --delay--> STARTING
        |                 |                |
        +------exit-------+----------------+--> FAILED (too many quick crashes, or policy no)
    any --stop--> STOPPING --> STOPPED

Transitions are a table: an unexpected one is a bug, and `transition()` says so loudly
instead of letting an instance drift into a state nothing handles.
"""

from __future__ import annotations

import enum
import random
import signal
from dataclasses import dataclass

from meshctl.agent.model import RestartPolicy


class State(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    BACKOFF = "backoff"
    FAILED = "failed"
    STOPPING = "stopping"
    STOPPED = "stopped"


_ALLOWED: dict[State, frozenset[State]] = {
    State.STOPPED: frozenset({State.STARTING}),
    State.STARTING: frozenset({State.READY, State.BACKOFF, State.FAILED, State.STOPPING}),
    State.READY: frozenset({State.STARTING, State.BACKOFF, State.FAILED, State.STOPPING}),
    State.BACKOFF: frozenset({State.STARTING, State.FAILED, State.STOPPING}),
    State.FAILED: frozenset({State.STARTING, State.STOPPING}),
    State.STOPPING: frozenset({State.STOPPED}),
}


class IllegalTransition(RuntimeError):
    pass


def transition(current: State, new: State) -> State:
    if new is current:
        return current
    if new not in _ALLOWED[current]:
        raise IllegalTransition(f"instance cannot go from {current.value} to {new.value}")
    return new


@dataclass(frozen=True)
class ExitDecision:
    """What to do after an app exited on its own (not because we stopped it)."""

    state: State  # BACKOFF or FAILED
    delay_s: float  # before the next start, when BACKOFF
    quick_crashes: int  # the new count of consecutive quick crashes
    reason: str


def decide_after_exit(
    policy: RestartPolicy,
    exit_code: int | None,
    ran_for_s: float,
    quick_crashes: int,
    rng: random.Random | None = None,
) -> ExitDecision:
    """Restart with capped, jittered exponential backoff; give up after repeated quick crashes.

    A run of at least `stable_after_s` resets both the count and the delay, so a service
    that crashes once a day is restarted at once, not after a delay earned last week.
    """
    reason = describe_exit(exit_code)
    if policy.policy == "no" or (policy.policy == "on_failure" and exit_code == 0):
        return ExitDecision(State.FAILED, 0.0, quick_crashes, f"{reason}; restart policy {policy.policy}")
    quick = ran_for_s < policy.stable_after_s
    crashes = quick_crashes + 1 if quick else 0
    if crashes >= policy.max_quick_crashes:
        return ExitDecision(
            State.FAILED,
            0.0,
            crashes,
            f"{reason}; crashed {crashes} times within {policy.stable_after_s:g}s of starting, giving up",
        )
    base = min(policy.max_backoff_s, policy.backoff_s * (2 ** max(crashes - 1, 0)))
    jitter = (rng or random).uniform(0.5, 1.0)  # jittered so that replicas don't restart in lockstep
    delay = base * jitter if quick else 0.0
    return ExitDecision(State.BACKOFF, delay, crashes, f"{reason}; restarting in {delay:.1f}s")


def describe_exit(exit_code: int | None) -> str:
    if exit_code is None:
        return "exited"
    if exit_code < 0:
        try:
            name = signal.Signals(-exit_code).name
        except ValueError:
            name = f"signal {-exit_code}"
        return f"killed by {name}"
    return f"exited with code {exit_code}"
