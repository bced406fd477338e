"""`meshctl shadow`, `record`, `replay`: compare a version's answers with the primary's.

    meshctl shadow SERVICE VERSION [--percent 100] [--path /] [--unsafe] [--ignore-header H] [--ignore-json PATH]
    meshctl shadow stop SERVICE
    meshctl shadow report SERVICE [-o json]
    meshctl record SERVICE [--duration 30s] [--limit N] -o FILE [--include-secrets]
    meshctl replay FILE --to SERVICE@VERSION [--compare VERSION] [--rate N] [--unsafe] [--format json]

The shadow is a live override (agent.overrides.Shadow): `route show` and `diff` show it,
it survives an agent restart, `route reset` drops it. The comparison runs in the callers'
sidecars after the client has its answer (proxy.shadow); the agent adds the results up.
"""

from __future__ import annotations

import json
import os
import sys
from contextlib import closing
from pathlib import Path
from typing import Annotated, Any

import typer

from meshctl import render
from meshctl.common import (
    EXIT_USAGE,
    OutputOption,
    WaitOption,
    agent_or_exit,
    duration_seconds,
    report_change,
)

NOISE_SHOWN = 8


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
    state = "replay" if "replay" in result else "live" if result.get("live") else "stopped"
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
    noise = result.get("noise") or []
    if noise:
        out.out("")
        shown = ", ".join(n["where"] for n in noise[:NOISE_SHOWN]) + (f" and {len(noise) - NOISE_SHOWN} more (-o json lists them)"
                                                                     if len(noise) > NOISE_SHOWN else "")
        out.out(f"noise, not counted (differs between two primaries too): {shown}")
    for failure in result.get("failures") or []:
        out.out(f"failed {failure['count']}x: {failure['reason']}")


def record(
    service: Annotated[str, typer.Argument(help="The service whose inbound requests are recorded.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The file to write, JSON lines (mode 0600).")],
    duration: Annotated[str, typer.Option(help="How long to record, e.g. 30s, 2m.")] = "30s",
    limit: Annotated[int | None, typer.Option(min=1, help="Stop after this many requests.")] = None,
    include_secrets: Annotated[bool, typer.Option("--include-secrets", help="Keep authorization, cookie and set-cookie values.")] = False,
) -> None:
    """Write the requests SERVICE receives (method, path, headers, body up to 64 KiB, status) to a file."""
    wait_s = duration_seconds(duration, "--duration")
    client = agent_or_exit()
    client.timeout = wait_s + 30.0
    fields: dict[str, Any] = {"service": service, "duration": wait_s, "include_secrets": include_secrets}
    if limit is not None:
        fields["limit"] = limit
    count = 0
    fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f, closing(client.events("record", **fields)) as events:
        for event in events:
            if event.get("recording"):
                print(f"recording {service} for {duration}" + (f" or {limit} requests" if limit else "") + " ...",
                      file=sys.stderr, flush=True)
                continue
            f.write(json.dumps(event, separators=(",", ":")) + "\n")
            count += 1
    render.make_console().out(f"recorded {count} request{'s' * (count != 1)} to {service} in {output}"
                              + ("" if include_secrets else " (authorization, cookie and set-cookie redacted)"))


def replay(
    file: Annotated[Path, typer.Argument(help="A recording written by `meshctl record`.")],
    to: Annotated[str, typer.Option("--to", help="SERVICE@VERSION that gets the requests.")],
    compare: Annotated[str | None, typer.Option(help="Also send each to this version and compare the answers.")] = None,
    rate: Annotated[float, typer.Option(min=0.001, help="Requests per second.")] = 20.0,
    unsafe: Annotated[bool, typer.Option("--unsafe", help="Send POST, PUT, PATCH and DELETE too.")] = False,
    output: OutputOption = "table",
) -> None:
    """Send recorded requests again through the mesh and report how the answers differ.

    With --compare each request goes to both versions and their answers are compared field
    by field; without, each answer's status is compared with the recorded one.
    """
    service, _, version = to.partition("@")
    if not service or not version:
        render.print_error(render.make_console(stderr=True), f"--to {to!r}: expected SERVICE@VERSION", "e.g. --to cart@v2")
        raise typer.Exit(EXIT_USAGE)
    if not file.is_file():
        render.print_error(render.make_console(stderr=True), f"{file}: no such file", "write one with `meshctl record SERVICE -o FILE`")
        raise typer.Exit(EXIT_USAGE)
    client = agent_or_exit()
    with file.open(encoding="utf-8", errors="replace") as f:
        lines = sum(1 for line in f if line.strip())
    client.timeout = lines / rate + 60.0
    result = client.request("replay", path=str(file.resolve()), service=service, version=version, compare=compare,
                            rate=rate, unsafe=unsafe)
    if output == "json":
        print(json.dumps(result, indent=2))
        return
    info = result["replay"]
    render.make_console().out(f"replayed {info['sent']} requests from {file} to {to}"
                              + (f", compared with {compare}" if compare else ", compared with the recorded status")
                              + (f"; {info['skipped_unsafe']} unsafe requests skipped (--unsafe sends them)" if info["skipped_unsafe"] else "")
                              + (f"; {info['unanswered']} unanswered" if info["unanswered"] else ""))
    print_report(result)


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:g} ms"


def register(root: typer.Typer) -> None:
    root.command("shadow")(shadow)
    root.command("record")(record)
    root.command("replay")(replay)
