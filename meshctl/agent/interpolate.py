"""`${VAR}` and `${VAR:-default}` in manifest strings, from the environment meshctl runs in.

As docker compose does, the substitution happens when the manifest is loaded, so secrets
such as OTLP headers need not be written into the file. Two kinds of names keep their
run-time meaning instead, in either spelling: the variables the agent sets for each
instance (`PORT`, `MESH_*`, and `<UPSTREAM>_URL` for the mesh's services), which a
`command` expands when the instance starts (agent/process.py `expand_vars`). `$NAME`
without braces is never touched here, and `$$` is a literal `$`.

Pure: the caller passes the environment and reports the problems with their lines.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

_REFERENCE = re.compile(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")
_ANY_BRACES = re.compile(r"\$\{(?P<inside>[^}]*)\}?")
_INSTANCE_NAMES = re.compile(r"^(?:PORT|MESH_[A-Z0-9_]*)$")


def referenced_names(text: str) -> set[str]:
    """Every `${NAME}` a manifest's text mentions: what the CLI passes on to the agent."""
    return {match["name"] for match in _REFERENCE.finditer(text) if match["name"]}


def run_time_names(document: Any) -> frozenset[str]:
    """The names an instance gets at start, which load-time substitution must leave alone."""
    services = document.get("services") if isinstance(document, dict) else None
    names = services if isinstance(services, dict) else {}
    return frozenset(re.sub(r"[^A-Z0-9]", "_", str(name).upper()) + "_URL" for name in names)


def substitute(
    document: Any, environ: Mapping[str, str], path: tuple = ()
) -> Iterator[tuple[tuple, str]]:
    """Replace references in every string of `document` in place; yield (path, problem)."""
    keep = run_time_names(document) if path == () else frozenset()
    yield from _walk(document, environ, path, keep)


def _walk(node: Any, environ: Mapping[str, str], path: tuple, keep: frozenset[str]) -> Iterator:
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in list(items):
        here = path + (key,)
        if isinstance(value, str) and "$" in value:
            text, problems = _one(value, environ, keep)
            node[key] = text
            for problem in problems:
                yield here, problem
        elif isinstance(value, (dict, list)):
            yield from _walk(value, environ, here, keep)


def _one(value: str, environ: Mapping[str, str], keep: frozenset[str]) -> tuple[str, list[str]]:
    problems: list[str] = []
    for match in _ANY_BRACES.finditer(value):
        if not _REFERENCE.fullmatch(match.group(0)):
            problems.append(
                "%r is not a variable reference: write ${NAME} or ${NAME:-default}, "
                "or $$ for a literal $" % match.group(0)
            )
    if problems:
        return value, problems

    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name is None:
            return "$"
        if _INSTANCE_NAMES.match(name) or name in keep:
            return match.group(0)
        if name in environ:
            return environ[name]
        if match["default"] is not None:
            return match["default"]
        problems.append(
            "${%s} is not set in the environment meshctl runs in: export %s, "
            "or write ${%s:-default}" % (name, name, name)
        )
        return match.group(0)

    return _REFERENCE.sub(replace, value), problems
