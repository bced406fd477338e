"""`meshctl certs ...` and `meshctl policy check`: identities, rotation, authorization.

Nothing secret is ever printed: the agent's answers carry serials, fingerprints and
dates, never keys.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from meshctl import render
from meshctl.common import EXIT_FAILURE, EXIT_USAGE, OutputOption, agent_or_exit
from meshctl.completion import complete_service

certs_app = typer.Typer(help="Workload certificates: list, rotate, bring your own CA.", invoke_without_command=True)
policy_app = typer.Typer(help="Authorization policies.", no_args_is_help=True)


def _date(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def cert_rows(result: dict[str, Any]) -> list[list[str]]:
    return [
        [c["instance"], c["identity"], c["serial"][:16], _date(c["not_after"]),
         render.humanize_duration(c["remaining_s"]), c["fingerprint"][:23]]
        for c in result["certificates"]
    ]


@certs_app.callback()
def certs(ctx: typer.Context, output: OutputOption = "table") -> None:
    """Each sidecar's identity and certificate, and when the root expires."""
    if ctx.invoked_subcommand is not None:
        return
    result = agent_or_exit().request("certs")
    if output == "json":
        print(json.dumps(result, indent=2))
        return
    out = render.make_console()
    root = result["root"]
    left = root["not_after"] - time.time()
    out.out(f"mesh {result['mesh']} · trust domain {result['trust_domain']}")
    out.out(f"root: {root['subject']} · expires {_date(root['not_after'])} (in {render.humanize_duration(left)})"
            f"{' · imported' if root.get('imported') else ''}")
    for label in ("next", "previous"):
        if label in root:
            out.out(f"{label} CA (rotation in progress): {root[label]['subject']}")
    out.out(render.plain_table(("INSTANCE", "IDENTITY", "SERIAL", "NOT AFTER", "REMAINING", "SHA256"), cert_rows(result)))


@certs_app.command("rotate")
def rotate(
    service: Annotated[str | None, typer.Argument(autocompletion=complete_service, help="Only this service's sidecars [all].")] = None,
    ca: Annotated[bool, typer.Option("--ca", help="Rotate the root CA itself, with an overlap.")] = False,
) -> None:
    """Issue new certificates now, live: no connection dropped, no request failed."""
    if ca and service:
        render.print_error(render.make_console(stderr=True), "give either SERVICE or --ca, not both")
        raise typer.Exit(EXIT_USAGE)
    fields: dict[str, Any] = {"ca": ca}
    if service:
        fields["service"] = service
    result = agent_or_exit().request("certs-rotate", **fields)
    what = "the root CA and every certificate" if ca else (f"{service}'s certificates" if service else "every certificate")
    render.make_console().out(f"rotated {what} in {result['seconds']:.2f}s; every sidecar has ACKed")


@certs_app.command("import-ca")
def import_ca(
    cert: Annotated[Path, typer.Argument(help="PEM file: the CA certificate (a root or an intermediate, then its chain).")],
    key: Annotated[Path, typer.Argument(help="PEM file: its private key, unencrypted.")],
) -> None:
    """Sign the mesh's certificates with your own root or intermediate from now on."""
    try:
        cert_pem, key_pem = cert.read_text(), key.read_text()
    except OSError as exc:
        render.print_error(render.make_console(stderr=True), f"cannot read {exc.filename}: {exc.strerror}")
        raise typer.Exit(EXIT_USAGE) from None
    result = agent_or_exit().request("import-ca", cert_pem=cert_pem, key_pem=key_pem)
    render.make_console().out(f"imported {result['root']['subject']}; every certificate reissued and ACKed")


@policy_app.command("check")
def check(
    source: Annotated[str, typer.Argument(metavar="FROM", help="Calling service, ingress, or a spiffe:// ID.")],
    target: Annotated[str, typer.Argument(metavar="TO", help="Called service.")],
    path: Annotated[str, typer.Option("--path", help="Request path.")] = "/",
    method: Annotated[str, typer.Option("--method", help="Request method.")] = "GET",
    output: OutputOption = "table",
) -> None:
    """Would FROM be allowed to call TO? Names the rule that decides (exit 0 allow, 1 deny)."""
    result = agent_or_exit().request("policy-check", **{"from": source, "to": target, "path": path, "method": method})
    if output == "json":
        print(json.dumps(result, indent=2))
    else:
        render.make_console().out(
            f"{result['decision'].upper()}: {result['method']} {result['path']} from {result['from']} "
            f"to {result['to']} (decided by {result['rule']}; mtls {result['mtls']})"
        )
    raise typer.Exit(0 if result["decision"] == "allow" else EXIT_FAILURE)


def register(root: typer.Typer) -> None:
    root.add_typer(certs_app, name="certs")
    root.add_typer(policy_app, name="policy")
