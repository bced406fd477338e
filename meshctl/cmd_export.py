"""`meshctl export kubernetes`: write the mesh as Kubernetes, Gateway API and Istio or Linkerd objects.

Routing comes from the manifest plus, when an agent runs this mesh, its live overrides
(splits and header rules from `route-show`, replica counts from `diff`); the output says
which. Settings the target cannot express are listed on stderr under "not translated".
Exit 2 when the manifest is invalid or versions lack an image (unless
`--allow-placeholders`).
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from meshctl import render
from meshctl.client import ClientError, connect
from meshctl.common import EXIT_USAGE, load_manifest_or_exit
from meshctl.paths import existing_home, resolve_home

app = typer.Typer(help="Export the mesh to another platform.", no_args_is_help=True)


class TargetMesh(str, Enum):
    linkerd = "linkerd"
    istio = "istio"


def live_routing_for(mesh_name: str):
    """The running agent's live routing for this mesh, or None (no agent, or another mesh)."""
    from meshctl.export.context import live_routing

    home = resolve_home()
    if existing_home(home) is None:
        return None
    try:
        client = connect(home)
        if client is None or client.info.get("mesh") != mesh_name:
            return None
        return live_routing(client.request("route-show"), client.request("diff").get("differences") or [])
    except ClientError:
        return None


@app.command("kubernetes")
def kubernetes(
    file: Annotated[Path, typer.Option("-f", "--file", help="The manifest.")] = Path("mesh.yaml"),
    mesh: Annotated[TargetMesh, typer.Option("--mesh", help="The cluster's mesh.")] = TargetMesh.linkerd,
    namespace: Annotated[str, typer.Option("--namespace", "-n", help="Namespace of every object.")] = "default",
    output: Annotated[Path | None, typer.Option("-o", "--output", help="Directory for the YAML files [stdout].")] = None,
    allow_placeholders: Annotated[bool, typer.Option("--allow-placeholders",
                                                     help="Use a placeholder image where none is given.")] = False,
    gateway_class: Annotated[str, typer.Option("--gateway-class",
                                               help="gatewayClassName of the ingress [istio for istio, else default].")] = "",
) -> None:
    """Write Deployments, Services, HTTPRoutes and mesh policy for a Kubernetes cluster."""
    from meshctl.export import ExportInput, MissingImages, export_objects, writer

    manifest = load_manifest_or_exit(file)
    live = live_routing_for(manifest.mesh)
    given = ExportInput(namespace=namespace, mesh=mesh.value, gateway_class=gateway_class,
                        allow_placeholders=allow_placeholders, live=live)
    err = render.make_console(stderr=True)
    try:
        families, notes = export_objects(manifest, given)
    except MissingImages as exc:
        render.print_error(err, "%s: %d version%s without an image" % (exc.code, len(exc.missing), "s" * (len(exc.missing) != 1)))
        for missing in exc.missing:
            err.out("  %s" % missing)
        err.out("hint: add `image:` to each service or version, or pass --allow-placeholders")
        raise typer.Exit(EXIT_USAGE) from None
    if live is None:
        source = "manifest %s only (no agent runs mesh %s)" % (file, manifest.mesh)
    else:
        source = "manifest %s plus the live overrides of the running agent (config v%d)" % (file, live.config_version)
    if output is None:
        print(writer.stream(families, source), end="")
    else:
        for path in writer.write_files(output, families, source):
            render.make_console().out("wrote %s" % path)
    err.out("routing from: %s" % source)
    if notes.items:
        err.out("not translated (%d):" % len(notes.items))
        for line in notes.lines():
            err.out("  %s" % line)


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="export")
