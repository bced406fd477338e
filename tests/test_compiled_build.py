"""The compiled request path (`make compile`, meshctl/proxy/build.py): the sidecar says which
build runs, a compiled module whose source changed never runs (the .py files do, with a
warning in the sidecar's log), and MESHCTL_PROXY_BUILD=pure runs the .py files on purpose.

The tests that need a compiled build skip where there is none (no C compiler, or `make
compile` not run); `make test` compiles first.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshctl.proxy import build
from tests.proxy_harness import Sidecar

ROOT = Path(__file__).resolve().parent.parent
FIRST, LAST = build.COMPILED[0], build.COMPILED[-1]
COMPILED_HERE = build.stale_reason() is None and build.extension_path(FIRST) is not None
needs_compiled = pytest.mark.skipif(not COMPILED_HERE, reason="no compiled build here: run `make compile`")


def _fake_build(directory: Path) -> None:
    """Sources and stand-in extension files for every compiled module, with their manifest."""
    suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
    manifest: dict = {"compiler": "mypyc test", "modules": {}, "shared": {}}
    for module in build.COMPILED:
        (directory / (module + ".py")).write_text("VALUE = %r\n" % module)
        (directory / (module + suffix)).write_bytes(b"\x7fELF " + module.encode())
        manifest["modules"][module] = {
            "source_sha256": build.source_sha256(str(directory / (module + ".py"))),
            "file": module + suffix,
            "stamp": build.file_stamp(str(directory / (module + suffix))),
        }
    (directory / build.MANIFEST).write_text(json.dumps(manifest))


def test_a_build_matching_its_sources_is_not_stale(tmp_path: Path) -> None:
    _fake_build(tmp_path)
    assert build.stale_reason(str(tmp_path)) is None


def test_an_edited_source_makes_the_build_stale(tmp_path: Path) -> None:
    _fake_build(tmp_path)
    with open(tmp_path / (LAST + ".py"), "a") as source:
        source.write("# edited\n")
    assert build.stale_reason(str(tmp_path)) == "%s.py changed since it was compiled" % LAST


def test_an_extension_built_elsewhere_makes_the_build_stale(tmp_path: Path) -> None:
    _fake_build(tmp_path)
    rebuilt = tmp_path / (FIRST + importlib.machinery.EXTENSION_SUFFIXES[0])
    rebuilt.write_bytes(b"\x7fELF another build")
    assert "is not the extension `make compile` built" in (build.stale_reason(str(tmp_path)) or "")


def test_extensions_without_a_manifest_are_stale(tmp_path: Path) -> None:
    _fake_build(tmp_path)
    (tmp_path / build.MANIFEST).unlink()
    assert build.stale_reason(str(tmp_path)) == "compiled files without a readable %s" % build.MANIFEST


def test_an_extension_the_manifest_does_not_list_is_stale(tmp_path: Path) -> None:
    # e.g. left over from a build that compiled more modules than this one
    _fake_build(tmp_path)
    manifest = json.loads((tmp_path / build.MANIFEST).read_text())
    del manifest["modules"][LAST]
    (tmp_path / build.MANIFEST).write_text(json.dumps(manifest))
    name = LAST + importlib.machinery.EXTENSION_SUFFIXES[0]
    assert build.stale_reason(str(tmp_path)) == "%s is not the extension `make compile` built" % name


def test_a_missing_extension_makes_the_build_stale(tmp_path: Path) -> None:
    _fake_build(tmp_path)
    (tmp_path / (LAST + importlib.machinery.EXTENSION_SUFFIXES[0])).unlink()
    assert build.stale_reason(str(tmp_path)) == "%s.py is compiled only partly" % LAST


def _sidecar_log_head(root: Path, env: dict[str, str], timeout: float = 30.0) -> list[str]:
    """The sidecar's log lines up to the one naming its build (it starts, then waits for config)."""
    channel, child_end = socket.socketpair()
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshctl.proxy", "--control-fd", str(child_end.fileno())],
        pass_fds=[child_end.fileno()], env=dict(env, PYTHONPATH=str(root)), cwd=str(root),
        stderr=subprocess.PIPE, text=True,
    )
    child_end.close()
    lines: list[str] = []
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = proc.stderr.readline()  # type: ignore[union-attr]
            if not line:
                break
            lines.append(line)
            if "build:" in line:
                # The warning, when there is one, is the next line.
                if "stale" in line:
                    lines.append(proc.stderr.readline())  # type: ignore[union-attr]
                break
        return lines
    finally:
        channel.close()
        proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()  # type: ignore[union-attr]


def test_the_sidecar_names_the_build_it_runs() -> None:
    sidecar = Sidecar([])
    try:
        deadline = time.monotonic() + 30
        while not any("build:" in line for line in sidecar.stderr_lines) and time.monotonic() < deadline:
            time.sleep(0.05)  # polling the log reader thread, bounded by the deadline
        [line] = [line for line in sidecar.stderr_lines if "build:" in line]
    finally:
        sidecar.stop()
    if os.environ.get(build.ENV_NAME) == build.PURE:
        assert "build: pure Python (MESHCTL_PROXY_BUILD=pure)" in line
    elif COMPILED_HERE:
        assert "build: compiled (mypyc " in line
    else:
        assert "build: pure Python" in line


def _loaded_from(root: Path, env: dict[str, str]) -> dict:
    program = (
        "import importlib, json; from meshctl.proxy.build import BUILD; "
        "first = importlib.import_module('meshctl.proxy.%s'); last = importlib.import_module('meshctl.proxy.%s'); "
        "print(json.dumps({'first': first.__file__, 'last': last.__file__, 'build': BUILD.description, 'warning': BUILD.warning}))"
        % (FIRST, LAST)
    )
    result = subprocess.run([sys.executable, "-c", program], env=dict(env, PYTHONPATH=str(root)), cwd=str(root),
                            capture_output=True, text=True, timeout=60, check=True)
    return json.loads(result.stdout)


@needs_compiled
def test_the_compiled_build_runs_where_it_matches_its_sources() -> None:
    env = {k: v for k, v in os.environ.items() if k != build.ENV_NAME}
    loaded = _loaded_from(ROOT, env)
    assert not loaded["first"].endswith(".py") and not loaded["last"].endswith(".py")
    assert loaded["build"].startswith("compiled (mypyc ") and loaded["warning"] is None


@needs_compiled
def test_pure_on_request_runs_the_py_files() -> None:
    loaded = _loaded_from(ROOT, dict(os.environ, MESHCTL_PROXY_BUILD="pure"))
    assert loaded["first"].endswith(FIRST + ".py") and loaded["last"].endswith(LAST + ".py")
    assert loaded["build"] == "pure Python (MESHCTL_PROXY_BUILD=pure)"


@needs_compiled
def test_a_stale_compiled_build_never_runs(tmp_path: Path) -> None:
    # A copy of the package with its compiled files, then one source edited as a developer would.
    shutil.copytree(ROOT / "meshctl", tmp_path / "meshctl", ignore=shutil.ignore_patterns("__pycache__"),
                    copy_function=shutil.copy2)
    edited = tmp_path / "meshctl" / "proxy" / (FIRST + ".py")
    edited.write_text(edited.read_text() + "\nEDITED_AFTER_COMPILING = True\n")
    env = {k: v for k, v in os.environ.items() if k != build.ENV_NAME}

    loaded = _loaded_from(tmp_path, env)
    assert loaded["first"] == str(tmp_path / "meshctl" / "proxy" / (FIRST + ".py"))
    assert loaded["last"] == str(tmp_path / "meshctl" / "proxy" / (LAST + ".py"))  # every module, not only the edited one
    assert loaded["build"] == "pure Python (stale compiled build ignored)"

    log = "".join(_sidecar_log_head(tmp_path, env))
    assert "build: pure Python (stale compiled build ignored)" in log
    assert "WARNING" in log and "compiled build is stale (%s.py changed since it was compiled)" % FIRST in log
    assert "run `make compile`" in log
