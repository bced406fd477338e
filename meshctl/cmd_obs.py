"""`meshctl metrics | stat | top | tap | edges | trace | logs --access`: what the mesh sees.

Every number comes from the agent (meshctl/agent/control_obs.py), which polls each sidecar's
metrics once a second; rendering is meshctl/top.py and meshctl/agent/traces.py.
"""

from __future__ import annotations

import json
import select
import sys
import termios
import time
import tty
from contextlib import closing
from typing import Annotated, Any

import typer

from meshctl import render, top
from meshctl.agent.traces import SpanRecord, build_tree, render_waterfall
from meshctl.common import (
    EXIT_USAGE,
    OutputOption,
    WindowOption,
    agent_or_exit,
    duration_seconds,
)
from meshctl.completion import complete_service

TOP_KEYS = {"r": "rps", "s": "success", "p": "p99", "n": "name"}

def parse_window(text: str) -> float:
    return duration_seconds(text, "--window")


def metrics(raw: Annotated[bool, typer.Option("--raw", help="Print the merged exposition instead of its URL.")] = False) -> None:
    """The URL where every sidecar's metrics are served merged (for Prometheus)."""
    result = agent_or_exit().request("metrics", raw=raw)
    if result["url"] is None:
        render.print_error(render.make_console(stderr=True), "no mesh is up: the merged metrics are served once `meshctl up` has applied a manifest")
        raise typer.Exit(1)
    sys.stdout.write(result["text"] if raw else result["url"] + "\n")


def stat(
    service: Annotated[str | None, typer.Argument(autocompletion=complete_service, help="Only this service.")] = None,
    output: OutputOption = "table",
    window: WindowOption = "10s",
    from_callers: Annotated[bool, typer.Option("--from-callers", help="What callers saw (outbound), mesh errors included.")] = False,
) -> None:
    """Golden signals per service@version: RPS, success rate, latency percentiles."""
    result = agent_or_exit().request("stat", window=parse_window(window), direction="outbound" if from_callers else "inbound")
    rows = [row for row in result["services"] if service is None or row["service"] == service]
    if output == "json":
        print(json.dumps(rows, indent=2))
        return
    print(top.stat_plain(rows))


def _frame(client: Any, sort: str, service: str | None, width: int) -> Any:
    result = client.request("stat", window=10.0, routes=True, usage=True)
    title = "meshctl top · %s · sort %s (keys: r s p n, q quits)" % (time.strftime("%H:%M:%S"), sort)
    return top.top_frame(result["services"], result.get("routes", []), width=width, sort=sort, service=service, title=title)


def top_command(
    service: Annotated[str | None, typer.Option("--service", help="Only this service.")] = None,
    sort: Annotated[str, typer.Option("--sort", help="rps, success, p99 or name.")] = "rps",
    once: Annotated[bool, typer.Option("--once", help="Print one frame and exit.")] = False,
) -> None:
    """Live traffic per service and the busiest paths, refreshed every second."""
    if sort not in top.SORT_KEYS:
        render.print_error(render.make_console(stderr=True), f"--sort {sort!r}: expected one of {', '.join(top.SORT_KEYS)}")
        raise typer.Exit(EXIT_USAGE)
    client = agent_or_exit()
    console = render.make_console()
    if once or not sys.stdin.isatty():
        console.print(_frame(client, sort, service, console.width))
        return
    from rich.live import Live

    fd = sys.stdin.fileno()
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)
    try:
        with Live(_frame(client, sort, service, console.width), console=console, screen=True, auto_refresh=False) as live:
            while True:
                ready, _, _ = select.select([sys.stdin], [], [], 1.0)  # the refresh period, also waits for keys
                if ready:
                    key = sys.stdin.read(1)
                    if key == "q":
                        return
                    sort = TOP_KEYS.get(key, sort)
                live.update(_frame(client, sort, service, console.width), refresh=True)
    except KeyboardInterrupt:
        pass
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def format_tap(event: dict) -> str:
    return "%s %s %s -> %s tls=%s %s %s %d %.1fms id=%s%s" % (
        time.strftime("%H:%M:%S", time.localtime(event["ts"])), event["direction"][:3],
        event.get("source_identity") or event["source"], event.get("destination_identity") or event["destination"],
        "yes" if event["tls"] else "no", event["method"], event["path"], event["status"], event["ms"],
        event.get("request_id") or "-", " mesh-error=%s" % event["mesh_error"] if event.get("mesh_error") else "",
    )


def tap(
    service: Annotated[str, typer.Argument(autocompletion=complete_service, help="Requests to or from this service.")],
    path: Annotated[str | None, typer.Option("--path", help="Only paths starting with this.")] = None,
    method: Annotated[str | None, typer.Option("--method", help="Only this method.")] = None,
    status: Annotated[str | None, typer.Option("--status", help="Only this status class, e.g. 5xx.")] = None,
    output: OutputOption = "table",
) -> None:
    """Watch live requests: identities, TLS, status, latency, request id (Ctrl-C stops)."""
    client = agent_or_exit()
    fields = {"service": service, "path_prefix": path, "method": method, "status": status}
    try:
        with closing(client.events("tap", follow=True, **fields)) as events:
            for event in events:
                if event.get("tapping"):
                    print("tapping %s ..." % service, file=sys.stderr, flush=True)
                    continue
                print(json.dumps(event) if output == "json" else format_tap(event), flush=True)
    except KeyboardInterrupt:
        pass


def edges(output: OutputOption = "table", window: WindowOption = "1m") -> None:
    """Who talks to whom, with both identities and whether the hop is mTLS."""
    rows = agent_or_exit().request("edges", window=parse_window(window))
    if output == "json":
        print(json.dumps(rows, indent=2))
        return
    cells = [[r["source"], r["destination"], r["client_identity"] or "-", r["server_identity"] or "-",
              "yes" if r["mtls"] else "no", str(r["requests"])] for r in rows]
    print(render.plain_table(("SRC", "DST", "SRC IDENTITY", "DST IDENTITY", "MTLS", "REQUESTS"), cells))


def format_export(counts: dict) -> str:
    """The footer of `meshctl trace`: where spans go and how many made it."""
    line = "otlp export to %s: %d spans exported, %d dropped, %d failed, %d queued" % (
        counts["endpoint"], counts["exported"], counts["dropped"], counts["failed"], counts["queued"])
    return line + ("; last error: %s" % counts["last_error"] if counts.get("last_error") else "")


def trace(
    trace_id: Annotated[str | None, typer.Argument(help="A trace id or its first characters; none lists recent traces.")] = None,
    output: OutputOption = "table",
) -> None:
    """Recent traces, or one trace as a waterfall of its hops."""
    client = agent_or_exit()
    if trace_id is None:
        rows = client.request("traces")
        if output == "json":
            print(json.dumps(rows, indent=2))
            return
        cells = [[r["trace_id"], r["root"], ",".join(r["services"]), str(r["spans"]), "%.1fms" % r["duration_ms"], str(r["errors"])] for r in rows]
        print(render.plain_table(("TRACE", "ROOT", "SERVICES", "SPANS", "DURATION", "ERRORS"), cells))
        export = client.request("traces-export")
        if export is not None:
            print(format_export(export))
        return
    result = client.request("trace", id=trace_id)
    if output == "json":
        print(json.dumps(result, indent=2))
        return
    spans = [SpanRecord(**span) for span in result["spans"]]
    console = render.make_console()
    console.print("trace %s" % result["trace_id"])
    console.print(render_waterfall(build_tree(spans)))


def register(app: typer.Typer) -> None:
    app.command("metrics")(metrics)
    app.command("stat")(stat)
    app.command("top")(top_command)
    app.command("tap")(tap)
    app.command("edges")(edges)
    app.command("trace")(trace)
