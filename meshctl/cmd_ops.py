"""Live operations and introspection: diff, proxy-status, proxy-config, scale, restart.

`scale` and `restart` are rolling: a replacement becomes ready and joins every caller's
endpoints before the instance it replaces leaves them and drains, so callers see no
failed request. `proxy-status` is istioctl's: per sidecar, the config version pushed and
ACKed, SYNCED / STALE / NACK; `proxy-config` prints one sidecar's snapshot, secrets redacted.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from meshctl import render
from meshctl.common import EXIT_USAGE, OutputOption, agent_or_exit
from meshctl.completion import complete_instance, complete_target


def diff(output: OutputOption = "table") -> None:
    """What runs differently from the manifest: live splits, header rules, replica counts."""
    result = agent_or_exit().request("diff")
    if output == "json":
        print(json.dumps(result, indent=2))
        return
    out = render.make_console()
    differences = result.get("differences") or []
    if not differences:
        out.out(f"mesh {result['mesh']}: no live overrides; it runs as {result.get('source') or 'its manifest'} says")
        return
    out.out(f"mesh {result['mesh']}: {len(differences)} live override{'s' * (len(differences) != 1)}"
            f" on top of {result.get('source') or 'the manifest'}")
    for entry in differences:
        out.out(f"  {entry['service']}: {describe(entry)}")
    out.out("hint: `meshctl route reset SERVICE` goes back to the manifest's routing")


def describe(entry: dict[str, Any]) -> str:
    what, live, manifest = entry["what"], entry["live"], entry["manifest"]
    if what == "split":
        return f"split {render.format_split(manifest)} (manifest) -> {render.format_split(live)} (live)"
    if what == "rule":
        return f"rule {live['header']}={live['value']} -> {live['version']} (not in the manifest)"
    if what == "shadow":
        return f"shadow {live['percent']:g}% of requests to {live['version']}, compared (not in the manifest)"
    return f"{what}: {manifest} (manifest) -> {live} (live)"


def proxy_status(output: OutputOption = "table") -> None:
    """Per sidecar: config version pushed and ACKed, SYNCED / STALE / NACK, time since the last ACK."""
    result = agent_or_exit().request("proxy-status")
    if output == "json":
        print(json.dumps(result, indent=2))
        return
    rows = [
        [
            row["sidecar"], f"v{row['pushed']}", f"v{row['acked']}", row["state"],
            "-" if row["since_ack_s"] is None else f"{render.humanize_duration(row['since_ack_s'])} ago",
            row["nack"] or "",
        ]
        for row in result["sidecars"]
    ]
    render.make_console().out(render.plain_table(("SIDECAR", "PUSHED", "ACKED", "STATE", "LAST ACK", "REASON"), rows))


def proxy_config(
    instance: Annotated[str, typer.Argument(autocompletion=complete_instance, help="An instance id (cart@v1#0) or `ingress`.")],
    output: OutputOption = "json",
) -> None:
    """The last config snapshot pushed to one sidecar, with private keys redacted."""
    result = agent_or_exit().request("proxy-config", instance=instance)
    if output == "json":
        print(json.dumps(result, indent=2))
        return
    out = render.make_console()
    out.out(f"{instance}: pushed v{result['pushed']}, ACKed v{result['acked']}"
            + (f", NACK: {result['nack']}" if result.get("nack") else ""))
    for name, service in ((result.get("config") or {}).get("services") or {}).items():
        endpoints = ", ".join(e["id"] for e in service.get("endpoints") or []) or "none ready"
        out.out(f"  {name}: split {render.format_split(service.get('split'))} · endpoints {endpoints}")


def split_target(target: str) -> tuple[str, str | None]:
    service, _, version = target.partition("@")
    return service, version or None


def scale(target: Annotated[str, typer.Argument(autocompletion=complete_target, help="SERVICE[@VERSION]=N, e.g. cart@v2=3.")]) -> None:
    """Run N replicas of a version, live (kept across agent restarts; `up` keeps it too).

    0 is allowed for a version that gets no traffic (weight 0, no rule sends to it).
    """
    name, sep, count = target.rpartition("=")
    if not sep or not count.isdigit() or not name:
        render.print_error(render.make_console(stderr=True), f"{target!r}: expected SERVICE[@VERSION]=N",
                           "e.g. meshctl scale cart@v2=3")
        raise typer.Exit(EXIT_USAGE)
    service, version = split_target(name)
    fields: dict[str, Any] = {"service": service, "replicas": int(count)}
    if version:
        fields["version"] = version
    result = agent_or_exit().request("scale", **fields)
    parts = []
    if result["started"]:
        parts.append("started " + ", ".join(result["started"]))
    if result["stopped"]:
        parts.append("drained and stopped " + ", ".join(result["stopped"]))
    render.make_console().out(f"{service}@{result['version']}: {result['replicas']} replica"
                              f"{'s' * (result['replicas'] != 1)}" + (f" ({'; '.join(parts)})" if parts else " (unchanged)"))


def restart(target: Annotated[str, typer.Argument(autocompletion=complete_target, help="SERVICE or SERVICE@VERSION.")]) -> None:
    """Rolling restart: each instance in turn gets a ready replacement before it drains and stops."""
    service, version = split_target(target)
    fields: dict[str, Any] = {"service": service}
    if version:
        fields["version"] = version
    result = agent_or_exit().request("restart", **fields)
    ids = result["restarted"]
    render.make_console().out(f"restarted {len(ids)} instance{'s' * (len(ids) != 1)}: {', '.join(ids) or '-'}"
                              " (rolling, each replaced by a ready one before it stopped)")


def register(root: typer.Typer) -> None:
    root.command("diff")(diff)
    root.command("proxy-status")(proxy_status)
    root.command("proxy-config")(proxy_config)
    root.command("scale")(scale)
    root.command("restart")(restart)
