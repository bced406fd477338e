"""`meshctl shadow`: copy live traffic to a version, compare its answers, report the differences.

    meshctl shadow SERVICE VERSION [--percent 100] [--path /] [--unsafe] [--ignore-header H] [--ignore-json PATH]
    meshctl shadow stop SERVICE
    meshctl shadow report SERVICE [-o json]

The shadow is a live override (agent.overrides.Shadow): `route show` and `diff` show it,
it survives an agent restart, `route reset` drops it. The comparison runs in the callers'
sidecars after the client has its answer (proxy.shadow); the agent adds the results up.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from meshctl import render
from meshctl.cmd_route import EXIT_USAGE, OutputOption, WaitOption, agent_or_exit, report_change

ACTIONS = ("stop", "report")


def shadow(
    first: Annotated[str, typer.Argument(metavar="SERVICE|stop|report", help="The service to shadow, or stop / report.")],
    second: Annotated[str, typer.Argument(metavar="VERSION|SERVICE", help="The version that gets the copies, or the service.")],
    percent: Annotated[float, typer.Option(help="Share of SERVICE's requests copied, more than 0 and at most 100.")] = 100.0,
    path: Annotated[str, typer.Option(help="Only requests whose path starts with this prefix.")] = "/",
    unsafe: Annotated[bool, typer.Option("--unsafe", help="Copy POST, PUT, PATCH and DELETE too (the shadow really runs them).")] = False,
    ignore_header: Annotated[list[str] | None, typer.Option("--ignore-header", help="A header that is noise (repeatable).")] = None,
    ignore_json: Annotated[list[str] | None, typer.Option("--ignore-json", help="A JSON path that is noise, e.g. $.ts or $.items[*].id (repeatable).")] = None,
    output: OutputOption = "table",
    wait: WaitOption = True,
) -> None:
    """Shadow SERVICE's requests to VERSION and compare its answers with the primary's.

    `shadow stop SERVICE` ends it; `shadow report SERVICE` shows what differed.
    """
    if first == "stop":
        result = agent_or_exit().request("shadow-stop", service=second, wait=wait)
        report_change(result, f"{second}: shadow stopped (`meshctl shadow report {second}` keeps its results)", wait)
        return
    if first == "report":
        result = agent_or_exit().request("shadow-report", service=second)
        if output == "json":
            print(json.dumps(result, indent=2))
        else:
            print_report(result)
        return
    fields: dict[str, Any] = {
        "service": first, "version": second, "percent": percent, "path": path, "unsafe": unsafe,
        "ignore_headers": ignore_header or [], "ignore_json": ignore_json or [], "wait": wait,
    }
    if not path.startswith("/"):
        render.print_error(render.make_console(stderr=True), f"--path {path!r}: a path prefix starts with /", "e.g. --path /api")
        raise typer.Exit(EXIT_USAGE)
    result = agent_or_exit().request("shadow-start", **fields)
    what = f"{first}: {percent:g}% of requests{'' if path == '/' else ' under ' + path} shadowed to {second}"
    if not unsafe:
        what += " (safe methods only)"
    report_change(result, what, wait)
    if wait:
        render.make_console().out(f"follow with `meshctl shadow report {first}`; end with `meshctl shadow stop {first}`")


def print_report(result: dict[str, Any]) -> None:
    out = render.make_console()
    state = "live" if result.get("live") else "stopped"
    out.out(f"shadow {result['service']} -> {result['version']} ({state}): {result['compared']} compared, "
            f"{result['identical']} identical, {result['different']} different, {result['failed']} failed")
    latency = result["latency"]
    out.out(render.plain_table(("", "P50", "P99"), [
        [name, _ms(latency[name]["p50_ms"]), _ms(latency[name]["p99_ms"])] for name in ("primary", "shadow")]))
    if result["fields"]:
        out.out("")
        rows = []
        for entry in result["fields"]:
            example = (entry["examples"] or [{}])[0]
            rows.append([entry["where"], str(entry["count"]),
                         f"{example.get('method', '')} {example.get('path', '')}".strip(),
                         str(example.get("primary")), str(example.get("shadow"))])
        out.out(render.plain_table(("DIFFERS", "COUNT", "E.G. REQUEST", "PRIMARY", "SHADOW"), rows))
    if result.get("noise"):
        out.out("")
        out.out("noise (differs between two primaries too, not counted): "
                + ", ".join(f"{n['where']} ({n['count']})" for n in result["noise"]))
    for failure in result.get("failures") or []:
        out.out(f"failed {failure['count']}x: {failure['reason']}")


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:g} ms"


def register(root: typer.Typer) -> None:
    root.command("shadow")(shadow)
