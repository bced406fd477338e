"""Pure units of bench/http2.py and its report section: h2load's summary, the section splice.

    .venv/bin/python -m pytest bench/test_http2.py
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import http2  # noqa: E402
import report  # noqa: E402

H2LOAD_REPORT = """starting benchmark...
Application protocol: h2c
progress: 100% done

finished in 49.16ms, 40684.31 req/s, 3.15MB/s
requests: 2000 total, 2000 started, 1990 done, 1980 succeeded, 10 failed, 3 errored, 7 timeout
status codes: 1980 2xx, 0 3xx, 10 4xx, 0 5xx
time for request:       18us      3.23ms       177us       329us    96.90%
"""


def test_parse_h2load_summary() -> None:
    result = http2.parse_h2load(H2LOAD_REPORT)
    assert result["seconds"] == pytest.approx(0.04916)
    assert result["rps"] == pytest.approx(40684.31)
    assert (result["requests"], result["succeeded"], result["errors"]) == (1990, 1980, 20)


@pytest.mark.parametrize("text", ["", "starting benchmark...\nprogress: 10% done\n"])
def test_parse_h2load_without_summary_raises(text: str) -> None:
    with pytest.raises(http2.BenchError):
        http2.parse_h2load(text)


def _entry(rps: float, cpu: float | None) -> dict:
    return {"rps": rps, "runs": [rps], "mean": 0.001, "p50": 0.001, "p99": 0.002, "proxy_cpu_us": cpu, "errors": 0}


H2_RESULTS = {"connections": 16, "requests": 100, "runs": 1,
              "h2load": {"10": {"direct": _entry(1000.0, None), "mesh": _entry(250.0, 500.0)}}, "grpc": None}


@pytest.mark.parametrize("page, kept", [
    ("# Benchmarks\n\n## A\n\nkeep a\n\n## HTTP/2 through the mesh\n\nold note\n\n## B\n\nkeep b\n", ["keep a", "keep b"]),
    ("# Benchmarks\n\n## A\n\nkeep a\n", ["keep a"]),
])
def test_replace_h2_section_keeps_the_rest(page: str, kept: list[str]) -> None:
    text = report.replace_h2_section(page, H2_RESULTS)
    assert "old note" not in text
    assert text.count(report.H2_TITLE) == 1
    assert "| mesh | 250 | 250 .. 250 | 0.250 |" in text
    for line in kept:
        assert line in text
    if "## B" in page:
        assert text.index(report.H2_TITLE) < text.index("## B")


def test_h2_targets_judged_against_the_http1_path_of_the_same_run() -> None:
    results = dict(H2_RESULTS, grpc={"calls": 1, "concurrency": 1, "runs": 1,
                                     "table": {"direct": _entry(1000.0, None), "mesh": _entry(400.0, 900.0)}},
                   grpc_stream={"messages": 1, "message_bytes": 1, "runs": 1,
                                "table": {"direct": {"rps": 100.0, "runs": [100.0], "proxy_cpu_ms_per_mb": None, "errors": 0},
                                          "mesh": {"rps": 50.0, "runs": [50.0], "proxy_cpu_ms_per_mb": 3.0, "errors": 0}}})
    assert [v.passed for v in report.judge_h2_targets(results, 400.0)] == [True, True, False, None]
    assert [v.passed for v in report.judge_h2_targets(results, 300.0)][0] is False  # 500 us vs 300 us: 1.67x
    assert report.judge_h2_targets(results, None)[0].passed is None  # --h2-only: no HTTP/1.1 figure to compare
    assert "0.250x" in report.judge_h2_targets(results, 400.0)[1].measured
