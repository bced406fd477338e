"""meshctl installs like a real tool: the sdist and the wheel carry everything, only
`meshctl` lands at the top level of site-packages, and a fresh venv can init, up, serve,
report and go down from an empty directory. Plus: the sidecar loads nothing of the CLI
or the agent.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import psutil
import pytest

from tests.meshharness import REPO, Mesh, free_port, http_get

HEAVY_OR_FOREIGN = ("meshctl.agent", "meshctl.cli", "meshctl.client", "typer", "rich", "cryptography", "yaml", "psutil", "jsonschema")


def test_the_sidecar_loads_nothing_of_the_cli_or_the_agent() -> None:
    program = (
        "import sys, runpy, meshctl.proxy.__main__, meshctl.proxy.server, meshctl.proxy.h2proxy, "
        "meshctl.proxy.control, meshctl.proxy.snapshot; print('\\n'.join(sorted(sys.modules)))"
    )
    result = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True)
    loaded = result.stdout.split()
    assert "meshctl.proxy.server" in loaded
    assert [name for name in loaded if name.startswith(HEAVY_OR_FOREIGN)] == []


def _source_tree(target: Path) -> Path:
    """The files of this checkout that git tracks (or all but build leftovers), to build from."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, timeout=60)
    names = [n for n in listed.stdout.decode().split("\0") if n] if listed.returncode == 0 else []
    if not names:
        shutil.copytree(REPO, target, ignore=shutil.ignore_patterns(".venv", ".state", ".git", "build", "dist", "*.egg-info"))
        return target
    for name in names:
        if (REPO / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, target / name)
    return target


class InstalledMesh(Mesh):
    """The harness's Mesh, driving the `meshctl` of another environment."""

    def __init__(self, tmp: Path, meshctl: Path) -> None:
        super().__init__(tmp)
        self.meshctl = meshctl

    def cli(self, *args: str, timeout: float = 120.0, check: bool = False, cwd: Path | None = None):
        result = subprocess.run(
            [str(self.meshctl), *args], env=self.env, cwd=cwd or self.tmp, capture_output=True, text=True,
            timeout=timeout, stdin=subprocess.DEVNULL,
        )
        self.remember_pids()
        if check and result.returncode != 0:
            raise AssertionError(f"meshctl {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
        return result


@pytest.mark.timeout(900)
def test_a_fresh_venv_installs_the_wheel_and_runs_a_mesh_from_an_empty_directory(tmp_path: Path) -> None:
    source = _source_tree(tmp_path / "src")
    dist = tmp_path / "dist"
    build = subprocess.run(
        [sys.executable, "-m", "build", "--outdir", str(dist), str(source)],
        capture_output=True, text=True, timeout=600,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    [wheel] = dist.glob("meshctl-*.whl")
    [sdist] = dist.glob("meshctl-*.tar.gz")  # built first; the wheel was built from it
    assert sdist.stat().st_size > 0

    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
    top_level = {name.split("/", 1)[0] for name in names if not name.startswith("meshctl-")}
    assert top_level == {"meshctl"}
    # Pure: a `make compile` of the working tree never leaks into it (meshctl/proxy/build.py).
    assert [name for name in names if name.endswith((".so", ".c", "_compiled.json"))] == []
    for shipped in ("meshctl/templates/hello.yaml", "meshctl/templates/shopfast.yaml",
                    "meshctl/templates/grafana-dashboard.json", "meshctl/templates/prometheus.yml",
                    "meshctl/demo_services/frontend.py", "meshctl/demo_services/hello.py"):
        assert shipped in names, shipped

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    install = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", str(wheel)], capture_output=True, text=True, timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]

    project = tmp_path / "empty"
    project.mkdir()
    mesh = InstalledMesh(tmp_path, venv / "bin" / "meshctl")
    mesh.env["PATH"] = os.pathsep.join([str(venv / "bin"), os.environ.get("PATH", "")])
    try:
        mesh.cli("init", check=True, cwd=project)
        manifest = project / "mesh.yaml"
        port = free_port()
        manifest.write_text(manifest.read_text().replace("port: 8081", "port: %d" % port))
        mesh.cli("up", "-f", "mesh.yaml", check=True, cwd=project)
        status, _headers, body = http_get("http://127.0.0.1:%d/" % port)
        assert status == 200, body
        rows = json.loads(mesh.cli("status", "-o", "json", check=True, cwd=project).stdout)["instances"]
        assert [(row["id"], row["state"]) for row in rows] == [("hello@v1#0", "ready")]
        # The installed agent and sidecar run from the fresh venv, not from this checkout.
        sidecar = psutil.Process(rows[0]["sidecar_pid"]).cmdline()
        assert sidecar[0].startswith(str(venv)) and sidecar[1:3] == ["-m", "meshctl.proxy"]
        mesh.cli("down", check=True, cwd=project)
        assert mesh.living() == []
    finally:
        mesh.cleanup()
