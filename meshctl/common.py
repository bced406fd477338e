"""What every command shares: exit codes, the `-o`/`--window`/`--wait` options, the running
agent or a clean exit, the validated manifest or a clean exit, durations as typed, and the
report of a live change (which config version every sidecar ACKed).

The `cmd_*` modules and cli.py import from here, never from each other, so any command
module can be read (and loaded) on its own.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from meshctl import render
from meshctl.client import Client, connect_or_adopt
from meshctl.paths import existing_home, resolve_home

if TYPE_CHECKING:
    from meshctl.agent.model import Manifest

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
LIVE_TIMEOUT_S = 120.0  # rolling changes wait for instances to become ready

OutputOption = Annotated[str, typer.Option("-o", "--output", help="table or json.")]
WaitOption = Annotated[bool, typer.Option("--wait/--no-wait", help="Wait until every sidecar has ACKed.")]
WindowOption = Annotated[str, typer.Option("-w", "--window", help="How far back to look, e.g. 10s, 1m (at most 2m).")]

_PLAIN_SECONDS = re.compile(r"^\d+(?:\.\d+)?$")


def agent_or_exit() -> Client:
    """The running agent of `$MESHCTL_HOME`, or exit 1 saying how to start one."""
    home = resolve_home()
    client = connect_or_adopt(home) if existing_home(home) is not None else None
    if client is None:
        render.print_error(render.make_console(stderr=True), f"no mesh running (MESHCTL_HOME={home})",
                           "start one with `meshctl up -f mesh.yaml`")
        raise typer.Exit(EXIT_FAILURE)
    client.timeout = LIVE_TIMEOUT_S
    return client


def load_manifest_or_exit(file: Path) -> Manifest:
    """The validated manifest, or exit 2 with every problem as `file:line: path: message`."""
    from meshctl.agent.errors import ManifestError
    from meshctl.agent.manifest import load_manifest

    err = render.make_console(stderr=True)
    try:
        return load_manifest(file)
    except ManifestError as exc:
        problems = str(exc).splitlines()
        count = len(problems)
        render.print_error(err, f"{file} is not a valid manifest ({count} problem{'s' * (count != 1)})")
        for line in problems:
            err.out(line)
        err.out("hint: `meshctl schema` prints the JSON Schema the manifest must follow")
    except OSError as exc:
        render.print_error(err, f"cannot read {file}: {exc.strerror}", "check the path given to -f")
    raise typer.Exit(EXIT_USAGE)


def report_change(result: dict[str, Any], what: str, wait: bool) -> None:
    """Print the outcome of a route change; exit 1 naming any sidecar that did not ACK it."""
    out = render.make_console()
    if not wait:
        out.out(f"{what} (pushing; not waiting for the sidecars' ACKs)")
        return
    sidecars = result.get("sidecars") or []
    problems = result.get("problems") or []
    if problems:
        err = render.make_console(stderr=True)
        render.print_error(err, f"{what}: config v{result.get('version')} not in force everywhere")
        for problem in problems:
            err.out(f"  {problem}")
        err.out("hint: `meshctl proxy-status` shows each sidecar; `meshctl route reset SERVICE` goes back")
        raise typer.Exit(EXIT_FAILURE)
    out.out(f"{what} · config v{result.get('version')} ACKed by {len(sidecars)} sidecar"
            f"{'s' * (len(sidecars) != 1)}" + (f" ({', '.join(sidecars)})" if sidecars else ""))


def duration_seconds(text: str, what: str = "duration") -> float:
    """A duration as typed on the command line: the manifest's forms, or plain seconds.

    The agent's parser (agent/durations.py) is the one definition; a bad value is a usage
    error (exit 2) that names what was expected.
    """
    from meshctl.agent.durations import DurationError, parse_duration

    text = text.strip()
    try:
        return parse_duration(float(text) if _PLAIN_SECONDS.match(text) else text)  # "2": seconds, as in a manifest
    except DurationError:
        raise typer.BadParameter(f"{what} {text!r}: expected a duration like 500ms, 30s, 2m") from None
