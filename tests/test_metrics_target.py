"""A stable merged-metrics target (a real Prometheus across an agent restart), the file_sd
list, quiet services in stat/top, shell completion from the running mesh, and ${VAR}
secrets that never show."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest

from tests.meshharness import free_port, http_get, wait_for

MESH = """
mesh: metrics
observability: {{metrics: {{port: {metrics}}}}}
services:
  busy:
    health: {{http: /healthz}}
    versions:
      v1: {{command: {PY} {APPS}/echo.py, env: {{TOKEN: "${{MESH_TEST_SECRET}}"}}}}
  idle:
    health: {{http: /healthz}}
    versions:
      v1: {{command: {PY} {APPS}/echo.py}}
ingress:
  port: {port}
  routes: [{{path: /, service: busy}}]
"""

SECRET = "s3cret-value-that-must-not-show"


def write(mesh, metrics_port: int) -> int:
    port = free_port()
    mesh.write_manifest(MESH.format(metrics=metrics_port, port=port, PY="{PY}", APPS="{APPS}"))
    mesh.env["MESH_TEST_SECRET"] = SECRET
    return port


class Prometheus:
    def __init__(self, tmp: Path, targets: str, file_sd: Path) -> None:
        self.port = free_port()
        config = tmp / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s}\n"
            "scrape_configs:\n"
            "  - job_name: meshctl\n"
            "    honor_labels: true\n"
            "    static_configs: [{targets: ['%s']}]\n"
            "  - job_name: sidecars\n"
            "    file_sd_configs: [{files: ['%s'], refresh_interval: 1s}]\n" % (targets, file_sd)
        )
        self.log = tmp / "prometheus.log"
        with self.log.open("w") as log:
            self.proc = subprocess.Popen(
                ["prometheus", "--config.file", str(config), "--storage.tsdb.path", str(tmp / "tsdb"),
                 "--web.listen-address", "127.0.0.1:%d" % self.port],
                stdout=subprocess.DEVNULL, stderr=log,
            )

    def query(self, expr: str) -> list[dict]:
        url = "http://127.0.0.1:%d/api/v1/query?query=%s" % (self.port, urllib.parse.quote(expr))
        try:
            status, _headers, body = http_get(url, timeout=5)
        except OSError:
            return []
        return json.loads(body)["data"]["result"] if status == 200 else []

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed (`make test-deps` installs it as root)")
def test_prometheus_keeps_scraping_the_mesh_across_an_agent_restart(mesh, tmp_path: Path) -> None:
    metrics_port = free_port()
    port = write(mesh, metrics_port)
    mesh.up()
    assert mesh.cli("metrics", check=True).stdout.strip() == "http://127.0.0.1:%d/metrics" % metrics_port
    file_sd = mesh.home / "prometheus-targets.json"
    prometheus = Prometheus(tmp_path, "127.0.0.1:%d" % metrics_port, file_sd)
    try:
        # Every sidecar (two apps' and the ingress) is listed, each with its admin port.
        groups = wait_for(lambda: file_sd.exists() and json.loads(file_sd.read_text()), what="file_sd")
        assert sorted(group["labels"]["instance"] for group in groups) == ["busy@v1#0", "idle@v1#0", "ingress"]
        status = mesh.status()
        admin = {row["id"]: row["admin_port"] for row in status["instances"]}
        assert {g["labels"]["instance"]: g["targets"][0] for g in groups}["idle@v1#0"] == "127.0.0.1:%d" % admin["idle@v1#0"]

        for _ in range(5):
            assert http_get("http://127.0.0.1:%d/whoami" % port)[0] == 200
        wait_for(lambda: prometheus.query('up{job="meshctl"} == 1'), timeout=60, what="the merged target up")
        wait_for(lambda: len(prometheus.query('up{job="sidecars"} == 1')) == 3, timeout=60, what="three sidecars up")
        wait_for(lambda: prometheus.query('mesh_requests_total{instance="busy@v1#0"}') or
                 prometheus.query('{__name__=~".*requests.*", instance="busy@v1#0"}'), timeout=60, what="request samples")

        mesh.cli("down", check=True)
        wait_for(lambda: prometheus.query('up{job="meshctl"} == 0'), timeout=60, what="the target seen down")
        mesh.up()
        restarted = time.time()
        assert mesh.cli("metrics", check=True).stdout.strip() == "http://127.0.0.1:%d/metrics" % metrics_port

        def scraped_since_restart() -> bool:
            rows = prometheus.query('up{job="meshctl"}')
            return bool(rows) and rows[0]["value"][1] == "1" and float(rows[0]["value"][0]) > restarted

        wait_for(scraped_since_restart, timeout=60, what="a successful scrape after the restart")
    finally:
        prometheus.stop()


def test_an_explicit_metrics_port_that_is_taken_fails_up_before_anything_starts(mesh) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        write(mesh, taken)
        result = mesh.up(check=False)
    assert result.returncode == 1
    assert "observability.metrics.port %d is in use by another process" % taken in result.stderr
    assert not any(row.get("pid") for row in mesh.status()["instances"])


def test_the_default_port_falls_back_with_a_warning_when_taken(mesh) -> None:
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", 9464))
        holder.listen()
    except OSError:
        pass  # something else holds it already: the mesh must fall back all the same
    try:
        mesh.write_manifest(MESH.replace("observability: {{metrics: {{port: {metrics}}}}}\n", "").format(
            port=free_port(), PY="{PY}", APPS="{APPS}"))
        mesh.env["MESH_TEST_SECRET"] = SECRET
        result = mesh.up()
        assert "warning: metrics: port 9464 is in use, serving on" in result.stderr
        url = mesh.cli("metrics", check=True).stdout.strip()
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":9464/metrics")
    finally:
        holder.close()


def test_quiet_services_are_listed_and_secrets_never_show(mesh) -> None:
    port = write(mesh, 0)
    mesh.up()
    for _ in range(3):
        assert http_get("http://127.0.0.1:%d/whoami" % port)[0] == 200

    def both_listed():
        rows = json.loads(mesh.cli("stat", "-o", "json", check=True).stdout)
        return {row["service"]: row for row in rows} if len(rows) == 2 and any(r["requests"] for r in rows) else None

    rows = wait_for(both_listed, timeout=30, what="stat rows for busy and idle")
    assert rows["idle"]["rps"] == 0 and rows["idle"]["requests"] == 0 and rows["idle"]["p99_ms"] is None
    frame = mesh.cli("top", "--once", check=True).stdout
    idle_line = next(line for line in frame.splitlines() if line.lstrip().startswith("idle"))
    assert " - " in idle_line + " "

    # The app got the secret; no read-out of the mesh shows it.
    shown = [mesh.cli("status", "-o", "json", check=True).stdout, mesh.cli("diff", check=True).stdout]
    for instance in ("busy@v1#0", "idle@v1#0", "ingress"):
        shown.append(mesh.cli("proxy-config", instance, check=True).stdout)
    shown.extend(path.read_text(errors="replace") for path in mesh.home.rglob("*.log"))
    assert not [text for text in shown if SECRET in text]


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_bash_completion_offers_names_from_the_running_mesh(mesh) -> None:
    write(mesh, 0)
    mesh.up()
    script = mesh.cli("completion", "bash", check=True).stdout
    assert "complete -o default -F _meshctl_completion meshctl" in script
    env = dict(mesh.env, PATH=os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]))
    assert shutil.which("meshctl", path=env["PATH"]), "the meshctl script is not installed beside the interpreter"

    def complete(*words: str) -> list[str]:
        program = (
            script
            + '\nCOMP_WORDS=(%s); COMP_CWORD=%d; _meshctl_completion meshctl; printf "%%s\\n" "${COMPREPLY[@]}"\n'
            % (" ".join("'%s'" % word for word in words), len(words) - 1)
        )
        result = subprocess.run(["bash", "-c", program], env=env, capture_output=True, text=True, timeout=60)
        return [line for line in result.stdout.splitlines() if line]

    assert complete("meshctl", "rou") == ["route"]
    assert complete("meshctl", "route", "split", "") == ["busy", "idle"]
    assert complete("meshctl", "route", "split", "busy", "") == ["v1="]
    assert complete("meshctl", "restart", "i") == ["idle", "idle@v1"]
    assert complete("meshctl", "proxy-config", "") == ["busy@v1#0", "idle@v1#0", "ingress"]
