"""The `meshctl` command: up, down, status, logs, validate, schema, init.

Commands validate locally what they can (the manifest), then talk to the agent only
through the control API (`meshctl.client`). Exit codes: 0 ok, 1 operational failure,
2 usage or validation error. Errors go to stderr as `error: ...` plus a `hint: ...`
saying what to do; the `ClientError` and `StateDirError` families are translated into
those in one place, `main()`.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

import meshctl
from meshctl import (
    cmd_dashboard,
    cmd_export,
    cmd_obs,
    cmd_ops,
    cmd_route,
    cmd_security,
    cmd_shadow,
    cmd_why,
    completion,
    render,
    resources,
)
from meshctl.agent.sentinel import KEEPER_SOCKET, stop_kept_mesh
from meshctl.client import (
    AgentDisconnected,
    AgentError,
    AgentStartError,
    AgentUnavailable,
    Client,
    ClientError,
    connect,
    connect_or_adopt,
    ensure_agent,
    exit_reason,
    stop_agent,
)
from meshctl.common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, load_manifest_or_exit
from meshctl.completion import complete_service
from meshctl.paths import (
    StateDirError,
    existing_home,
    log_path,
    prepare_home,
    resolve_home,
)

STATUS_POLL_S = 0.2
FAILURE_LOG_LINES = 10
# Enough history that one replica's last lines survive its siblings' chatter.
FAILURE_LOG_FETCH = 500
VALIDATION_ERROR_CODES = ("manifest-invalid", "bad-request", "bad-split", "unknown-version", "bad-scale")
# Stands for the ingress sidecar among the instances `up` waits for; ids always contain "@".
INGRESS_ID = "ingress"

app = typer.Typer(
    name="meshctl",
    help="A service mesh for the processes on one host.",
    add_completion=True,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)


class OutputFormat(str, Enum):
    table = "table"
    json = "json"


class TemplateName(str, Enum):
    shopfast = "shopfast"
    hello = "hello"


class CliFailure(Exception):
    """A command cannot go on; `main()` prints it and exits with `exit_code`."""

    def __init__(self, message: str, hint: str | None = None, exit_code: int = EXIT_FAILURE):
        super().__init__(message)
        self.hint = hint
        self.exit_code = exit_code


def fail(message: str, hint: str | None = None, exit_code: int = EXIT_FAILURE) -> NoReturn:
    raise CliFailure(message, hint, exit_code)


def _show_version(value: bool) -> None:
    if value:
        print(f"meshctl {meshctl.__version__}")
        raise typer.Exit(EXIT_OK)


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_show_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """A service mesh for the processes on one host: canary splits, retries, mTLS, metrics."""


# --- manifests -----------------------------------------------------------------------------


def manifest_environ(file: Path) -> dict[str, str]:
    """This shell's values of the `${VAR}`s the manifest names: the agent fills them in."""
    from meshctl.agent.interpolate import referenced_names

    try:
        names = referenced_names(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError):
        return {}
    return {name: os.environ[name] for name in sorted(names) if name in os.environ}


def instance_ids(manifest: Any) -> list[str]:
    """The ids the agent gives the instances of a manifest: `service@version#replica`."""
    return [
        f"{service.name}@{version.name}#{replica}"
        for service in manifest.services
        for version in service.versions
        for replica in range(version.replicas)
    ]


# --- up ----------------------------------------------------------------------------------


@app.command()
def up(
    file: Annotated[Path, typer.Option("-f", "--file", help="The manifest (mesh.yaml).")],
    timeout: Annotated[
        float, typer.Option(min=0, help="Seconds to wait for every instance to be ready.")
    ] = 60.0,
) -> None:
    """Start the mesh described by FILE, or bring a running mesh in line with it."""
    manifest = load_manifest_or_exit(file)
    home = prepare_home(resolve_home())
    client = ensure_agent(home)
    client.timeout = max(client.timeout, timeout)  # a changed instance is replaced rolling, in `apply`
    try:
        applied = client.request("apply", manifest_path=str(file.resolve()), environ=manifest_environ(file))
    except AgentError as exc:
        if exc.code == "mesh-stopping":
            fail(OVERTAKEN_BY_DOWN, f"run `meshctl up -f {file}` again to start the mesh once `down` returned")
        raise
    except (AgentUnavailable, AgentDisconnected):
        fail_if_agent_stopped(client, home, file)  # between our ping and our apply
        raise
    changes = applied if isinstance(applied, dict) else {}
    # Live `scale` overrides change the counts; the agent says which instances it runs.
    ids = changes.get("instances") or instance_ids(manifest)
    expected = ids + ([INGRESS_ID] if manifest.ingress else [])
    out = render.make_console()
    final = wait_until_ready(client, expected, timeout, out, Applied(home, changes.get("generation"), file))
    states = instance_states(final, expected)
    if any(state != "ready" for state in states.values()):
        report_not_ready(client, states, final, timeout, file)
    for problem in [*(changes.get("dropped_overrides") or []), *(changes.get("rollout_failed") or [])]:
        render.print_error(render.make_console(stderr=True), problem)
    if changes.get("metrics_warning"):
        render.make_console(stderr=True).out("warning: " + changes["metrics_warning"])
    count = len(ids)
    out.out(
        f"mesh {manifest.mesh}: {count}/{count} instances ready"
        f" (started {len(changes.get('started') or [])},"
        f" changed {len(changes.get('changed') or [])},"
        f" stopped {len(changes.get('stopped') or [])})"
    )
    if final.get("ingress"):
        out.out(f"ingress: {render.ingress_url(final['ingress'])}")
    out.out("next: meshctl status · meshctl logs -f · meshctl down")
    if changes.get("rollout_failed"):
        raise typer.Exit(EXIT_FAILURE)


def instances_by_id(status: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {entry.get("id"): entry for entry in status.get("instances") or []}


def instance_states(status: dict[str, Any], expected: list[str]) -> dict[str, str]:
    """The state of each expected instance; "pending" while the agent does not list it.

    The ingress sidecar counts too (as INGRESS_ID) when the agent says whether it is ready.
    """
    entries = instances_by_id(status)
    states = {
        instance_id: entries.get(instance_id, {}).get("state", "pending")
        for instance_id in expected
        if instance_id != INGRESS_ID
    }
    if INGRESS_ID in expected:
        ingress = status.get("ingress") or {}
        states[INGRESS_ID] = "ready" if ingress.get("ready", True) else "starting"
    return states


@dataclass(frozen=True)
class Applied:
    """What this `up` applied: to tell when another command overtook it while it waited."""

    home: Path
    generation: int | None  # the agent's manifest generation; None from an older agent
    file: Path


OVERTAKEN_BY_DOWN = "a `meshctl down` overtook this `up`: the mesh was stopped"


def overtaken(status: dict[str, Any], applied: Applied) -> str | None:
    """Why the mesh will never run `applied.file` as this `up` asked, or None while it may."""
    if status.get("stopping"):
        return OVERTAKEN_BY_DOWN
    running = status.get("manifest") or {}
    if applied.generation is not None and running.get("generation") not in (None, applied.generation):
        return (
            f"another `meshctl up` applied {running.get('source') or 'a manifest'} after this one;"
            f" the mesh runs that manifest now, not {applied.file}"
        )
    return None


def fail_if_agent_stopped(client: Client, home: Path, file: Path) -> None:
    """Exit 1 saying why, if the agent that stopped answering left word that it stopped."""
    reason = exit_reason(home, client.info.get("pid"))
    if reason == "down":
        fail(OVERTAKEN_BY_DOWN, f"run `meshctl up -f {file}` again to start it")
    if reason is not None:
        fail(f"the agent stopped ({reason}) before the mesh was ready", f"run `meshctl up -f {file}` again to start it")


def status_while_waiting(client: Client, applied: Applied) -> dict[str, Any]:
    """The agent's status; exit 1 naming the command that overtook this `up`, if one did."""
    try:
        status = client.request("status") or {}
    except (AgentUnavailable, AgentDisconnected):
        fail_if_agent_stopped(client, applied.home, applied.file)
        raise
    why = overtaken(status, applied)
    if why is not None:
        fail(why, f"`meshctl status` shows what runs; `meshctl up -f {applied.file}` applies yours again")
    return status


def wait_until_ready(
    client: Client, expected: list[str], timeout: float, out: Any, applied: Applied
) -> dict[str, Any]:
    """Poll `status` until every expected instance is ready, one has failed, or time is up.

    Returns the last status. Instances the manifest does not name (being stopped) are
    ignored: they are not what `up` waits for. Exits 1 if a `down` or another manifest's
    `up` overtakes this one meanwhile.
    """
    give_up_at = time.monotonic() + timeout
    last_line = ""
    spinner = out.status("applying", spinner="dots") if out.is_terminal else None
    if spinner is not None:
        spinner.start()
    try:
        while True:
            status = status_while_waiting(client, applied)
            states = instance_states(status, expected)
            if all(state == "ready" for state in states.values()):
                return status
            if "failed" in states.values() or time.monotonic() > give_up_at:
                return status
            line = render.progress_line(states)
            if spinner is not None:
                spinner.update(line)
            elif line != last_line:
                out.out(line)
            last_line = line
            time.sleep(STATUS_POLL_S)
    finally:
        if spinner is not None:
            spinner.stop()


def report_not_ready(
    client: Client, states: dict[str, str], status: dict[str, Any], timeout: float, file: Path
) -> NoReturn:
    """Name each instance that is not ready, why, and its last log lines; exit 1."""
    err = render.make_console(stderr=True)
    instances = instances_by_id(status)
    not_ready = [instance_id for instance_id, state in states.items() if state != "ready"]
    failed = [instance_id for instance_id in not_ready if states[instance_id] == "failed"]
    if failed:
        headline = f"{len(failed)} instance{'s' * (len(failed) != 1)} failed: {', '.join(failed)}"
    else:
        headline = f"{len(not_ready)} instance(s) not ready after {timeout:g} s"
    render.print_error(err, headline)
    for instance_id in not_ready:
        message = (instances.get(instance_id) or {}).get("message")
        err.out(f"  {instance_id}: {states[instance_id]}" + (f" ({message})" if message else ""))
        if instance_id == INGRESS_ID:
            continue  # its sidecar's log is the agent's business, not the logs op's
        lines = last_log_lines(client, instance_id)
        for line in lines:
            err.out(f"    | {line}")
        if not lines:
            err.out("    (it wrote no log lines)")
    services = [instance_id.split("@", 1)[0] for instance_id in not_ready if "@" in instance_id]
    more = f"`meshctl logs {services[0]}`" if services else f"{log_path(resolve_home())}"
    err.out(f"hint: fix the cause, then run `meshctl up -f {file}` again; {more} shows more")
    raise typer.Exit(EXIT_FAILURE)


def last_log_lines(client: Client, instance_id: str) -> list[str]:
    service = instance_id.split("@", 1)[0]
    try:
        with closing(client.events("logs", service=service, tail=FAILURE_LOG_FETCH)) as events:
            lines = [str(e.get("line", "")) for e in events if e.get("instance") == instance_id]
    except ClientError as exc:
        return [f"(logs unavailable: {exc})"]
    return [line.rstrip("\n") for line in lines[-FAILURE_LOG_LINES:]]


# --- down, status, logs -------------------------------------------------------------------


def running_agent(adopt: bool = True) -> tuple[Path, Client | None]:
    """The state directory and its agent, without creating the directory; with `adopt`, a
    new agent that re-adopts the mesh a crashed one left serving."""
    home = resolve_home()
    if existing_home(home) is None:
        return home, None
    return home, connect_or_adopt(home) if adopt else connect(home)


def no_mesh(home: Path) -> NoReturn:
    if (home / KEEPER_SOCKET).exists():
        fail(
            f"no agent answers in {home}; the mesh it ran may still be serving, kept by its"
            " sentinel until agent_grace passes",
            "the next `meshctl status` or `meshctl up` starts an agent that re-adopts it; `meshctl down` stops it",
        )
    fail(f"no mesh running (MESHCTL_HOME={home})", "start one with `meshctl up -f mesh.yaml`")


@app.command()
def down(
    timeout: Annotated[
        float, typer.Option(min=0, help="Seconds to wait before killing the agent.")
    ] = 30.0,
) -> None:
    """Stop every instance and the agent. Never hangs: past the timeout the agent is killed."""
    home, client = running_agent(adopt=False)
    out = render.make_console()
    if client is None:
        if home.exists() and stop_kept_mesh(home, timeout):
            out.out(f"no agent ran in {home}; stopped the mesh its sentinel kept serving since the agent died")
        else:
            out.out(f"no mesh running in {home}")
        return
    mesh = client.info.get("mesh")
    outcome = stop_agent(client, home, timeout)
    if outcome.killed:
        out.out(
            f"the agent (pid {client.info.get('pid')}) did not exit within {timeout:g} s;"
            " killed it with SIGKILL (its sentinel stops the instances it supervised)"
        )
    count = len([stopped for stopped in outcome.stopped if "@" in stopped])  # not "ingress"
    out.out(f"mesh {mesh} stopped ({count} instance{'s' * (count != 1)})")


@app.command()
def status(
    output: Annotated[
        OutputFormat, typer.Option("-o", "--output", help="table or json.")
    ] = OutputFormat.table,
) -> None:
    """Every instance: its state, process ids, ports, restarts and uptime."""
    home, client = running_agent()
    if client is None:
        no_mesh(home)
    result = client.request("status") or {}
    if output is OutputFormat.json:
        print(json.dumps(render.status_json(result), indent=2))
        return
    render.print_status(render.make_console(), result, time.time())


@app.command()
def logs(
    service: Annotated[str | None, typer.Argument(autocompletion=complete_service, help="Only this service's instances.")] = None,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="Keep printing new lines.")] = False,
    tail: Annotated[int, typer.Option(min=0, help="Lines of history per request.")] = 100,
    access: Annotated[bool, typer.Option("--access", help="The sidecars' JSON access lines instead (manifest observability.access_log).")] = False,
) -> None:
    """Print the instances' logs, each line prefixed by its instance (service@version#replica)."""
    home, client = running_agent()
    if client is None:
        no_mesh(home)
    fields: dict[str, Any] = {"tail": tail}
    if service:
        fields["service"] = service
    out = render.make_console()
    try:
        with closing(client.events("access-logs" if access else "logs", follow=follow, **fields)) as events:
            for event in events:
                if access:
                    print(json.dumps(event), flush=True)
                else:
                    render.print_log_line(out, event)
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_OK) from None


# --- local commands ------------------------------------------------------------------------


@app.command()
def validate(
    file: Annotated[Path, typer.Option("-f", "--file", help="The manifest to check.")],
) -> None:
    """Check a manifest without starting anything."""
    manifest = load_manifest_or_exit(file)
    services = len(manifest.services)
    instances = len(instance_ids(manifest))
    print(
        f"{file}: ok (mesh {manifest.mesh}, {services} service{'s' * (services != 1)},"
        f" {instances} instance{'s' * (instances != 1)})"
    )


@app.command()
def schema() -> None:
    """Print the manifest's JSON Schema (for editors and CI)."""
    from meshctl.agent.schema import manifest_json_schema

    print(json.dumps(manifest_json_schema(), indent=2))


# Only the top-level key: a service's `workdir` is relative to the mesh's, not to the file.
WORKDIR_LINE = re.compile(
    r"^(?P<lead>workdir:[ \t]*)(?P<value>[^#\n]*?)(?P<trail>[ \t]*(?:#[^\n]*)?)$",
    re.MULTILINE,
)


def workdir_here(text: str) -> str:
    """Point the mesh's `workdir:` at the manifest's own folder (`.`).

    A template's `workdir: ..` means the repository root, where `demo-services/` lies;
    `init` copies the demo services beside the new mesh.yaml, so there it means `.`.
    """
    rewritten, count = WORKDIR_LINE.subn(lambda match: f"{match['lead']}.{match['trail']}", text)
    return rewritten if count else text.rstrip("\n") + "\nworkdir: .\n"


@app.command()
def init(
    template: Annotated[
        TemplateName, typer.Option("--template", "-t", help="Which example to start from.")
    ] = TemplateName.hello,
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing mesh.yaml.")] = False,
) -> None:
    """Write an example mesh.yaml, and the demo services it runs, into the current directory."""
    source = resources.templates_dir() / f"{template.value}.yaml"
    target = Path.cwd() / "mesh.yaml"
    if target.exists() and not force:
        fail(f"{target} already exists", "pass --force to overwrite it")
    try:
        text = source.read_text(encoding="utf-8")
        copied = resources.copy_demo(Path.cwd(), overwrite=force)
    except OSError as exc:
        fail(f"cannot copy template {template.value}: {exc}", "reinstall meshctl (pip install --force-reinstall meshctl)")
    target.write_text(workdir_here(text), encoding="utf-8")
    print(f"wrote {target} (template {template.value})")
    if copied:
        print(f"wrote {len(copied)} demo services into {Path.cwd() / resources.DEMO_FOLDER}")
    print(f"Prometheus and Grafana files: {resources.templates_dir()}")
    print("next: meshctl up -f mesh.yaml")


cmd_route.register(app)
cmd_ops.register(app)
cmd_security.register(app)
cmd_obs.register(app)
cmd_export.register(app)
completion.register(app)
cmd_shadow.register(app)
cmd_dashboard.register(app)
cmd_why.register(app)


# --- entry point ---------------------------------------------------------------------------


def translate(exc: Exception) -> CliFailure:
    """Turn the errors of the lower layers into what the user reads, with an exit code."""
    if isinstance(exc, CliFailure):
        return exc
    if isinstance(exc, StateDirError):
        return CliFailure(str(exc), exc.hint)
    log_hint = f"see {log_path(resolve_home())}"
    if isinstance(exc, AgentStartError):
        tail = "\n".join(f"  | {line}" for line in exc.log_tail) or "  (agent.log is empty)"
        return CliFailure(f"{exc}; last lines of its log:\n{tail}", log_hint)
    if isinstance(exc, AgentError):
        code = EXIT_USAGE if exc.code in VALIDATION_ERROR_CODES else EXIT_FAILURE
        return CliFailure(str(exc), exc.hint, code)
    if isinstance(exc, AgentUnavailable):
        return CliFailure(f"the agent stopped answering ({exc})", log_hint)
    if isinstance(exc, ClientError):
        return CliFailure(str(exc), log_hint)
    raise TypeError(f"not a meshctl error: {exc!r}")


def main() -> None:
    try:
        app()
    except (CliFailure, StateDirError, ClientError) as exc:
        failure = translate(exc)
        render.print_error(render.make_console(stderr=True), str(failure), failure.hint)
        sys.exit(failure.exit_code)


if __name__ == "__main__":
    main()
