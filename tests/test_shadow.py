"""Shadow traffic with a response diff: the pure comparison, the tally, the overrides, a real mesh.

The mesh: ingress -> item (tests/apps/shadowapp.py). v1 runs two replicas that differ only
in their start time (noise); v2 differs from v1 in one JSON field and one header; v3
hangs on every request (a slow shadow); v4 answers 500 (a failing one).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import urllib.request

import pytest

from meshctl.agent import overrides as ovr
from meshctl.agent.control_shadow import ShadowResults
from meshctl.agent.errors import ManifestError
from meshctl.agent.manifest import load_manifest
from meshctl.agent.model import Manifest, ServiceSpec, VersionSpec
from meshctl.agent.shadow_report import ShadowTally
from meshctl.proxy.capture import dechunk, parse_message
from meshctl.proxy.compare import ABSENT, CompareSpec, Ignore, Response, compare_spec, differences, json_pattern_error
from meshctl.proxy.routing import Router
from meshctl.proxy.shadow import Comparison, ResponseTap
from tests.meshharness import free_port, http_get, wait_for

JSON = [("content-type", "application/json")]


def _json(body: object, headers=JSON, status: int = 200) -> Response:
    return Response(status, headers, json.dumps(body).encode())


@pytest.mark.parametrize(
    "primary, other, ignore, expected",
    [
        (_json({"a": 1}), _json({"a": 1}), Ignore(), {}),
        (_json({"a": 1}), _json({"a": 1}, status=500), Ignore(), {"status": ("200", "500")}),
        (_json({"a": 1, "b": {"c": [1, 2]}}), _json({"a": 1, "b": {"c": [1, 3]}}), Ignore(), {"body:$.b.c[1]": ("2", "3")}),
        (_json({"a": 1}), _json({"a": 1, "new": "x"}), Ignore(), {"body:$.new": (ABSENT, '"x"')}),
        (_json({"a": [1, 2]}), _json({"a": [1]}), Ignore(), {"body:$.a[1]": ("2", ABSENT)}),
        (_json({"odd key": 1}), _json({"odd key": 2}), Ignore(), {'body:$["odd key"]': ("1", "2")}),
        (_json({"a": {}}), _json({"a": {"b": 1}}), Ignore(), {"body:$.a": ("{}", ABSENT), "body:$.a.b": (ABSENT, "1")}),
        (_json({"ts": 1, "m": {"ts": 2}}), _json({"ts": 3, "m": {"ts": 4}}), Ignore(json_paths=["$.ts"]), {"body:$.m.ts": ("2", "4")}),
        (_json({"m": {"ts": 2, "x": 1}}), _json({"m": {"ts": 4, "x": 1}}), Ignore(json_paths=["m"]), {}),
        (_json({"i": [{"id": 1, "p": 1}]}), _json({"i": [{"id": 2, "p": 1}]}), Ignore(json_paths=["$.i[*].id"]), {}),
        (_json({"k": 1}, JSON + [("x-v", "1")]), _json({"k": 1}, JSON + [("x-v", "2")]), Ignore(), {"header:x-v": ("1", "2")}),
        (_json({"k": 1}, JSON + [("x-v", "1")]), _json({"k": 1}), Ignore(), {"header:x-v": ("1", ABSENT)}),
        (_json({"k": 1}, JSON + [("x-v", "1")]), _json({"k": 1}, JSON + [("x-v", "2")]), Ignore(headers=["X-V"]), {}),
        (_json({"k": 1}, JSON + [("date", "a"), ("x-request-id", "1"), ("content-length", "9")]),
         _json({"k": 1}, JSON + [("date", "b"), ("x-request-id", "2"), ("content-length", "8")]), Ignore(), {}),
        (Response(200, [("set-cookie", "a")], b""), Response(200, [("set-cookie", "a"), ("set-cookie", "b")], b""), Ignore(),
         {"header:set-cookie": ("a", "a, b")}),
        (Response(200, [], b"one\ntwo\n"), Response(200, [], b"one\nTWO\n"), Ignore(), {"body": ("line 2: two", "line 2: TWO")}),
        (Response(200, [], b"one\n"), Response(200, [], b"one\ntwo"), Ignore(), {"body": ("line 2: " + ABSENT, "line 2: two")}),
        (Response(200, [], b"\xff\x00"), Response(200, [], b"\xff\x01"), Ignore(), {"body": (
            "2 bytes sha256:" + hashlib.sha256(b"\xff\x00").hexdigest()[:12],
            "2 bytes sha256:" + hashlib.sha256(b"\xff\x01").hexdigest()[:12])}),
        (_json({"a": 1}), Response(200, JSON, b"not json"), Ignore(), {"body": ('line 1: {"a": 1}', "line 1: not json")}),
        (Response(200, JSON, None), _json({"a": 2}), Ignore(), {}),  # a body too large to keep is not compared
    ],
)
def test_differences(primary, other, ignore, expected):
    assert differences(primary, other, ignore) == expected


def test_long_values_are_shortened():
    [(where, (mine, theirs))] = differences(_json({"a": "x" * 500}), _json({"a": "y" * 500}), Ignore()).items()
    assert where == "body:$.a" and len(mine) == len(theirs) == 120 and mine.endswith("…")


@pytest.mark.parametrize("path, ok", [("$.ts", True), ("ts", True), ("$.items[*].id", True), ("meta.x", True),
                                      ("", False), ("[0]", False), (".x", False)])
def test_json_pattern_check(path, ok):
    assert (json_pattern_error(path) is None) is ok


@pytest.mark.parametrize(
    "raw, is_request, expected",
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi", False, (200, b"hi")),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\ncontent-length: 1\r\n\r\nx", False, (201, b"x")),
        (b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nab\r\n3;x=1\r\ncde\r\n0\r\nt: 1\r\n\r\n", False, (200, b"abcde")),
        (b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhi", False, None),  # cut short
        (b"HTTP/1.1 200 OK\r\n\r\nuntil close", False, (200, b"until close")),
        (b"POST /x HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\nabc", True, ("/x", b"abc")),
        (b"garbage", False, None),
    ],
)
def test_parse_message(raw, is_request, expected):
    parsed = parse_message(raw, is_request)
    if expected is None:
        assert parsed is None
    else:
        head, body = parsed
        assert ((head.target.decode() if is_request else head.status), body) == expected


def test_dechunk_drops_extensions_and_trailers():
    assert dechunk(b"1\r\na\r\n1;e=v\r\nb\r\n0\r\nx-t: 1\r\n\r\n") == b"ab"


@pytest.mark.parametrize(
    "raw, method, target, wanted",
    [
        (True, b"GET", b"/a", True),
        (True, b"POST", b"/a", False),
        ({"unsafe": True}, b"POST", b"/a", True),
        ({"path": "/api"}, b"GET", b"/a", False),
        ({"path": "/api"}, b"GET", b"/api/x", True),
        ({"path": "/api"}, b"DELETE", b"/api/x", False),
    ],
)
def test_compare_spec_decides_which_requests(raw, method, target, wanted):
    spec = compare_spec(raw, "mirror.compare")
    assert isinstance(spec, CompareSpec) and spec.wants(method, target) is wanted


@pytest.mark.parametrize("raw, message", [("yes", "expected true or a mapping"), ({"path": "api"}, "starting with /"),
                                          ({"reference_percent": 101}, "from 0 to 100")])
def test_compare_spec_errors(raw, message):
    with pytest.raises(ValueError, match=message):
        compare_spec(raw, "mirror.compare")


def _result(diffs: dict, noise: list | None = None, failed: str | None = None, path: str = "/item/1") -> dict:
    return {"service": "item", "version": "v2", "method": "GET", "path": path, "failed": failed,
            "diffs": diffs, "noise": noise, "primary_ms": 2.0, "shadow_ms": 3.0, "tag": None}


def test_tally_counts_fields_and_learns_noise():
    tally = ShadowTally("item", "v2")
    tally.add(_result({"body:$.price": ["10", "12"], "body:$.started": ["1", "2"]}, path="/item/1"))
    tally.add(_result({"body:$.started": ["1", "3"]}, noise=["body:$.started"], path="/item/2"))
    tally.add(_result({}, path="/item/3"))
    tally.add(_result({}, failed="no response within 2s"))
    for index in range(4, 8):
        tally.add(_result({"body:$.price": ["10", "12"]}, path=f"/item/{index}"))
    report = tally.report()
    assert (report["compared"], report["identical"], report["different"], report["failed"]) == (7, 2, 5, 1)
    [price] = report["fields"]
    assert price["where"] == "body:$.price" and price["count"] == 5
    assert [e["path"] for e in price["examples"]] == ["/item/1", "/item/4", "/item/5"]
    assert price["examples"][0] == {"method": "GET", "path": "/item/1", "primary": "10", "shadow": "12"}
    assert report["noise"] == [{"where": "body:$.started", "count": 2, "between_primaries": 1}]
    assert report["failures"] == [{"reason": "no response within 2s", "count": 1}]
    assert report["latency"]["primary"] == {"p50_ms": 2.0, "p99_ms": 2.0}
    assert report["latency"]["shadow"]["p50_ms"] == 3.0


def test_late_results_of_an_earlier_shadow_never_replace_the_current_tally():
    # Switched from v3 (hanging) to v4: v3's copies still time out after the switch.
    live = {"item": "v4"}
    results = ShadowResults(live.get)
    results.by_service["item"] = ShadowTally("item", "v4")  # what shadow-start does
    v3_late = {**_result({}, failed="no response within 2s"), "version": "v3", "live": True}
    v4 = {**_result({"status": ["200", "500"]}), "version": "v4", "live": True}
    results.on_results([v4, v3_late, v4, v3_late])
    tally = results.by_service["item"]
    assert (tally.version, tally.compared, tally.failed) == ("v4", 2, 0)
    # Without a tally yet (the agent restarted under a live shadow), the live version starts one.
    results.by_service.clear()
    results.on_results([v3_late, v4])
    assert (results.by_service["item"].version, results.by_service["item"].compared) == ("v4", 1)
    # The manifest's shadow is not live: its tally follows its results' version.
    results.on_results([{**v3_late, "live": False}])
    assert results.from_manifest["item"].version == "v3"


# -- the live override -----------------------------------------------------------------------

ITEM = ServiceSpec("item", (VersionSpec("v1", ("x",), replicas=2), VersionSpec("v2", ("x",))),
                   traffic={"split": {"v1": 100}, "versions": ["v1", "v2"], "routes": []})
MANIFEST = Manifest("m", (ITEM,))


@pytest.mark.parametrize(
    "shadow, message",
    [
        (ovr.Shadow("v9"), "has no version 'v9'"),
        (ovr.Shadow("v1"), "all its traffic to v1 already"),
        (ovr.Shadow("v2", percent=0), "more than 0"),
        (ovr.Shadow("v2", path="api"), "starts with /"),
        (ovr.Shadow("v2", ignore_headers=("bad header",)), "not a valid header name"),
        (ovr.Shadow("v2", ignore_json=("[0]",)), "expected a JSON path"),
    ],
)
def test_shadow_override_validation(shadow, message):
    with pytest.raises(ovr.OverrideError, match=message):
        ovr.with_shadow(ovr.MeshOverrides(), MANIFEST, "item", shadow)


def test_shadow_override_round_trip_traffic_and_diff():
    shadow = ovr.Shadow("v2", 50.0, "/item", False, ("x-api-version",), ("$.started",))
    ov = ovr.with_shadow(ovr.MeshOverrides(), MANIFEST, "item", shadow)
    assert ovr.MeshOverrides.from_json(json.loads(json.dumps(ov.to_json()))) == ov
    keys = ovr.traffic_overrides(MANIFEST, ov)["item"]
    assert keys == {"shadow": {"version": "v2", "percent": 50.0, "compare": {
        "live": True, "path": "/item", "unsafe": False, "ignore_headers": ["x-api-version"], "ignore_json": ["$.started"]}},
        "live": {"rules": 0, "split": False}}  # what `meshctl why` names as overrides: neither rules nor split
    assert [d["what"] for d in ovr.diff(MANIFEST, ov)] == ["shadow"]
    with pytest.raises(ovr.BadScale, match="still receives traffic"):
        ovr.with_replicas(ov, MANIFEST, "item", "v2", 0)
    assert ovr.without_shadow(ov, MANIFEST, "item") == ovr.MeshOverrides()
    assert ovr.without(ov, MANIFEST, "item") == ovr.MeshOverrides()
    with pytest.raises(ovr.BadShadow, match="no live shadow"):
        ovr.without_shadow(ovr.MeshOverrides(), MANIFEST, "item")


# -- a real mesh -----------------------------------------------------------------------------

MESH = """
mesh: shadowtest
services:
  item:
    health: {{http: /healthz, period: 100ms}}
    timeout: 2s
    split: {{v1: 100}}
    versions:
      v1: {{command: {PY} {APPS}/shadowapp.py, replicas: 2}}
      v2: {{command: {PY} {APPS}/shadowapp.py, env: {{PRICE: "12", API_VERSION: "2"}}}}
      v3: {{command: {PY} {APPS}/shadowapp.py, env: {{BLOCK: "1"}}}}
      v4: {{command: {PY} {APPS}/shadowapp.py, env: {{STATUS: "500"}}}}
ingress:
  port: {port}
  routes: [{{path: /, service: item}}]
"""
GETS = 40
MIRROR_ROUTE = """\
    routes:
      - match: {{path: {{prefix: /item}}}}
        mirror: {{version: v2, compare: {{ignore_headers: [x-api-version], ignore_json: [$.started]}}}}
"""


def _post(url: str, timeout: float = 10.0) -> int:
    request = urllib.request.Request(url, data=b'{"sku": 1}', method="POST", headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        return resp.status


def _report(mesh, service: str = "item") -> dict:
    return json.loads(mesh.cli("shadow", "report", service, "-o", "json", check=True).stdout)


def _posts_at(base: str, version: str, mesh) -> int:
    """POST /orders that `version` took, asked through a header rule sending x-to: VERSION there."""
    mesh.cli("route", "set", "item", "--header", f"x-to={version}", "--to", version, check=True)
    status, _, body = http_get(f"{base}/orders/count", headers={"x-to": version})
    assert status == 200, body
    return json.loads(body)["posts"]


def test_shadow_reports_exactly_the_differing_fields_and_learns_noise(mesh):
    port = free_port()
    mesh.write_manifest(MESH.format(port=port, PY="{PY}", APPS="{APPS}"))
    mesh.up()
    base = f"http://127.0.0.1:{port}"

    started = mesh.cli("shadow", "item", "v2", check=True)
    assert "shadowed to v2 (safe methods only)" in started.stdout
    shown = json.loads(mesh.cli("route", "show", "item", "-o", "json", check=True).stdout)
    assert shown["services"]["item"]["live"]["shadow"]["version"] == "v2" and shown["services"]["item"]["overridden"]
    assert "shadow 100% of requests to v2" in mesh.cli("diff", check=True).stdout

    for index in range(GETS):
        status, _, body = http_get(f"{base}/item/{index}")
        assert status == 200 and json.loads(body)["price"] == 10  # the client always gets the primary's answer
    for _ in range(5):
        assert _post(f"{base}/orders") == 201

    report = wait_for(lambda: (r := _report(mesh))["compared"] >= GETS and r, timeout=20, what="40 compared requests")
    assert (report["service"], report["version"]) == ("item", "v2")
    assert (report["compared"], report["identical"], report["different"], report["failed"]) == (GETS, 0, GETS, 0)
    assert {f["where"]: f["count"] for f in report["fields"]} == {"body:$.price": GETS, "header:x-api-version": GETS}
    price = next(f for f in report["fields"] if f["where"] == "body:$.price")
    assert len(price["examples"]) == 3 and price["examples"][0]["primary"] == "10" and price["examples"][0]["shadow"] == "12"
    assert all(e["method"] == "GET" and e["path"].startswith("/item/") for e in price["examples"])
    # The replicas of v1 differ in their start time: noise, not a difference of v2.
    assert [n["where"] for n in report["noise"]] == ["body:$.started"] and report["references"] > 0
    assert report["latency"]["shadow"]["p50_ms"] is not None and report["latency"]["primary"]["p99_ms"] is not None

    table = mesh.cli("shadow", "report", "item", check=True).stdout
    assert "40 compared, 0 identical, 40 different, 0 failed" in table and "body:$.price" in table and "noise" in table
    # POSTs were answered but not copied: v2 took none of them.
    assert _posts_at(base, "v2", mesh) == 0

    # Ignoring the header and the fields makes every request identical (the start time too:
    # 11 requests are too few to be sure a quarter of them learned it as noise).
    mesh.cli("shadow", "item", "v2", "--ignore-header", "X-Api-Version", "--ignore-json", "$.price", "--ignore-json", "started",
             "--unsafe", check=True)
    for index in range(10):
        assert http_get(f"{base}/item/{index}")[0] == 200
    assert _post(f"{base}/orders") == 201
    report = wait_for(lambda: (r := _report(mesh))["compared"] >= 11 and r, timeout=20, what="11 compared requests")
    assert (report["compared"], report["identical"], report["fields"]) == (11, 11, []), report
    assert report["ignored"] == ["header:x-api-version", "body:$.price", "body:$.started"]
    assert _posts_at(base, "v2", mesh) == 1  # with --unsafe the POST was copied

    mesh.cli("shadow", "stop", "item", check=True)
    assert json.loads(mesh.cli("route", "show", "item", "-o", "json", check=True).stdout)["services"]["item"]["live"]["shadow"] is None
    stopped = _report(mesh)
    assert stopped["live"] is False and stopped["compared"] == 11  # the last shadow's report stays readable

    # The same comparison from the manifest: a route's mirror with compare.
    mesh.write_manifest(MESH.replace("    split: {{v1: 100}}\n", "    split: {{v1: 100}}\n" + MIRROR_ROUTE).format(
        port=port, PY="{PY}", APPS="{APPS}"))
    mesh.up()
    for index in range(12):
        assert http_get(f"{base}/item/{index}")[0] == 200
    assert http_get(f"{base}/healthz")[0] == 200  # outside the route: not mirrored
    report = wait_for(lambda: (r := _report(mesh))["compared"] >= 12 and r, timeout=20, what="12 compared requests")
    assert (report["compared"], report["different"], report["live"]) == (12, 12, False)
    assert {f["where"]: f["count"] for f in report["fields"]} == {"body:$.price": 12}


def test_a_hanging_or_failing_shadow_never_changes_what_the_client_gets(mesh):
    port = free_port()
    mesh.write_manifest(MESH.format(port=port, PY="{PY}", APPS="{APPS}"))
    mesh.up()
    base = f"http://127.0.0.1:{port}"
    mesh.cli("shadow", "item", "v3", "--unsafe", check=True)
    # v3 holds every request for 60 s; each client request must still get its 200 well within
    # its own 5 s timeout, including POSTs, and more requests than the 64 copies allowed out.
    for index in range(80):
        status, _, _ = http_get(f"{base}/item/{index}", timeout=5)
        assert status == 200
    assert _post(f"{base}/orders", timeout=5) == 201
    report = wait_for(lambda: (r := _report(mesh))["failed"] >= 1 and r, timeout=20, what="failed shadow copies")
    assert report["compared"] == 0 and report["failures"][0]["reason"].startswith("no response within")

    # A failing shadow: the client still gets v1's 200, the report shows the status.
    mesh.cli("shadow", "item", "v4", check=True)
    for index in range(10):
        assert http_get(f"{base}/item/{index}", timeout=5)[0] == 200
    report = wait_for(lambda: (r := _report(mesh))["compared"] >= 10 and r, timeout=20, what="10 compared requests: %r" % _report(mesh))
    status = next(f for f in report["fields"] if f["where"] == "status")
    assert status["count"] == 10 and (status["examples"][0]["primary"], status["examples"][0]["shadow"]) == ("200", "500")

    # A route reset drops the shadow like any live override.
    mesh.cli("route", "reset", "item", check=True)
    assert "no live overrides" in mesh.cli("diff", check=True).stdout


# -- the manifest's mirror: {compare: ...} ---------------------------------------------------

COMPARING_MANIFEST = """\
mesh: m
services:
  item:
    command: x
    versions: {v1: {}, v2: {}}
    routes:
      - match: {path: {prefix: /item}}
        mirror: {version: v2, compare: %s}
"""


@pytest.mark.parametrize(
    "compare, expected",
    [
        ("true", {"unsafe": False, "ignore_headers": [], "ignore_json": []}),
        ("false", None),
        ("{unsafe: true, ignore_headers: [X-Api-Version], ignore_json: [$.started]}",
         {"unsafe": True, "ignore_headers": ["x-api-version"], "ignore_json": ["$.started"]}),
    ],
)
def test_manifest_mirror_compare(tmp_path, compare, expected):
    path = tmp_path / "mesh.yaml"
    path.write_text(COMPARING_MANIFEST % compare)
    traffic = load_manifest(str(path)).service("item").traffic
    mirror = traffic["routes"][0]["mirror"]
    assert mirror.get("compare") == expected
    # What the agent writes is what the sidecar compiles.
    action = Router("item", traffic).route("GET", "/item/1")
    assert (action.mirror["compare"] is None) is (expected is None)


@pytest.mark.parametrize(
    "compare, message",
    [
        ("{ignore_json: ['[0]']}", "services.item.routes[0].mirror.compare.ignore_json[0]: '[0]': expected a JSON path"),
        ("{ignore_headers: ['a b']}", "services.item.routes[0].mirror.compare.ignore_headers[0]: 'a b' is not a valid header name"),
        ("{nope: 1}", "services.item.routes[0].mirror.compare"),
        ("yes please", "services.item.routes[0].mirror.compare"),
    ],
)
def test_manifest_mirror_compare_errors(tmp_path, compare, message):

    path = tmp_path / "mesh.yaml"
    path.write_text(COMPARING_MANIFEST % compare)
    with pytest.raises(ManifestError) as info:
        load_manifest(str(path))
    assert message in str(info.value)


def test_record_then_replay_gives_the_shadow_report(mesh):
    port = free_port()
    mesh.write_manifest(MESH.format(port=port, PY="{PY}", APPS="{APPS}"))
    mesh.up()
    base = f"http://127.0.0.1:{port}"
    recording = mesh.tmp / "item.jsonl"
    record = subprocess.Popen(
        [sys.executable, "-m", "meshctl.cli", "record", "item", "--duration", "60s", "--limit", "22", "-o", str(recording)],
        env=mesh.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL,
    )
    try:
        assert "recording item" in record.stderr.readline()  # the sidecars record from here on
        for index in range(20):
            assert http_get(f"{base}/item/{index}", headers={"Authorization": "Bearer s3cret", "Cookie": "a=b"})[0] == 200
        for _ in range(2):
            assert _post(f"{base}/orders") == 201
        out, err = record.communicate(timeout=60)
    finally:
        if record.poll() is None:
            record.kill()
            record.communicate()
    assert record.returncode == 0, err
    assert "recorded 22 requests to item" in out
    assert stat.S_IMODE(os.stat(recording).st_mode) == 0o600
    lines = [json.loads(line) for line in recording.read_text().splitlines()]
    assert sorted((e["method"], e["status"]) for e in lines) == [("GET", 200)] * 20 + [("POST", 201)] * 2
    get = next(e for e in lines if e["method"] == "GET")
    headers = dict(get["headers"])
    assert headers["authorization"] == "<redacted>" and headers["cookie"] == "<redacted>" and "s3cret" not in recording.read_text()
    assert "traceparent" not in headers and "content-length" not in headers
    assert next(e for e in lines if e["method"] == "POST")["body"] == '{"sku": 1}'

    replayed = json.loads(mesh.cli("replay", str(recording), "--to", "item@v2", "--compare", "v1", "-o", "json", check=True).stdout)
    assert (replayed["compared"], replayed["different"], replayed["failed"]) == (20, 20, 0)
    assert {f["where"]: f["count"] for f in replayed["fields"]} == {"body:$.price": 20, "header:x-api-version": 20}
    assert [n["where"] for n in replayed["noise"]] == ["body:$.started"]
    assert replayed["replay"]["skipped_unsafe"] == 2 and replayed["replay"]["unanswered"] == 0
    assert _posts_at(base, "v2", mesh) == 0  # the POSTs were not sent again without --unsafe

    # Without --compare, each answer's status is compared with the recorded one.
    by_status = json.loads(mesh.cli("replay", str(recording), "--to", "item@v2", "--unsafe", "-o", "json", check=True).stdout)
    assert (by_status["compared"], by_status["identical"], by_status["fields"]) == (22, 22, [])
    assert _posts_at(base, "v2", mesh) == 2
    table = mesh.cli("replay", str(recording), "--to", "item@v2", "--compare", "v1", check=True).stdout
    assert "replayed 20 requests" in table and "2 unsafe requests skipped" in table and "body:$.price" in table


def test_a_field_that_rarely_differs_between_primaries_is_still_a_difference():
    tally = ShadowTally("item", "v2")
    for index in range(50):
        noise = ["body:$.flavor", "body:$.ts"] if index == 0 else ["body:$.ts"]
        tally.add(_result({"body:$.flavor": ['"standard"', '"discount"'], "body:$.ts": ["1", "2"]}, noise=noise))
    report = tally.report()
    assert [f["where"] for f in report["fields"]] == ["body:$.flavor"] and report["different"] == 50
    assert report["noise"] == [{"where": "body:$.ts", "count": 50, "between_primaries": 50}]


# -- the driver pieces, without sockets --------------------------------------------------------

RESPONSE = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 9\r\n\r\n{"a": 1}\n'


def _comparison(tag=None):
    sent = []
    spec = compare_spec(True, "mirror.compare")
    return Comparison(spec, "item", "v2", b"GET", b"/item/1", sent.append, tag), sent


def test_a_comparison_reports_once_every_answer_has_ended_in_any_order():
    comparison, sent = _comparison()
    comparison.arrive("shadow", Response(200, JSON, b'{"a": 2}'), 0.002)
    assert sent == []
    comparison.arrive("primary", Response(200, JSON, b'{"a": 1}'), 0.001)
    [result] = sent
    assert result["diffs"] == {"body:$.a": ["1", "2"]} and result["noise"] is None
    assert (result["primary_ms"], result["shadow_ms"], result["failed"], result["live"]) == (1.0, 2.0, None, False)
    comparison.arrive("shadow", "late", 0.0)
    assert len(sent) == 1


def test_a_failed_primary_is_not_compared_but_a_replay_counts_it():
    comparison, sent = _comparison()
    comparison.arrive("primary", "no complete answer", 0.001)
    comparison.arrive("shadow", Response(200, JSON, b"{}"), 0.001)
    assert sent == []
    comparison, sent = _comparison(tag="r1")
    comparison.arrive("primary", "connection refused", 0.001)
    assert [r["failed"] for r in sent] == ["the primary answered nothing: connection refused"] and sent[0]["tag"] == "r1"


class _FakeExchange:
    """What ResponseTap reads of an exchange: the answer ends when `upstream` is let go."""

    def __init__(self, conn):
        self.upstream = conn
        self.answered = False
        self.last_endpoint = None
        self.started = 0.0
        self.client = type("Client", (), {"state": type("State", (), {"loop": type("Loop", (), {"time": lambda self: 0.005})()})()})()
        self.seen = []

    def upstream_data(self, data):
        self.seen.append(data)
        if data.endswith(b"\n"):
            self.upstream = None
            self.answered = True


def test_the_response_tap_forwards_first_and_hands_over_the_whole_answer():
    comparison, sent = _comparison()
    conn = object()
    exchange = _FakeExchange(conn)
    tap = ResponseTap(exchange, conn, comparison)
    tap.upstream_data(RESPONSE[:30])
    assert exchange.seen == [RESPONSE[:30]] and "primary" in comparison.waiting
    tap.upstream_data(RESPONSE[30:])
    assert b"".join(exchange.seen) == RESPONSE and "primary" not in comparison.waiting
    comparison.arrive("shadow", Response(200, JSON, b'{"a": 1}\n'), 0.001)
    assert sent[0]["diffs"] == {} and sent[0]["primary_ms"] == 5.0


def test_a_tap_whose_try_was_discarded_for_a_retry_hands_over_nothing():
    comparison, _ = _comparison()
    conn = object()
    exchange = _FakeExchange(conn)
    exchange.upstream_data = lambda data: setattr(exchange, "upstream", None)  # the try ended, not answered
    ResponseTap(exchange, conn, comparison).upstream_data(RESPONSE)
    assert "primary" in comparison.waiting and not comparison.abandoned

