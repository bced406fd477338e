"""meshctl.top: the `top` frame at 80 and 160 columns, sort keys, filters, the plain `stat` table."""

from __future__ import annotations

import pytest
from rich.console import Console

from meshctl.top import STAT_COLUMNS, format_bytes, format_ms, select_rows, stat_plain, top_frame

ROWS = [
    {"service": "frontend", "version": "v1", "rps": 120.4, "success_rate": 0.9991, "p50_ms": 4.2, "p95_ms": 18.0, "p99_ms": 95.5, "requests": 3612, "in_flight": 7, "sidecar_cpu_percent": 12.5, "sidecar_rss_bytes": 31_000_000},
    {"service": "catalog", "version": "v1", "rps": 80.0, "success_rate": 1.0, "p50_ms": 1.9, "p95_ms": 4.8, "p99_ms": 9.6, "requests": 2400, "in_flight": 1, "sidecar_cpu_percent": 6.0, "sidecar_rss_bytes": 28_500_000},
    {"service": "payments-processing-gateway", "version": "v2-canary", "rps": 2.5, "success_rate": 0.91, "p50_ms": 240.0, "p95_ms": 2400.0, "p99_ms": 24000.0, "requests": 75, "in_flight": 3, "sidecar_cpu_percent": None, "sidecar_rss_bytes": None},
    {"service": "cart", "version": "v2", "rps": 0.0, "success_rate": None, "p50_ms": None, "p95_ms": None, "p99_ms": None, "requests": 0, "in_flight": 0},
]
ROUTES = [
    {"service": "frontend", "method": "GET", "path": "/", "rps": 60.0, "success_rate": 1.0, "mean_ms": 5.0, "worst_ms": 120.0},
    {"service": "catalog", "method": "GET", "path": "/items/:id/reviews/:id/very/long/path/template/that/goes/on", "rps": 40.0, "success_rate": 0.5, "mean_ms": 3.0, "worst_ms": 30.0},
    {"service": "payments-processing-gateway", "method": "POST", "path": "/charge", "rps": 2.5, "success_rate": 0.91, "mean_ms": 300.0, "worst_ms": 30000.0},
]


def _render(width: int, **kwargs) -> list[str]:
    console = Console(width=width, record=True, force_terminal=False, color_system=None)
    console.print(top_frame(ROWS, ROUTES, width=width, title="mesh shopfast · 10s window", **kwargs))
    return console.export_text().splitlines()


@pytest.mark.parametrize("width", [80, 160])
def test_frame_fits_and_shows_every_service(width: int) -> None:
    lines = _render(width)
    assert all(len(line) <= width for line in lines), "\n".join(lines)
    text = "\n".join(lines)
    for column in ("RPS", "SUCCESS", "P50", "P95", "P99", "CPU", "RSS"):
        assert column in text
    for name in ("frontend@v1", "catalog@v1", "cart@v2"):
        assert name in text
    assert "payments" in text and "24s" in text and "busiest paths" in text and "/charge" in text


def test_wide_frame_has_full_names_and_extra_columns() -> None:
    text = "\n".join(_render(160))
    assert "payments-processing-gateway@v2-canary" in text and "IN-FLIGHT" in text and "MEAN" in text


@pytest.mark.parametrize(
    ("sort", "order"),
    [
        ("rps", ["frontend", "catalog", "payments-processing-gateway", "cart"]),
        ("success", ["payments-processing-gateway", "frontend", "catalog", "cart"]),
        ("p99", ["payments-processing-gateway", "frontend", "catalog", "cart"]),
        ("name", ["cart", "catalog", "frontend", "payments-processing-gateway"]),
    ],
)
def test_sort_keys(sort: str, order: list[str]) -> None:
    assert [row["service"] for row in select_rows(ROWS, sort)] == order


def test_unknown_sort_key() -> None:
    with pytest.raises(ValueError, match="unknown sort key"):
        select_rows(ROWS, "latency")


def test_service_filter_applies_to_both_tables() -> None:
    text = "\n".join(_render(80, service="catalog"))
    assert "catalog@v1" in text and "frontend" not in text and "/items" in text
    assert "no traffic for nope yet" in "\n".join(_render(80, service="nope"))


def test_stat_plain() -> None:
    lines = stat_plain(ROWS).splitlines()
    assert lines[0].split() == list(STAT_COLUMNS)
    assert lines[1].split() == ["cart", "v2", "0.0", "-", "-", "-", "-", "0"]
    assert lines[3].split() == ["frontend", "v1", "120", "99.91%", "4.2ms", "18.0ms", "95.5ms", "3612"]
    assert all(line == line.rstrip() for line in lines)


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "-"), (0.25, "0.2ms"), (12.34, "12.3ms"), (240.0, "240ms"), (24000.0, "24s")],
)
def test_format_ms(value, text: str) -> None:
    assert format_ms(value) == text


@pytest.mark.parametrize(("value", "text"), [(None, "-"), (512, "512B"), (2048, "2.0K"), (31_000_000, "29.6M"), (5 * 1024**3, "5.0G")])
def test_format_bytes(value, text: str) -> None:
    assert format_bytes(value) == text
