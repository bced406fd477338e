"""Which build of the request path runs: the modules compiled by mypyc, or the .py files.

`make compile` (tools/compile_proxy.py) compiles the modules in COMPILED in place, next to
their sources, and writes MANIFEST: the sha256 of each source it compiled and the size and
mtime of each extension it built. Python's import system prefers an extension module to a
.py of the same name, so a compiled module would silently shadow any later edit of its
source. `select()`, run when the package is imported (before any module it names), stops
that: when a source no longer matches the manifest, or an extension is not the one the
manifest recorded, it makes every module of the package load from its .py (a meta-path
finder placed ahead of the normal one) and keeps the reason, which the sidecar logs as a
warning. MESHCTL_PROXY_BUILD=pure does the same on purpose (the second test run). The
wheel carries no extensions: where nothing was compiled, the .py files run as they are.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from importlib.abc import MetaPathFinder
from types import ModuleType

PACKAGE = "meshctl.proxy"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# The request path's modules that type-check cleanly, compiled together (calls between
# them are direct C calls). exchange, server, pool, observe and listeners are the next
# ones, once mypy passes on them: mypyc turns every annotation into a run-time check
# (bench/hotpath.md, "Compiling the engine").
COMPILED = ("http1", "metrics", "limits")
MANIFEST = "_compiled.json"
ENV_NAME = "MESHCTL_PROXY_BUILD"
PURE = "pure"


def source_sha256(path: str) -> str:
    with open(path, "rb") as source:
        return hashlib.sha256(source.read()).hexdigest()


def file_stamp(path: str) -> list[int]:
    """What identifies a built file cheaply: its size and modification time."""
    status = os.stat(path)
    return [status.st_size, status.st_mtime_ns]


def extension_path(module: str, directory: str = PACKAGE_DIR) -> str | None:
    """The extension module that would be imported for `module`, if there is one."""
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = os.path.join(directory, module + suffix)
        if os.path.exists(path):
            return path
    return None


def extensions(directory: str = PACKAGE_DIR) -> list[str]:
    """Every extension module file in the package: the package ships none of its own."""
    suffixes = tuple(importlib.machinery.EXTENSION_SUFFIXES)
    return sorted(name for name in os.listdir(directory) if name.endswith(suffixes))


def stale_reason(directory: str = PACKAGE_DIR) -> str | None:
    """Why the compiled files in `directory` must not run, or None when they match their sources."""
    try:
        with open(os.path.join(directory, MANIFEST), encoding="utf-8") as file:
            manifest = json.load(file)
        recorded = {entry["file"]: (module, entry) for module, entry in manifest["modules"].items()}
        shared = manifest.get("shared", {})
    except (OSError, ValueError, KeyError, TypeError):
        return "compiled files without a readable %s" % MANIFEST
    present = extensions(directory)
    for name in present:
        if name in shared:
            if file_stamp(os.path.join(directory, name)) != shared[name]:
                return "the shared library %s was rebuilt" % name
        elif name not in recorded:
            return "%s is not the extension `make compile` built" % name
    for name, (module, entry) in recorded.items():
        if name not in present:
            return "%s.py is compiled only partly" % module
        if source_sha256(os.path.join(directory, module + ".py")) != entry.get("source_sha256"):
            return "%s.py changed since it was compiled" % module
        if file_stamp(os.path.join(directory, name)) != entry.get("stamp"):
            return "%s is not the extension `make compile` built" % name
    return None


class PureFinder(MetaPathFinder):
    """Finds every module of the package as its .py file, ahead of any extension of the same name."""

    def __init__(self, directory: str = PACKAGE_DIR) -> None:
        self.directory = directory

    def find_spec(self, fullname: str, path: object = None, target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        package, _, module = fullname.rpartition(".")
        source = os.path.join(self.directory, module + ".py")
        if package != PACKAGE or not os.path.exists(source):
            return None
        return importlib.util.spec_from_file_location(fullname, source)


class Build:
    """The build that runs in this process, decided once by `select`."""

    def __init__(self) -> None:
        self.description = "pure Python"
        self.warning: str | None = None  # set when compiled files exist but are ignored

    def select(self) -> None:
        if not extensions() and not os.path.exists(os.path.join(PACKAGE_DIR, MANIFEST)):
            return
        if os.environ.get(ENV_NAME) == PURE:
            self.description = "pure Python (%s=%s)" % (ENV_NAME, PURE)
            sys.meta_path.insert(0, PureFinder())
            return
        reason = stale_reason()
        if reason is not None:
            self.warning = (
                "compiled build is stale (%s): running pure Python; run `make compile`, or "
                "`make clean-compiled` to delete it" % reason
            )
            self.description = "pure Python (stale compiled build ignored)"
            sys.meta_path.insert(0, PureFinder())
            return
        self.description = _compiled_description()


def _compiled_description() -> str:
    """Called once stale_reason() has read the manifest successfully."""
    with open(os.path.join(PACKAGE_DIR, MANIFEST), encoding="utf-8") as file:
        manifest = json.load(file)
    return "compiled (%s, %d modules)" % (manifest.get("compiler", "mypyc"), len(manifest["modules"]))


BUILD = Build()
