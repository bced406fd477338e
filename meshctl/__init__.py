"""meshctl: the command-line interface (typer + rich).

It parses the user's words, validates manifests locally, and talks to the agent only
through the control API on the agent's unix socket (docs/protocols.md, part 2).
"""

__version__ = "0.1.0"
