"""Closed-loop throughput with wrk: run it, and parse its text report into numbers.

wrk keeps `connections` requests in flight and sends the next one as soon as a response
arrives, so it measures capacity (requests per second), not latency under a given load;
see openloop.py for that.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from procs import BenchError

_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    errors: int  # socket errors of any kind plus non-2xx/3xx responses
    latency_p50: float | None  # seconds; closed-loop, for reference only
    latency_p99: float | None


def _duration(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not match:
        raise ValueError("not a wrk duration: %r" % text)
    return float(match.group(1)) * _UNITS[match.group(2)]


def parse(report: str) -> WrkResult:
    """Numbers from wrk's report (run with --latency for the percentiles)."""
    total = re.search(r"(\d+) requests in ([\d.]+\w+),", report)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", report)
    if not total or not rps:
        raise ValueError("not a wrk report: %r" % report[:200])
    errors = 0
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", report)
    if socket_errors:
        errors += sum(int(n) for n in socket_errors.groups())
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", report)
    if non_2xx:
        errors += int(non_2xx.group(1))
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+\w+)\s*$", report, re.MULTILINE))
    return WrkResult(
        requests=int(total.group(1)),
        seconds=_duration(total.group(2)),
        rps=float(rps.group(1)),
        errors=errors,
        latency_p50=_duration(percentiles["50"]) if "50" in percentiles else None,
        latency_p99=_duration(percentiles["99"]) if "99" in percentiles else None,
    )


def run(url: str, seconds: float, connections: int = 32, threads: int = 1) -> WrkResult:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise BenchError("wrk is not installed (make bench-deps)")
    argv = [wrk, "-t%d" % threads, "-c%d" % connections, "-d%gs" % seconds, "--latency", url]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30, stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise BenchError("wrk failed (%d): %s" % (done.returncode, (done.stderr or done.stdout)[-500:]))
    return parse(done.stdout)
