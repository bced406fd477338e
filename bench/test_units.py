"""Pure units of the harness: wrk's report, py-spy's collapsed stacks, percentiles, TLS detection, bursts.

    .venv/bin/python -m pytest bench/test_units.py
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import burst  # noqa: E402
import openloop  # noqa: E402
import report  # noqa: E402
import pyspy  # noqa: E402
import targets  # noqa: E402
import wrk  # noqa: E402

WRK_REPORT = """Running 3s test @ http://127.0.0.1:1234/
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    12.67ms    3.51ms  36.03ms   88.46%
  Latency Distribution
     50%   11.60ms
     75%   12.66ms
     90%   15.46ms
     99%  270.11us
  4898 requests in 2.01s, 841.84KB read
  Socket errors: connect 0, read 7, write 1, timeout 2
  Non-2xx or 3xx responses: 40
Requests/sec:   2438.19
"""


def test_wrk_report_parsed():
    result = wrk.parse(WRK_REPORT)
    assert result.requests == 4898
    assert result.seconds == pytest.approx(2.01)
    assert result.rps == pytest.approx(2438.19)
    assert result.errors == 50
    assert result.latency_p50 == pytest.approx(0.0116)
    assert result.latency_p99 == pytest.approx(0.00027011)


def test_wrk_garbage_rejected():
    with pytest.raises(ValueError):
        wrk.parse("unable to connect to 127.0.0.1:1 Connection refused")


@pytest.mark.parametrize(
    ("samples", "p", "expected"),
    [
        ([1.0], 99.9, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 50.0, 2.0),
        ([1.0, 2.0, 3.0, 4.0], 75.1, 4.0),
        (list(range(1, 1001)), 99.9, 999),
        (list(range(1, 1001)), 99.0, 990),
    ],
)
def test_percentile_nearest_rank(samples, p, expected):
    assert openloop.percentile(samples, p) == expected


def test_profile_own_and_total():
    raw = (
        "main (/x/src/meshctl/proxy/__main__.py:60);data_received (/x/src/meshctl/proxy/server.py:100) 7\n"
        "main (/x/src/meshctl/proxy/__main__.py:60) 3\n"
        "main (/x/src/meshctl/proxy/__main__.py:60);data_received (/x/src/meshctl/proxy/server.py:120);"
        "write (/usr/lib/python3.11/asyncio/selector_events.py:9) 2\n"
    )
    profile = pyspy.aggregate(raw)
    assert profile.samples == 12
    rows = {f.function: (f.own, f.total) for f in profile.functions}
    assert rows == {
        "data_received (meshctl/proxy/server.py)": (7, 9),
        "main (meshctl/proxy/__main__.py)": (3, 12),
        "write (asyncio/selector_events.py)": (2, 2),
    }
    assert profile.functions[0].function == "data_received (meshctl/proxy/server.py)"


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        ({"instances": [{"id": "a", "port": 1}]}, False),
        ({"instances": [{"id": "a", "tls": True}]}, True),
        ({"mtls": {"enabled": False}}, False),
        ({"mtls": {"mode": "strict"}}, True),
        ({"instances": [{"inbound_tls": "off"}]}, False),
    ],
)
def test_status_tls_detection(status, expected):
    assert targets._reported_tls(status) is expected


@pytest.mark.parametrize(
    ("response", "reason"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", None),
        (b"HTTP/1.1 502 Bad Gateway\r\nX-Mesh-Error: upstream-connect-failed\r\n\r\n", "status 502 upstream-connect-failed"),
        (b"HTTP/1.1 503 Service Unavailable\r\n\r\n", "status 503 (not from the mesh)"),
        (b"", "reset before a response (eof)"),
    ],
)
def test_burst_classifies_each_response(response, reason):
    assert burst.classify(response, None) == reason


def test_burst_table_lists_failures_and_wall_time_per_level():
    ok = {"requests": 4000, "failed": 0, "failures": {}, "wall_s": 1.5}
    bad = {"requests": 4000, "failed": 3, "failures": {"status 502 upstream-connect-failed": 3}, "wall_s": 2.25}
    lines = report.render_burst({"500": {"mesh": ok, "haproxy": bad}}, ["mesh", "haproxy"], {"burst_requests": 4000})

    assert "| 500 | 0 of 4,000 | 1.50 | 3 of 4,000 | 2.25 |" in lines
    assert "Failures: haproxy at 500: status 502 upstream-connect-failed x3." in lines


def test_why_cost_judged_against_recording_off_and_rendered_as_ratios():
    labels = {"off": "why off", "errors": "defaults", "all": "why all"}
    entry = lambda rps, cpu: {"rps": rps, "proxy_cpu_us": cpu, "runs": [rps], "errors": 0}  # noqa: E731
    results = {
        "observability": {"defaults": entry(9750.0, 102.0), "why off": entry(10000.0, 100.0), "why all": entry(6000.0, 160.0)},
        "why_labels": labels,
        "why_engines": {"off": {"ingress": 20.0, "http2": 40.0}, "errors": {"ingress": 20.2, "http2": 40.4},
                        "all": {"ingress": 36.0, "http2": 80.0}},
    }
    verdict = report.judge_why(results)
    assert verdict.passed is True and verdict.measured.startswith("9750 vs 10000 rps = 0.975x")
    results["observability"]["defaults"] = entry(9600.0, 104.0)
    assert report.judge_why(results).passed is False
    section = "\n".join(report.render_why(results, {"connections": 32, "runs": 3, "seconds": 5.0}))
    assert "| errors (default) | 9600 | 0.960 | 104.0 | 1.040 | 20.20 (1.010x) | 40.40 (1.010x) |" in section
    assert "| all | 6000 | 0.600 | 160.0 | 1.600 | 36.00 (1.800x) | 80.00 (2.000x) |" in section
    assert "MISS: mesh throughput with `observability.why: errors`" in section
    assert report.judge_why({"observability": {"defaults": entry(1.0, 1.0)}}) is None  # an older run: not measured
