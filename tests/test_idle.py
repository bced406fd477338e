"""The stream idle timeout's decision (meshctl/proxy/idle.py), pure: byte counts and clock values in, verdicts out."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from meshctl.proxy.idle import IdleCheck, first_check

TIMEOUT = 8.0


def run(activity: list[float], end: float) -> float | None:
    """Check as the sidecar does (first at first_check, then at each `due`): when a stream with bytes at `activity` is cut."""
    moved = 0
    now = first_check(TIMEOUT, 0.0)
    check = None
    while now <= end:
        moved = sum(1 for moment in activity if moment <= now)
        if check is None:
            check = IdleCheck(TIMEOUT, moved, now)
        elif check.expired(moved, now):
            return now
        now = check.due
    return None


def test_a_stream_that_keeps_moving_is_never_cut():
    assert run([t * 0.5 for t in range(200)], 100.0) is None


def test_a_silent_stream_is_cut_after_the_timeout_and_at_most_a_quarter_more():
    cut = run([0.0, 1.0, 30.0], 60.0)
    assert cut is not None and TIMEOUT <= cut - 1.0 <= TIMEOUT * 1.25


@given(st.lists(st.floats(min_value=0.0, max_value=60.0), max_size=30))
def test_never_cut_before_the_timeout_of_silence(activity):
    cut = run(activity, 120.0)
    if cut is not None:
        last = max([moment for moment in activity if moment <= cut], default=0.0)
        assert cut - last >= TIMEOUT
        assert not any(last < moment <= cut for moment in activity)
