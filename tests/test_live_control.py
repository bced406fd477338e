"""Live control on real meshes: route changes under load, NACKs, restarts of the agent,
scaling and rolling restarts, all through the real CLI and the ingress on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections import Counter

import pytest

from meshctl.client import Client
from tests.meshharness import alive, free_port, http_get, wait_for

CANARY = """
mesh: live
services:
  api:
    health: {{http: /healthz}}
    versions:
      v1: {{command: {PY} {APPS}/echo.py, replicas: 2}}
      v2: {{command: {PY} {APPS}/echo.py}}
    split: {{v1: 100}}
ingress:
  port: {port}
  routes: [{{path: /, service: api}}]
"""


def canary(port: int) -> str:
    return CANARY.format(port=port, PY="{PY}", APPS="{APPS}")


class Load:
    """A background caller through the ingress: counts versions answered and failures."""

    def __init__(self, port: int, headers: dict | None = None) -> None:
        self.url = f"http://127.0.0.1:{port}/whoami"
        self.headers = headers or {}
        self.versions: Counter = Counter()
        self.failures: list[str] = []
        self.total = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._lock = threading.Lock()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                code, _, body = http_get(self.url, headers=self.headers)
                outcome = json.loads(body)["version"] if code == 200 else f"status {code}: {body[:100]!r}"
            except Exception as exc:  # any failure counts; the test asserts there are none
                outcome = f"error: {exc}"
            with self._lock:
                self.total += 1
                if outcome.startswith(("status", "error")):
                    self.failures.append(outcome)
                else:
                    self.versions[outcome] += 1

    def snapshot(self) -> tuple[int, Counter]:
        with self._lock:
            return self.total, Counter(self.versions)

    def since(self, mark: Counter) -> Counter:
        with self._lock:
            return self.versions - mark

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def client(mesh) -> Client:
    return Client(mesh.home / "agent.sock")


@pytest.fixture
def live(mesh):
    port = free_port()
    mesh.write_manifest(canary(port))
    mesh.up()
    mesh.port = port
    return mesh


def test_split_change_under_load_moves_traffic_with_no_failures(live):
    with Load(live.port) as load:
        wait_for(lambda: load.snapshot()[1]["v1"] >= 20, what="traffic on v1")
        assert load.snapshot()[1]["v2"] == 0
        result = live.cli("route", "split", "api", "v1=50", "v2=50", check=True)
        assert "ACKed by" in result.stdout and "ingress" in result.stdout
        _, mark = load.snapshot()
        wait_for(lambda: (c := load.since(mark))["v2"] >= 20 and c["v1"] >= 20, what="both versions serving")
        live.cli("route", "split", "api", "v2=100", "v1=0", check=True)
        _, mark = load.snapshot()
        wait_for(lambda: load.since(mark)["v2"] >= 30, what="v2 serving")
        # Every request that started after the ACK went to v2.
        assert load.since(mark)["v1"] <= 1
    assert load.failures == []
    diff = json.loads(live.cli("diff", "-o", "json", check=True).stdout)
    assert diff["differences"] == [
        {"service": "api", "what": "split", "manifest": {"v1": 100}, "live": {"v2": 100, "v1": 0}}
    ]
    assert "split v1=100 (manifest) -> v2=100 v1=0 (live)" in live.cli("diff", check=True).stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["v1=90", "v2=20"], "weights must sum to 100; v1=90 v2=20 sums to 110"),
        (["v1=90", "v9=10"], "service api has no version 'v9'"),
        (["v1=ninety"], "expected VERSION=WEIGHT"),
    ],
)
def test_bad_split_is_refused_and_nothing_changes(live, args, message):
    before = live.cli("proxy-status", "-o", "json", check=True).stdout
    result = live.cli("route", "split", "api", *args)
    assert result.returncode == 2, result
    assert message in result.stderr
    assert json.loads(live.cli("diff", "-o", "json", check=True).stdout)["differences"] == []
    assert json.loads(live.cli("proxy-status", "-o", "json", check=True).stdout)["config_version"] == json.loads(before)["config_version"]


def test_unknown_service_is_named(live):
    result = live.cli("route", "split", "nope", "v1=100")
    assert result.returncode == 1 and "unknown-service" in result.stderr and "no service 'nope'" in result.stderr


def test_header_rule_and_reset(live):
    result = live.cli("route", "set", "api", "--header", "x-canary=true", "--to", "v2", check=True)
    assert "x-canary=true -> v2" in result.stdout
    for _ in range(5):
        assert json.loads(http_get(f"http://127.0.0.1:{live.port}/whoami", headers={"x-canary": "true"})[2])["version"] == "v2"
        assert json.loads(http_get(f"http://127.0.0.1:{live.port}/whoami")[2])["version"] == "v1"
    shown = json.loads(live.cli("route", "show", "api", "-o", "json", check=True).stdout)["services"]["api"]
    assert shown["overridden"] and shown["live"]["routes"][0]["split"] == {"v2": 100}
    live.cli("route", "reset", "api", check=True)
    assert json.loads(http_get(f"http://127.0.0.1:{live.port}/whoami", headers={"x-canary": "true"})[2])["version"] == "v1"
    assert "no live overrides" in live.cli("diff", check=True).stdout


def test_nack_shows_in_proxy_status_and_the_old_config_keeps_serving(live):
    live.cli("route", "split", "api", "v1=0", "v2=100", check=True)
    bad = {"routes": [{"match": {"headers": [{"name": "x", "kind": "regex", "value": "(["}]}, "split": {"v2": 100}}]}
    result = client(live).request("debug-traffic", service="api", traffic=bad)
    assert any("ingress rejected" in p and "invalid regular expression" in p for p in result["problems"])
    rows = {r["sidecar"]: r for r in json.loads(live.cli("proxy-status", "-o", "json", check=True).stdout)["sidecars"]}
    assert rows["ingress"]["state"] == "NACK" and "invalid regular expression" in rows["ingress"]["nack"]
    assert rows["ingress"]["acked"] < rows["ingress"]["pushed"]
    assert rows["api@v1#0"]["state"] == "SYNCED"  # it does not route to api: nothing was pushed to it
    table = live.cli("proxy-status", check=True).stdout
    assert "NACK" in table and "invalid regular expression" in table
    for _ in range(5):  # the ingress keeps its last good config: everything to v2
        code, _, body = http_get(f"http://127.0.0.1:{live.port}/whoami")
        assert code == 200 and json.loads(body)["version"] == "v2"
    live.cli("route", "reset", "api", check=True)
    rows = {r["sidecar"]: r for r in json.loads(live.cli("proxy-status", "-o", "json", check=True).stdout)["sidecars"]}
    assert rows["ingress"]["state"] == "SYNCED" and rows["ingress"]["nack"] is None


def test_route_change_names_the_nacking_sidecar(live):
    bad = {"routes": [{"match": {"headers": [{"name": "x", "kind": "regex", "value": "(["}]}, "split": {"v2": 100}}]}
    client(live).request("debug-traffic", service="api", traffic=bad)
    result = live.cli("route", "split", "api", "v1=50", "v2=50")
    assert result.returncode == 1
    assert "ingress rejected config" in result.stderr


def test_proxy_config_shows_the_snapshot_with_secrets_redacted(live):
    config = json.loads(live.cli("proxy-config", "ingress", check=True).stdout)
    assert config["instance"] == "ingress"
    api = config["config"]["services"]["api"]
    assert sorted(e["id"] for e in api["endpoints"]) == ["api@v1#0", "api@v1#1", "api@v2#0"]
    assert live.cli("proxy-config", "api@v1#0", "-o", "table", check=True).returncode == 0
    missing = live.cli("proxy-config", "nope")
    assert missing.returncode == 1 and "no sidecar 'nope'" in missing.stderr


def test_overrides_survive_an_agent_restart(live):
    live.cli("route", "split", "api", "v1=0", "v2=100", check=True)
    live.cli("scale", "api@v2=2", check=True)
    assert (os.stat(live.home / "overrides.json").st_mode & 0o777) == 0o600
    agent = live.agent_pid()
    live.remember_pids()
    os.kill(agent, signal.SIGKILL)
    wait_for(lambda: not alive(agent), what="the agent to die")
    live.up()
    ids = sorted(i["id"] for i in live.status()["instances"])
    assert ids == ["api@v1#0", "api@v1#1", "api@v2#0", "api@v2#1"]
    for _ in range(5):
        assert json.loads(http_get(f"http://127.0.0.1:{live.port}/whoami")[2])["version"] == "v2"
    assert "split v1=100 (manifest) -> v1=0 v2=100 (live)" in live.cli("diff", check=True).stdout


def test_scale_up_and_down_under_load_with_no_failures(live):
    with Load(live.port) as load:
        wait_for(lambda: load.snapshot()[0] >= 10, what="traffic")
        out = live.cli("scale", "api@v1=3", check=True).stdout
        assert "started api@v1#2" in out
        assert live.instance("api@v1#2")["state"] == "ready"
        live.cli("scale", "api@v1=1", check=True)
        ids = sorted(i["id"] for i in live.status()["instances"])
        assert ids == ["api@v1#0", "api@v2#0"]
        total, _ = load.snapshot()
        wait_for(lambda: load.snapshot()[0] >= total + 10, what="more traffic")
    assert load.failures == []
    refused = live.cli("scale", "api@v1=0")
    assert refused.returncode == 2 and "still receives traffic" in refused.stderr
    assert live.cli("scale", "api@v2=0", check=True).returncode == 0
    assert [i["id"] for i in live.status()["instances"]] == ["api@v1#0"]


def test_rolling_restart_under_load_with_no_failures(live):
    live.cli("route", "split", "api", "v1=50", "v2=50", check=True)
    before = {i["id"]: i["pid"] for i in live.status()["instances"]}
    with Load(live.port) as load:
        wait_for(lambda: load.snapshot()[0] >= 10, what="traffic")
        out = live.cli("restart", "api", check=True).stdout
        assert "restarted 3 instances" in out
        total, _ = load.snapshot()
        wait_for(lambda: load.snapshot()[0] >= total + 10, what="more traffic")
    assert load.failures == []
    after = {i["id"]: i for i in live.status()["instances"]}
    assert sorted(after) == sorted(before)
    for iid, inst in after.items():
        assert inst["state"] == "ready" and inst["pid"] != before[iid] and inst["generation"] == 1
    assert not any(alive(pid) for pid in before.values())


def test_up_with_a_changed_manifest_replaces_rolling_with_no_failures(live):
    with Load(live.port) as load:
        wait_for(lambda: load.snapshot()[0] >= 10, what="traffic")
        live.write_manifest(canary(live.port).replace("replicas: 2}", "replicas: 2, env: {X: '1'}}"))
        out = live.up().stdout
        assert "changed 2" in out
        total, _ = load.snapshot()
        wait_for(lambda: load.snapshot()[0] >= total + 10, what="more traffic")
    assert load.failures == []
    assert all(i["state"] == "ready" for i in live.status()["instances"])


def test_promote_steps_then_rolls_back_when_the_canary_starts_failing(mesh):
    port = free_port()
    # v2 answers its first 40 calls, then fails every one: a canary going bad part-way.
    mesh.write_manifest(canary(port).replace("v2: {command: {PY} {APPS}/echo.py}",
                                             "v2: {command: {PY} {APPS}/echo.py, env: {FAIL_AFTER: '40'}}"))
    mesh.up()
    with Load(port):
        result = mesh.cli("route", "promote", "api", "v2", "--step", "20", "--interval", "1s", "--max-error-rate", "5%")
        assert result.returncode == 0, result.stderr

        def promotion():
            return json.loads(mesh.cli("route", "show", "api", "-o", "json", check=True).stdout)["services"]["api"]

        seen_weights = set()

        def rolled_back():
            entry = promotion()
            seen_weights.add(entry["live"]["split"].get("v2", 0))
            last = (entry.get("promotion") or {}).get("last") or {}
            return last.get("action") == "rollback" and entry

        entry = wait_for(rolled_back, timeout=60, interval=0.2, what="the promotion to roll back")
    assert max(seen_weights) >= 20  # it did step forward first
    assert entry["live"]["split"] == {"v1": 100, "v2": 0}
    assert "error rate" in entry["promotion"]["last"]["reason"]