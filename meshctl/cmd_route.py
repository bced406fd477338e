"""`meshctl route ...`: show and change a service's routing live, on top of the manifest.

Each change prints the config version it became and returns once every sidecar that
routes to the service has ACKed it (unless `--no-wait`); a sidecar that NACKs it or stays
stale is named and the command exits 1. A change the agent refuses (a split that does not
sum to 100, an unknown version) exits 2 and changes nothing.
"""

from __future__ import annotations

import json
import re
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
from meshctl.completion import complete_service, complete_version, complete_weights

app = typer.Typer(help="Show and change traffic routing live (split, header rules, reset, promote).",
                  no_args_is_help=True)

def format_rule(route: dict[str, Any]) -> str:
    match = route.get("match") or {}
    conds = [f"{h['name']}{'=' if h.get('kind') == 'exact' else '~'}{h['value']}" for h in match.get("headers") or []]
    if match.get("path"):
        conds.append(f"path {match['path'].get('kind')} {match['path'].get('value')}")
    if match.get("methods"):
        conds.append("method " + ",".join(match["methods"]))
    conds += [f"?{q['name']}={q['value']}" for q in match.get("query") or []]
    return f"{' & '.join(conds) or 'any'} -> {render.format_split(route.get('split'))}"


@app.command("show")
def show(
    service: Annotated[str | None, typer.Argument(autocompletion=complete_service, help="Only this service.")] = None,
    output: OutputOption = "table",
) -> None:
    """Each service's live split and rules, and whether they differ from the manifest."""
    fields = {"service": service} if service else {}
    result = agent_or_exit().request("route-show", **fields)
    if output == "json":
        print(json.dumps(result, indent=2))
        return
    rows = []
    for name, entry in result["services"].items():
        live = entry["live"]
        rules = "; ".join(format_rule(r) for r in live["routes"]) or "-"
        if live.get("shadow"):
            rules = f"shadow {live['shadow']['percent']:g}% -> {live['shadow']['version']} (compared)" + (
                "" if rules == "-" else "; " + rules)
        source = "override" if entry["overridden"] else "manifest"
        promotion = entry.get("promotion")
        if promotion:
            source += f", promoting {promotion['canary']} at {promotion['weight']}%"
        rows.append([name, ",".join(entry["versions"]), render.format_split(live["split"]), rules, source])
    out = render.make_console()
    out.out(f"mesh {result['mesh']} · config v{result['config_version']}")
    out.out(render.plain_table(("SERVICE", "VERSIONS", "SPLIT", "RULES", "FROM"), rows))


@app.command("split")
def split(
    service: Annotated[str, typer.Argument(autocompletion=complete_service, help="The service to route.")],
    weights: Annotated[list[str], typer.Argument(autocompletion=complete_weights, help="VERSION=WEIGHT ..., summing to 100.")],
    wait: WaitOption = True,
) -> None:
    """Send each version its share of SERVICE's requests, e.g. `route split cart v1=90 v2=10`."""
    from meshctl.agent.overrides import OverrideError, parse_weights

    try:
        parsed = parse_weights(weights)
    except OverrideError as exc:
        render.print_error(render.make_console(stderr=True), f"{exc.code}: {exc}",
                           "weights are whole numbers summing to 100, e.g. v1=90 v2=10")
        raise typer.Exit(EXIT_USAGE) from None
    result = agent_or_exit().request("route-split", service=service, split=parsed, wait=wait)
    report_change(result, f"{service}: split {render.format_split(parsed)}", wait)


HEADER_ARG = re.compile(r"^([^=:\s]+)[=:](.*)$")


@app.command("set")
def set_rule(
    service: Annotated[str, typer.Argument(autocompletion=complete_service, help="The service to route.")],
    header: Annotated[str, typer.Option("--header", help="NAME=VALUE: match requests with this header.")],
    to: Annotated[str, typer.Option("--to", help="The version that gets them.")],
    wait: WaitOption = True,
) -> None:
    """Send requests carrying a header to one version, before the manifest's rules."""
    match = HEADER_ARG.match(header)
    if match is None:
        render.print_error(render.make_console(stderr=True), f"--header {header!r}: expected NAME=VALUE",
                           "e.g. --header x-canary=true")
        raise typer.Exit(EXIT_USAGE)
    name, value = match.groups()
    result = agent_or_exit().request("route-set", service=service, header=name, value=value, version=to, wait=wait)
    report_change(result, f"{service}: {name.lower()}={value} -> {to}", wait)


@app.command("reset")
def reset(
    service: Annotated[str, typer.Argument(autocompletion=complete_service, help="The service to route as the manifest says.")],
    wait: WaitOption = True,
) -> None:
    """Drop SERVICE's live route overrides (and cancel its promotion): back to the manifest."""
    result = agent_or_exit().request("route-reset", service=service, wait=wait)
    what = f"{service}: routing as in the manifest"
    if result.get("cancelled_promotion"):
        what += " (promotion cancelled)"
    report_change(result, what, wait)


def fraction(text: str) -> float:
    text = text.strip()
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r}: expected a rate like 1% or 0.01") from None


@app.command("promote")
def promote(
    service: Annotated[str, typer.Argument(autocompletion=complete_service, help="The service.")],
    version: Annotated[str, typer.Argument(autocompletion=complete_version, help="The version to move traffic to.")],
    step: Annotated[int, typer.Option(min=1, max=100, help="Percentage points per step.")] = 10,
    interval: Annotated[str, typer.Option(help="Time between steps, e.g. 30s.")] = "30s",
    max_error_rate: Annotated[str, typer.Option(help="Roll back above this error rate, e.g. 1%.")] = "1%",
    max_p99: Annotated[str | None, typer.Option(help="Roll back above this p99 latency, e.g. 300ms.")] = None,
) -> None:
    """Move SERVICE's split to VERSION step by step while its error rate and p99 stay healthy.

    Runs in the agent; `meshctl route show` follows it, `meshctl route reset` cancels it.
    Each step is judged on the canary's requests in the last interval (the sidecars' metrics).
    """
    fields: dict[str, Any] = {
        "service": service, "version": version, "step": step, "interval": duration_seconds(interval, "--interval"),
        "max_error_rate": fraction(max_error_rate),
        "max_p99_ms": None if max_p99 is None else duration_seconds(max_p99, "--max-p99") * 1000,
    }
    result = agent_or_exit().request("promote", **fields)
    render.make_console().out(
        f"{service}: promoting {version} from {result['weight']}% in steps of {step}% every {interval}"
        f" · follow with `meshctl route show {service}`"
    )


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="route")
