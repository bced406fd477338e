"""`meshctl dashboard`: start (or reuse) the agent's web dashboard and open it.

The server runs inside the agent (meshctl/agent/dashboard.py) and lives as long as it; this
command only asks for it, prints the URL with its token, and opens a browser when one can
show it (never on a machine without a display, where a text browser would take the terminal).
"""

from __future__ import annotations

import os
import sys
import webbrowser
from typing import Annotated

import typer

from meshctl import render
from meshctl.common import agent_or_exit


def can_show_browser() -> bool:
    """A graphical browser can open here: macOS, Windows, or a display on other systems."""
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def dashboard(
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port on 127.0.0.1; 0 picks a free one.")] = 0,
    no_open: Annotated[bool, typer.Option("--no-open", help="Do not open a browser.")] = False,
    print_url: Annotated[bool, typer.Option("--print-url", help="Print only the URL (implies --no-open).")] = False,
) -> None:
    """The mesh in a browser, live: topology, services, requests, security, sidecars."""
    result = agent_or_exit().request("dashboard", port=port)
    url = result["url"]
    if print_url:
        print(url)
        return
    out = render.make_console()
    out.out(("dashboard already running: " if result["reused"] else "dashboard: ") + url)
    out.out("the URL holds a secret token: don't share it; it changes when the agent restarts")
    if no_open:
        return
    if not can_show_browser() or not webbrowser.open(url):
        out.out("no browser to open here: open the URL above in yours")


def register(app: typer.Typer) -> None:
    app.command("dashboard")(dashboard)
