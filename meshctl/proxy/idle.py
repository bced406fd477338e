"""Stream idle timeout: end a request only when no byte has moved either way for a while.

Per-chunk work must stay nil, so nothing is re-armed as bytes flow: the callers already
count bytes (a connection's `bytes_in + bytes_out`, an HTTP/2 stream's pipes), and a
check that runs now and then compares that count with the one it saw last. A count that
changed means activity since the last check, so the quiet period restarts at this
check; the true silence is never shorter than the one measured, so a stream is never
cut early. Checks run every quarter of the timeout, so a silent stream is cut between
1 and 1.25 times the timeout after its last byte.

`first_check` is when to look first (a plain float, so that requests that end sooner
cost nothing more); `IdleCheck`, made at that first look, is the state of one request's
watch from then on: pure, the caller acts on the verdict.
"""

from __future__ import annotations

__all__ = ["IdleCheck", "STREAM_IDLE_TIMEOUT_CODE", "first_check"]

STREAM_IDLE_TIMEOUT_CODE = "stream-idle-timeout"
_CHECKS_PER_TIMEOUT = 4


def first_check(timeout: float, now: float) -> float:
    """When a request that starts `now` is first looked at."""
    return now + timeout / _CHECKS_PER_TIMEOUT


class IdleCheck:
    """When to look next, and whether a stream has been silent for `timeout` seconds."""

    __slots__ = ("timeout", "moved", "quiet_since", "due")

    def __init__(self, timeout: float, moved: int, now: float) -> None:
        """The first look, at `now`, saw the count `moved`: quiet from here on, at the most."""
        self.timeout = timeout
        self.moved = moved
        self.quiet_since = now
        self.due = first_check(timeout, now)

    def __repr__(self) -> str:
        return "IdleCheck(timeout=%g, quiet_since=%.3f, due=%.3f)" % (self.timeout, self.quiet_since, self.due)

    def expired(self, moved: int, now: float) -> bool:
        """Check with the byte count `moved`; True when silent for the whole timeout, else `due` moves on."""
        if moved != self.moved:
            self.moved = moved
            self.quiet_since = now
        elif now - self.quiet_since >= self.timeout:
            return True
        self.due = min(now + self.timeout / _CHECKS_PER_TIMEOUT, self.quiet_since + self.timeout)
        return False
