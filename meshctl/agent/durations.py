"""Durations as users write them in a manifest, and as the mesh stores them.

A manifest writes a duration as a string with a unit (`"250ms"`, `"2s"`, `"1.5s"`,
`"1m"`, `"1h"`) or as a plain number of seconds (`2`, `0.25`). Everything after the
manifest loader works in float seconds. The JSON Schema uses `DURATION_PATTERN` so that
editors flag a malformed duration before the loader ever sees it.
"""

from __future__ import annotations

import math
import re

DURATION_PATTERN = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)$"
DURATION_HINT = "a duration such as '250ms', '2s', '1m' or a number of seconds"

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(DURATION_PATTERN)


class DurationError(ValueError):
    """A value that is not a duration; the message says what was expected."""


def parse_duration(value: object) -> float:
    """Return `value` in seconds; raise DurationError if it is not a duration."""
    if isinstance(value, bool):
        raise DurationError("expected %s, got boolean" % DURATION_HINT)
    if isinstance(value, (int, float)):
        seconds = float(value)
    elif isinstance(value, str):
        match = _DURATION_RE.match(value.strip())
        if match is None:
            raise DurationError("expected %s, got %r" % (DURATION_HINT, value))
        number = value.strip()[: match.start(2)]
        seconds = float(number) * _UNIT_SECONDS[match.group(2)]
    else:
        raise DurationError("expected %s, got %s" % (DURATION_HINT, type(value).__name__))
    if not math.isfinite(seconds) or seconds < 0:
        raise DurationError("expected %s, got %r" % (DURATION_HINT, value))
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest readable form: 0.25 -> '250ms', 2.0 -> '2s', 90.0 -> '1m30s'."""
    if seconds < 1:
        return "%gms" % round(seconds * 1000, 3)
    if seconds < 60:
        return "%gs" % round(seconds, 3)
    minutes, rest = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    parts = [("h", hours), ("m", minutes), ("s", rest)]
    text = "".join("%d%s" % (amount, unit) for unit, amount in parts if amount)
    return text or "0s"
