"""What the CLI shows: status tables, log prefixes, messages; rich on a terminal, plain text otherwise.

Everything that decides *what* to show is a pure function of the agent's data (tested
without a terminal); the few functions that take a `Console` only choose *how*.
Rich honours NO_COLOR itself; when output is not a terminal nothing here emits styles,
box drawing or spinners, so pipes and scripts see stable plain text.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from rich.console import Console, JustifyMethod
from rich.table import Table
from rich.text import Text

STATUS_COLUMNS = ("SERVICE", "VERSION", "REPLICA", "STATE", "PID", "PORTS", "RESTARTS", "UPTIME")
JSON_INSTANCE_KEYS = ("service", "version", "replica", "state", "pid", "sidecar_pid", "port", "restarts")
STATE_STYLES = {
    "ready": "green",
    "starting": "yellow",
    "backoff": "red",
    "failed": "bold red",
    "stopped": "dim",
}
# Distinguishable on dark and light backgrounds; no red, which means trouble here.
INSTANCE_COLOURS = (
    "cyan",
    "magenta",
    "blue",
    "green",
    "yellow",
    "bright_cyan",
    "bright_magenta",
    "bright_blue",
    "bright_green",
    "dark_orange",
)
MISSING = "-"


def make_console(*, stderr: bool = False) -> Console:
    """A console that styles only on a terminal (rich also honours NO_COLOR)."""
    return Console(stderr=stderr, force_terminal=None, highlight=False, soft_wrap=True)


def humanize_duration(seconds: float) -> str:
    """Two units at most, like `ps` and `kubectl`: 42s, 3m07s, 2h05m, 4d03h."""
    total = max(0, int(seconds))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def format_split(split: dict[str, Any] | None) -> str:
    """A split as `v1=90 v2=10`, or `-` when there is none."""
    return " ".join(f"{version}={weight}" for version, weight in (split or {}).items()) or "-"


def format_ports(instance: Mapping[str, Any]) -> str:
    """`app 41000 · in 43001`: the app's own port and its sidecar's inbound listener."""
    parts = []
    if instance.get("port") is not None:
        parts.append(f"app {instance['port']}")
    if instance.get("inbound_port") is not None:
        parts.append(f"in {instance['inbound_port']}")
    return " · ".join(parts) or MISSING


def uptime(instance: Mapping[str, Any], now: float) -> str:
    started_at = instance.get("started_at")
    if instance.get("state") not in ("ready", "starting") or not isinstance(
        started_at, (int, float)
    ):
        return MISSING
    return humanize_duration(now - started_at)


def _cell(value: Any) -> str:
    return MISSING if value is None else str(value)


def status_rows(instances: Iterable[Mapping[str, Any]], now: float) -> list[list[str]]:
    """One row of plain cells per instance, in STATUS_COLUMNS order."""
    return [
        [
            _cell(instance.get("service")),
            _cell(instance.get("version")),
            _cell(instance.get("replica")),
            _cell(instance.get("state")),
            _cell(instance.get("pid")),
            format_ports(instance),
            _cell(instance.get("restarts")),
            uptime(instance, now),
        ]
        for instance in instances
    ]


def status_json(status: Mapping[str, Any]) -> dict[str, Any]:
    """The stable `-o json` document: the documented keys first, the agent's extras after."""
    instances = []
    for instance in status.get("instances") or []:
        entry = {key: instance.get(key) for key in JSON_INSTANCE_KEYS}
        entry.update({k: v for k, v in instance.items() if k not in entry})
        instances.append(entry)
    document = {"mesh": status.get("mesh"), "ingress": status.get("ingress"), "instances": instances}
    document.update({k: v for k, v in status.items() if k not in document})
    return document


def plain_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded with spaces, no trailing blanks: easy for `awk` and `column`."""
    widths = [len(header) for header in headers]
    for row in rows:
        widths = [max(width, len(cell)) for width, cell in zip(widths, row, strict=True)]
    lines = []
    for row in [list(headers), *rows]:
        padded = [cell.ljust(width) for cell, width in zip(row, widths, strict=True)]
        lines.append("   ".join(padded).rstrip())
    return "\n".join(lines)


def status_table(rows: Sequence[Sequence[str]], title: str) -> Table:
    table = Table(title=title, title_justify="left", box=None, header_style="bold")
    for column in STATUS_COLUMNS:
        justify: JustifyMethod = "right" if column in ("REPLICA", "PID", "RESTARTS") else "left"
        table.add_column(column, justify=justify, no_wrap=True)
    state_index = STATUS_COLUMNS.index("STATE")
    for row in rows:
        cells: list[str | Text] = list(row)
        state = row[state_index]
        cells[state_index] = Text(state, style=STATE_STYLES.get(state, ""))
        table.add_row(*cells)
    return table


def print_status(console: Console, status: Mapping[str, Any], now: float) -> None:
    instances = status.get("instances") or []
    title = f"mesh {status.get('mesh')}"
    ingress = status.get("ingress")
    if ingress:
        title += f" · ingress {ingress_url(ingress)}"
    if not instances:
        console.out(f"{title}: no instances")
        return
    unattended = without_agent_line(status.get("without_agent") or [], now)
    if unattended:
        console.out(unattended)
    rows = status_rows(instances, now)
    if console.is_terminal:
        console.print(status_table(rows, title))
    else:
        console.out(title)
        console.out(plain_table(STATUS_COLUMNS, rows))


def without_agent_line(periods: Sequence[Mapping[str, Any]], now: float) -> str | None:
    """How long the mesh served with no agent (after agent crashes), None if it never did."""
    if not periods:
        return None
    last = periods[-1]
    total = sum(float(p.get("seconds") or 0) for p in periods)
    line = (f"ran {float(last.get('seconds') or 0):.1f} s without an agent until agent {last.get('agent')}"
            f" re-adopted it {humanize_duration(now - float(last.get('adopted_at') or now))} ago")
    if len(periods) > 1:
        line += f" ({len(periods)} times, {total:.1f} s in all)"
    return line


def ingress_url(ingress: Mapping[str, Any]) -> str:
    return f"http://{ingress.get('host', '127.0.0.1')}:{ingress.get('port')}/"


def instance_colour(instance_id: str) -> str:
    """The same instance gets the same colour in every run (crc32, not salted hash())."""
    return INSTANCE_COLOURS[zlib.crc32(instance_id.encode()) % len(INSTANCE_COLOURS)]


def log_prefix(instance_id: str) -> str:
    return f"{instance_id} | "


def print_log_line(console: Console, event: Mapping[str, Any]) -> None:
    instance_id = str(event.get("instance", "?"))
    line = str(event.get("line", "")).rstrip("\n")
    if console.is_terminal:
        console.print(Text.assemble((log_prefix(instance_id), instance_colour(instance_id)), line))
    else:
        console.out(log_prefix(instance_id) + line)
    console.file.flush()


def progress_line(states: Mapping[str, str]) -> str:
    """`3/7 ready · starting: cart@v1#0, web@v1#0 · backoff: db@v1#0` while `up` waits."""
    ready = sum(1 for state in states.values() if state == "ready")
    by_state: dict[str, list[str]] = {}
    for instance_id, state in states.items():
        if state != "ready":
            by_state.setdefault(state, []).append(instance_id)
    parts = [f"{ready}/{len(states)} ready"]
    parts += [f"{state}: {', '.join(ids)}" for state, ids in by_state.items()]
    return " · ".join(parts)


def print_error(console: Console, message: str, hint: str | None = None) -> None:
    """`error: ...` and `hint: ...` on stderr; red only on a terminal."""
    label = Text("error:", style="bold red")
    console.print(Text.assemble(label, " ", message))
    if hint:
        console.print(Text.assemble(Text("hint:", style="bold"), " ", hint))
