"""What `meshctl top` and `meshctl stat` show: pure rendering of agent.stats rows.

`top_frame` builds one rich renderable per refresh: a table with a row per
service@version (RPS, SUCCESS, P50/P95/P99, IN-FLIGHT, the sidecars' CPU and RSS), then the
busiest paths. It takes plain dicts (`ServiceStats.to_json()`, `RouteStats` as dicts), as
they arrive from the agent's control API. Narrow terminals drop the least useful columns
rather than wrapping: at 80 columns every service and every latency column stays.
`stat_plain` is the pipe-friendly table for `meshctl stat`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Group
from rich.table import Table
from rich.text import Text

from meshctl.render import MISSING, plain_table

SORT_KEYS = ("rps", "success", "p99", "name")
STAT_COLUMNS = ("SERVICE", "VERSION", "RPS", "SUCCESS", "P50", "P95", "P99", "REQUESTS")
WIDE_COLUMNS = 100  # from here on, IN-FLIGHT, CPU and RSS have room
# Room the other columns take, with their two-space gaps; the name columns get the rest.
SERVICE_TABLE_NUMBERS = 62
ROUTE_TABLE_REST = 52
ROUTE_TABLE_REST_WIDE = 90
SUCCESS_WARN = 0.99
SUCCESS_BAD = 0.95


def _sort_key(key: str):
    if key == "rps":
        return lambda row: (-(row.get("rps") or 0.0), _name(row))
    if key == "success":
        # Worst first: that is what someone running `top` looks for.
        return lambda row: (row.get("success_rate") if row.get("success_rate") is not None else 2.0, _name(row))
    if key == "p99":
        return lambda row: (-(row.get("p99_ms") or 0.0), _name(row))
    if key == "name":
        return _name
    raise ValueError("unknown sort key %r, expected one of %s" % (key, ", ".join(SORT_KEYS)))


def _name(row: Mapping[str, Any]) -> tuple[str, str]:
    return (str(row.get("service", "")), str(row.get("version", "")))


def select_rows(rows: Sequence[Mapping[str, Any]], sort: str = "rps", service: str | None = None) -> list[Mapping[str, Any]]:
    """The rows to show, filtered to one service when asked, in `sort` order."""
    key = _sort_key(sort)
    chosen = [row for row in rows if service is None or row.get("service") == service]
    return sorted(chosen, key=key)


def format_rps(value: float | None) -> str:
    if value is None:
        return MISSING
    return "%.0f" % value if value >= 100 else "%.1f" % value


def format_success(value: float | None) -> str:
    return MISSING if value is None else "%.2f%%" % (value * 100)


def format_ms(value: float | None) -> str:
    if value is None:
        return MISSING
    if value >= 10_000:
        return "%.0fs" % (value / 1000)
    if value >= 1000:
        return "%.1fs" % (value / 1000)
    return "%.0fms" % value if value >= 100 else "%.1fms" % value


def format_bytes(value: int | None) -> str:
    if value is None:
        return MISSING
    for unit in ("B", "K", "M", "G"):
        if value < 1024 or unit == "G":
            return "%d%s" % (value, unit) if unit == "B" else "%.1f%s" % (value, unit)
        value /= 1024  # type: ignore[assignment]
    return MISSING


def format_cpu(value: float | None) -> str:
    return MISSING if value is None else "%.1f%%" % value


def _success_style(value: float | None) -> str:
    if value is None:
        return "dim"
    if value < SUCCESS_BAD:
        return "bold red"
    return "yellow" if value < SUCCESS_WARN else "green"


def service_table(rows: Sequence[Mapping[str, Any]], width: int) -> Table:
    wide = width >= WIDE_COLUMNS
    table = Table(box=None, header_style="bold", pad_edge=False, title_justify="left")
    table.add_column("SERVICE", no_wrap=True, overflow="ellipsis", max_width=max(12, width - SERVICE_TABLE_NUMBERS))
    for column in ("RPS", "SUCCESS", "P50", "P95", "P99"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("IN-FLIGHT" if wide else "INFL", justify="right", no_wrap=True)
    table.add_column("CPU", justify="right", no_wrap=True)
    table.add_column("RSS", justify="right", no_wrap=True)
    for row in rows:
        success = row.get("success_rate")
        table.add_row(
            "%s@%s" % (row.get("service"), row.get("version")),
            format_rps(row.get("rps")),
            Text(format_success(success), style=_success_style(success)),
            format_ms(row.get("p50_ms")),
            format_ms(row.get("p95_ms")),
            format_ms(row.get("p99_ms")),
            str(row.get("in_flight", 0)),
            format_cpu(row.get("sidecar_cpu_percent")),
            format_bytes(row.get("sidecar_rss_bytes")),
        )
    return table


def routes_table(routes: Sequence[Mapping[str, Any]], width: int) -> Table:
    wide = width >= WIDE_COLUMNS
    table = Table(box=None, header_style="bold", pad_edge=False)
    table.add_column("SERVICE", no_wrap=True, overflow="ellipsis", max_width=None if wide else 16)
    table.add_column("METHOD", no_wrap=True)
    table.add_column("PATH", no_wrap=True, overflow="ellipsis", max_width=max(8, width - (ROUTE_TABLE_REST_WIDE if wide else ROUTE_TABLE_REST)))
    table.add_column("RPS", justify="right", no_wrap=True)
    table.add_column("SUCCESS", justify="right", no_wrap=True)
    if wide:
        table.add_column("MEAN", justify="right", no_wrap=True)
    table.add_column("WORST", justify="right", no_wrap=True)
    for route in routes:
        success = route.get("success_rate")
        cells: list[Any] = [
            str(route.get("service")),
            str(route.get("method")),
            str(route.get("path")),
            format_rps(route.get("rps")),
            Text(format_success(success), style=_success_style(success)),
        ]
        if wide:
            cells.append(format_ms(route.get("mean_ms")))
        cells.append(format_ms(route.get("worst_ms")))
        table.add_row(*cells)
    return table


def top_frame(
    rows: Sequence[Mapping[str, Any]],
    routes: Sequence[Mapping[str, Any]],
    *,
    width: int,
    sort: str = "rps",
    service: str | None = None,
    title: str = "",
    route_limit: int = 10,
) -> Group:
    """One frame of `meshctl top`: the service table, then the busiest paths."""
    chosen = select_rows(rows, sort, service)
    parts: list[Any] = []
    if title:
        parts.append(Text(title, style="bold"))
    if chosen:
        parts.append(service_table(chosen, width))
    else:
        parts.append(Text("no traffic yet" if service is None else "no traffic for %s yet" % service, style="dim"))
    shown = [route for route in routes if service is None or route.get("service") == service][:route_limit]
    if shown:
        parts.append(Text(""))
        parts.append(Text("busiest paths", style="bold"))
        parts.append(routes_table(shown, width))
    return Group(*parts)


def stat_rows(rows: Sequence[Mapping[str, Any]], sort: str = "name", service: str | None = None) -> list[list[str]]:
    """Plain cells in STAT_COLUMNS order."""
    return [
        [
            str(row.get("service")),
            str(row.get("version")),
            format_rps(row.get("rps")),
            format_success(row.get("success_rate")),
            format_ms(row.get("p50_ms")),
            format_ms(row.get("p95_ms")),
            format_ms(row.get("p99_ms")),
            str(row.get("requests", 0)),
        ]
        for row in select_rows(rows, sort, service)
    ]


def stat_plain(rows: Sequence[Mapping[str, Any]], sort: str = "name", service: str | None = None) -> str:
    """`meshctl stat` for pipes: space-padded columns, no styles."""
    return plain_table(STAT_COLUMNS, stat_rows(rows, sort, service))
