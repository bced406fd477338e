"""The manifest loader and its JSON Schema: pure units, no processes."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from meshctl.agent.durations import DurationError, format_duration, parse_duration
from meshctl.agent.errors import AgentError, ManifestError, Problem
from meshctl.agent.manifest import load_manifest, parse_manifest
from meshctl.agent.model import Health, Ingress, IngressRoute, Manifest, RestartPolicy, Security, ServiceSpec, VersionSpec
from meshctl.agent.schema import manifest_json_schema
from meshctl.agent.yamllines import YamlReader

REPO = Path(__file__).resolve().parent.parent
NAME_HINT = "use lower-case letters, digits and '-', starting and ending with a letter or digit"
DURATION_HINT = "expected a duration such as '250ms', '2s', '1m' or a number of seconds"


def parse(text: str, base_dir: str = "/srv/shop") -> Manifest:
    return parse_manifest(textwrap.dedent(text), "mesh.yaml", base_dir=base_dir)


def errors_of(text: str) -> str:
    with pytest.raises(ManifestError) as caught:
        parse(text)
    return str(caught.value)


BAD_MANIFESTS = [
    pytest.param(
        """\
        mesh: shop
        services:
          cart:
            comand: python cart.py
        """,
        "mesh.yaml:4: services.cart.comand: unknown key 'comand' (did you mean 'command'?)",
        id="typo-is-one-message",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          cart:
            versions:
              v1: {command: python cart.py}
              v2:
                replicas: 2
        """,
        "mesh.yaml:6: services.cart.versions.v2.command: required",
        id="version-without-command",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          cart:
            replicas: 2
        """,
        "mesh.yaml:3: services.cart.command: required",
        id="service-without-command",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          frontend:
            command: python front.py
            upstreams: [cart, cartt]
          cart:
            command: python cart.py
        """,
        "mesh.yaml:5: services.frontend.upstreams[1]: unknown service 'cartt' (did you mean 'cart'?)",
        id="unknown-upstream",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          a: {command: x, upstreams: [a]}
        """,
        "mesh.yaml:3: services.a.upstreams[0]: a service cannot be its own upstream",
        id="self-upstream",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          a: {command: x, upstreams: [b]}
          b: {command: x, upstreams: [c]}
          c: {command: x, upstreams: [a]}
          d: {command: x, upstreams: [e]}
          e: {command: x, upstreams: [d]}
        """,
        "mesh.yaml:2: services: dependency cycle: a -> b -> c -> a\n"
        "mesh.yaml:2: services: dependency cycle: d -> e -> d",
        id="dependency-cycles",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          a:
            command: x
          a:
            command: y
        """,
        "mesh.yaml:5: services.a: duplicate key",
        id="duplicate-key",
    ),
    pytest.param("- mesh\n- services\n", "mesh.yaml:1: top level must be a mapping, got list", id="top-level-list"),
    pytest.param(
        "# nothing here\n",
        "mesh.yaml:1: the manifest is empty: expected a mapping with mesh and services",
        id="empty",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          a: {command: x
        """,
        "mesh.yaml:4: invalid YAML: expected ',' or '}', but got '<stream end>'",
        id="yaml-syntax",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          a:
            command: x
           bad: indentation
        """,
        "mesh.yaml:5: invalid YAML: expected <block end>, but found '<block mapping start>'",
        id="yaml-indentation",
    ),
    pytest.param(
        "services:\n  a: {command: x}\n",
        "mesh.yaml:1: mesh: required",
        id="mesh-required",
    ),
    pytest.param(
        """\
        mesh: Shop_1
        services:
          Cart: {command: x}
        """,
        "mesh.yaml:1: mesh: invalid name 'Shop_1': " + NAME_HINT + "\n"
        "mesh.yaml:3: services.Cart: invalid name 'Cart': " + NAME_HINT,
        id="bad-names",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          a:
            command: x
            versions: {v1: null, V-2: null}
        """,
        "mesh.yaml:5: services.a.versions.V-2: invalid name 'V-2': " + NAME_HINT,
        id="bad-version-name",
    ),
    pytest.param(
        """\
        mesh: shop
        services: {}
        """,
        "mesh.yaml:2: services: must not be empty",
        id="no-services",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          a: {command: x, replicas: 0, stop_grace: 2x, retries: {attempts: "3"}}
        """,
        "mesh.yaml:3: services.a.replicas: must be >= 1\n"
        "mesh.yaml:3: services.a.retries.attempts: expected an integer, got string\n"
        "mesh.yaml:3: services.a.stop_grace: invalid duration '2x': " + DURATION_HINT,
        id="value-errors",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          a:
            command: x
            timeout: [1]
        """,
        "mesh.yaml:5: services.a.timeout: " + DURATION_HINT + ", got list",
        id="duration-type",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          a:
            command: x
            versions: {v1: null, v2: null}
            split: {v1: 90, v3: 5}
        """,
        "mesh.yaml:6: services.a.split: weights sum to 95, must be 100\n"
        "mesh.yaml:6: services.a.split.v3: unknown version 'v3'",
        id="split-sum-and-version",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          a:
            command: x
            split: {v1: 99.5}
        """,
        "mesh.yaml:5: services.a.split.v1: expected an integer, got number",
        id="split-integer",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          a:
            command: x
            versions: {v1: null, v2: null}
            routes:
              - match: {path: {regex: "(("}, headers: {x-a: {regex: "[", prefix: a}}}
                version: v3
              - split: {v1: 50, v2: 40}
                version: v1
                mirror: {version: v9}
        """,
        "mesh.yaml:7: services.a.routes[0].match.headers.x-a: must have exactly one of: exact, prefix, regex\n"
        "mesh.yaml:7: services.a.routes[0].match.path.regex: invalid regex: missing ), unterminated subpattern "
        "at position 1\n"
        "mesh.yaml:8: services.a.routes[0].version: unknown version 'v3'\n"
        "mesh.yaml:9: services.a.routes[1]: give either split or version, not both\n"
        "mesh.yaml:9: services.a.routes[1].split: weights sum to 90, must be 100\n"
        "mesh.yaml:11: services.a.routes[1].mirror.version: unknown version 'v9'",
        id="routes",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          a:
            command: x
            load_balancer: {kind: consistent_hash}
          b:
            command: x
            load_balancer: {kind: random, header: x-user}
          c:
            command: x
            load_balancer: fastest
        """,
        "mesh.yaml:5: services.a.load_balancer: consistent_hash needs exactly one of: header, cookie, source_ip\n"
        "mesh.yaml:8: services.b.load_balancer.header: only for kind consistent_hash\n"
        "mesh.yaml:11: services.c.load_balancer: invalid load balancer 'fastest': use one of least_request, "
        "round_robin, random, or {kind: consistent_hash, ...}",
        id="load-balancers",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          a:
            command: "python 'x"
            env: {A: null, 1B: x}
            restart: {policy: sometimes}
            health: {http: health}
        """,
        "mesh.yaml:4: services.a.command: cannot split command: no closing quotation\n"
        "mesh.yaml:5: services.a.env.1B: invalid variable name '1B': use letters, digits and '_', "
        "not starting with a digit\n"
        "mesh.yaml:5: services.a.env.A: expected a string, a number or a boolean, got null\n"
        "mesh.yaml:6: services.a.restart.policy: must be one of: on_failure, always, no\n"
        "mesh.yaml:7: services.a.health.http: path 'health' must start with '/'",
        id="command-env-restart-health",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          a: {command: [], upstreams: b}
          b: {command: "   "}
        """,
        "mesh.yaml:3: services.a.command: must not be empty\n"
        "mesh.yaml:3: services.a.upstreams: expected a list, got string\n"
        "mesh.yaml:4: services.b.command: must not be empty",
        id="empty-commands",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          a:
            command: x
            stream_idle_timeout: 5 minutes
            timeout: -1
            routes: [{version: v1, stream_idle_timeout: true}]
        """,
        "mesh.yaml:5: services.a.stream_idle_timeout: invalid duration '5 minutes': "
        "expected a duration such as '250ms', '2s', '1m' or a number of seconds\n"
        "mesh.yaml:6: services.a.timeout: must be >= 0\n"
        "mesh.yaml:7: services.a.routes[0].stream_idle_timeout: "
        "expected a duration such as '250ms', '2s', '1m' or a number of seconds, got boolean",
        id="stream-timeouts",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          a: {command: x, connect_timeout: 0, egress: ["bad host"]}
        ingress:
          port: 8080
          routes:
            - {path: /, service: b}
            - {path: /, service: a}
            - {path: api, service: a}
        """,
        "mesh.yaml:3: services.a.connect_timeout: must be more than 0\n"
        "mesh.yaml:3: services.a.egress[0]: invalid host name 'bad host'\n"
        "mesh.yaml:7: ingress.routes[0].service: unknown service 'b'\n"
        "mesh.yaml:8: ingress.routes[1].path: duplicate path '/'\n"
        "mesh.yaml:9: ingress.routes[2].path: path 'api' must start with '/'",
        id="ingress-routes",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          a: {command: x}
        ingress: {port: 70000}
        """,
        "mesh.yaml:4: ingress.port: must be <= 65535\nmesh.yaml:4: ingress.routes: required",
        id="ingress-port-and-routes",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          a:
            command: x
            retries: {retry_on: [503, teapot, 42]}
        """,
        "mesh.yaml:5: services.a.retries.retry_on[1]: invalid retry condition 'teapot': use one of "
        "connect-failure, refused, gateway-error, 5xx, reset, or a status code such as 503\n"
        "mesh.yaml:5: services.a.retries.retry_on[2]: must be >= 100",
        id="retry-on",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          a:
            command: x
            upstreams: [b, b]
            http_proxy: yes
          b: {command: x}
        """,
        "mesh.yaml:5: services.a.upstreams[1]: duplicate 'b'\n"
        "mesh.yaml:6: services.a.http_proxy: expected true or false, got string",
        id="yaml-1.2-booleans",
    ),
    pytest.param(
        """\
        mesh: shop
        servces:
          a: {command: x}
        """,
        "mesh.yaml:1: services: required\n"
        "mesh.yaml:2: servces: unknown key 'servces' (did you mean 'services'?)",
        id="top-level-typo",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          a:
            command: x
            routes:
              - fault: {abort: {status: 700}}
                mirror: {percent: 10}
                timeout: .inf
        """,
        "mesh.yaml:6: services.a.routes[0].fault.abort.status: must be <= 599\n"
        "mesh.yaml:7: services.a.routes[0].mirror.version: required\n"
        "mesh.yaml:8: services.a.routes[0].timeout: must be a finite number",
        id="fault-mirror-infinite",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          a:
            command: x
            env: !!binary aGVsbG8=
            workdir: !custom here
        """,
        "mesh.yaml:5: services.a.env: expected a mapping, got bytes\n"
        "mesh.yaml:6: services.a.workdir: unsupported tag '!custom'",
        id="tags",
    ),
    pytest.param(
        """\
        mesh: shop
        services:
          a: &loop
            command: x
            versions: {v1: *loop}
        """,
        "mesh.yaml:5: services.a.versions.v1: recursive alias",
        id="recursive-alias",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD_MANIFESTS)
def test_bad_manifest_reports_every_problem_with_its_line(text: str, expected: str) -> None:
    assert errors_of(text) == expected


def test_manifest_error_carries_problems_and_code() -> None:
    with pytest.raises(ManifestError) as caught:
        parse("mesh: shop\nservices:\n  a: {replicas: 0}\n")
    error = caught.value
    assert isinstance(error, AgentError)
    assert error.code == "manifest-invalid"
    assert [problem.path for problem in error.problems] == ["services.a.command", "services.a.replicas"]
    assert error.problems[0] == Problem("mesh.yaml", 3, "services.a.command", "required")


def test_load_manifest_names_the_file_as_typed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mesh.yaml").write_text("mesh: shop\nservices:\n  a: {}\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ManifestError, match=r"^conf/mesh\.yaml:3: services\.a\.command: required$"):
        load_manifest("conf/mesh.yaml")


def test_load_manifest_reports_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "missing.yaml"
    with pytest.raises(ManifestError) as caught:
        load_manifest(missing)
    assert str(caught.value) == "%s: cannot read: No such file or directory" % missing
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"mesh: \xff\n")
    with pytest.raises(ManifestError, match="not UTF-8 text: invalid start byte"):
        load_manifest(binary)


# ---------------------------------------------------------------- good manifests

DEFAULT_TRAFFIC = {
    "split": {"v1": 100},
    "versions": ["v1"],
    "routes": [],
    "timeout": None,
    "stream_idle_timeout": 300.0,
    "connect_timeout": 1.0,
    "handshake_timeout": 10.0,
    "retries": None,
    "load_balancer": {"kind": "least_request"},
    "outlier_detection": {
        "enabled": True,
        "consecutive_errors": 5,
        "interval": 10.0,
        "base_ejection_time": 30.0,
        "max_ejection_percent": 10.0,
        "max_ejection_time": 300.0,
    },
    "limits": {"max_connections": 1024, "max_pending": 1024},
}


def test_minimal_manifest_gets_every_default() -> None:
    manifest = parse(
        """\
        mesh: hello
        services:
          hello:
            command: python hello.py --port 8000
        """
    )
    assert manifest == Manifest(
        mesh="hello",
        services=(
            ServiceSpec(
                name="hello",
                versions=(VersionSpec(name="v1", command=("python", "hello.py", "--port", "8000"), workdir="/srv/shop"),),
                traffic=DEFAULT_TRAFFIC,
            ),
        ),
        ingress=None,
        source=str(Path("mesh.yaml").resolve()),
        security=Security(trust_domain="hello.local"),
    )
    assert manifest.services[0].restart == RestartPolicy()
    assert manifest.services[0].stop_grace_s == 10.0


FULL = """\
mesh: shop
workdir: apps
services:
  frontend:
    command: [python, front.py, "--title", "Shop Fast"]
    upstreams: [cart, catalog]
    env: {DEBUG: true, WORKERS: 4, RATIO: 0.5, NAME: front}
    health: {http: /healthz, period: 100ms}
    http_proxy: true
    egress: [API.Example.com]
    restart: {policy: no, backoff: 1s, max_backoff: 1m, max_quick_crashes: 3, stable_after: 1.5s}
    stop_grace: 2
  cart:
    command: python cart.py
    workdir: cart
    env: {COLOR: blue, LEVEL: info}
    health: {http: /health, timeout: 250ms}
    replicas: 2
    upstreams: [catalog]
    versions:
      v1:
      v2:
        command: python cart2.py
        env: {COLOR: green}
        health: {period: 0.5}
        replicas: 1
        workdir: /opt/cart2
    split: {v1: 90, v2: 10}
    routes:
      - match:
          path: {prefix: /api}
          method: get
          headers: {X-Canary: "true", x-user: {regex: "^u[0-9]+$"}, x-beta: 1}
          query: {beta: 1}
        version: v2
        timeout: 2s
        retries: {attempts: 2, retry_on: [5xx, "503", 504]}
        fault:
          delay: {fixed: 100ms, percent: 10}
          abort: {status: 503}
        mirror: {version: v2, percent: 5}
      - match: {method: [POST, put], path: {exact: /checkout}}
      - split: {v1: 50, v2: 50}
    timeout: 1m
    connect_timeout: 250ms
    handshake_timeout: 3s
    retries: {per_try_timeout: 0.5, non_idempotent: true, budget: {ratio: 0.1}}
    load_balancer: {kind: consistent_hash, header: X-User}
    outlier_detection: false
    limits: {max_pending: 10}
  catalog:
    command: python catalog.py
    load_balancer: round_robin
    outlier_detection: {consecutive_errors: 3, interval: 5s}
ingress:
  port: 8080
  routes:
    - {path: /, service: frontend}
    - {path: /api/cart, service: cart}
"""


@pytest.fixture(scope="module")
def full() -> Manifest:
    return parse_manifest(FULL, "mesh.yaml", base_dir="/srv/shop")


def test_services_come_in_dependency_order(full: Manifest) -> None:
    assert [service.name for service in full.services] == ["catalog", "cart", "frontend"]


def test_dependency_order_keeps_manifest_order_where_free() -> None:
    manifest = parse(
        """\
        mesh: shop
        services:
          a: {command: x, upstreams: [c]}
          b: {command: x}
          c: {command: x}
          d: {command: x, upstreams: [a]}
        """
    )
    assert [service.name for service in manifest.services] == ["b", "c", "a", "d"]


def test_versions_overlay_service_settings(full: Manifest) -> None:
    cart = full.service("cart")
    assert cart.versions == (
        VersionSpec(
            name="v1",
            command=("python", "cart.py"),
            env=(("COLOR", "blue"), ("LEVEL", "info")),
            replicas=2,
            health=Health(http="/health", period_s=0.2, timeout_s=0.25),
            workdir="/srv/shop/apps/cart",
        ),
        VersionSpec(
            name="v2",
            command=("python", "cart2.py"),
            env=(("COLOR", "green"), ("LEVEL", "info")),
            replicas=1,
            health=Health(http="/health", period_s=0.5, timeout_s=0.25),
            workdir="/opt/cart2",
        ),
    )
    assert cart.upstreams == ("catalog",)


def test_service_settings_and_durations(full: Manifest) -> None:
    frontend = full.service("frontend")
    (version,) = frontend.versions
    assert version.command == ("python", "front.py", "--title", "Shop Fast")
    assert version.env == (("DEBUG", "true"), ("NAME", "front"), ("RATIO", "0.5"), ("WORKERS", "4"))
    assert version.health == Health(http="/healthz", period_s=0.1, timeout_s=1.0)
    assert version.workdir == "/srv/shop/apps"
    assert frontend.restart == RestartPolicy(
        policy="no", backoff_s=1.0, max_backoff_s=60.0, max_quick_crashes=3, stable_after_s=1.5
    )
    assert frontend.stop_grace_s == 2.0
    assert frontend.http_proxy is True
    assert frontend.egress == ("api.example.com",)
    assert full.ingress == Ingress(
        port=8080,
        host="127.0.0.1",
        routes=(IngressRoute("/", "frontend"), IngressRoute("/api/cart", "cart")),
    )


def test_traffic_policy_is_normalised_for_the_sidecar(full: Manifest) -> None:
    traffic = full.service("cart").traffic
    assert traffic["split"] == {"v1": 90, "v2": 10}
    assert traffic["versions"] == ["v1", "v2"]
    assert traffic["timeout"] == 60.0
    assert traffic["connect_timeout"] == 0.25
    assert traffic["handshake_timeout"] == 3.0
    assert traffic["retries"] == {
        "attempts": 3,
        "per_try_timeout": 0.5,
        "retry_on": ["connect-failure", "refused", "gateway-error"],
        "backoff": 0.025,
        "max_backoff": 0.25,
        "non_idempotent": True,
        "budget": {"ratio": 0.1, "min_per_second": 10.0},
    }
    assert traffic["load_balancer"] == {"kind": "consistent_hash", "header": "x-user"}
    assert traffic["outlier_detection"]["enabled"] is False
    assert traffic["limits"] == {"max_connections": 1024, "max_pending": 10}
    assert traffic["routes"] == [
        {
            "match": {
                "path": {"kind": "prefix", "value": "/api"},
                "methods": ["GET"],
                "headers": [
                    {"name": "x-canary", "kind": "exact", "value": "true"},
                    {"name": "x-user", "kind": "regex", "value": "^u[0-9]+$"},
                    {"name": "x-beta", "kind": "exact", "value": "1"},
                ],
                "query": [{"name": "beta", "value": "1"}],
            },
            "split": {"v2": 100},
            "timeout": 2.0,
            "stream_idle_timeout": None,
            "retries": {
                "attempts": 2,
                "per_try_timeout": None,
                "retry_on": ["5xx", 503, 504],
                "backoff": 0.025,
                "max_backoff": 0.25,
                "non_idempotent": False,
                "budget": {"ratio": 0.2, "min_per_second": 10.0},
            },
            "fault": {"delay": {"fixed": 0.1, "percent": 10.0}, "abort": {"status": 503, "percent": 100.0}},
            "mirror": {"version": "v2", "percent": 5.0},
        },
        {
            "match": {"path": {"kind": "exact", "value": "/checkout"}, "methods": ["POST", "PUT"], "headers": [], "query": []},
            "split": {"v1": 90, "v2": 10},
            "timeout": None,
            "stream_idle_timeout": None,
            "retries": None,
            "fault": None,
            "mirror": None,
        },
        {
            "match": {"path": None, "methods": None, "headers": [], "query": []},
            "split": {"v1": 50, "v2": 50},
            "timeout": None,
            "stream_idle_timeout": None,
            "retries": None,
            "fault": None,
            "mirror": None,
        },
    ]
    catalog = full.service("catalog").traffic
    assert catalog["load_balancer"] == {"kind": "round_robin"}
    assert catalog["outlier_detection"] == {**DEFAULT_TRAFFIC["outlier_detection"], "consecutive_errors": 3, "interval": 5.0}


def test_integral_floats_count_as_integers() -> None:
    manifest = parse(
        """\
        mesh: shop
        services:
          a: {command: x, replicas: 2.0, retries: {retry_on: [503.0]}}
        ingress: {port: 8080.0, routes: [{path: /, service: a}]}
        """
    )
    assert manifest.services[0].versions[0].replicas == 2
    assert manifest.services[0].traffic["retries"]["retry_on"] == [503]
    assert manifest.ingress is not None and manifest.ingress.port == 8080


def test_merge_keys_and_anchors() -> None:
    manifest = parse(
        """\
        mesh: shop
        services:
          a: &base
            command: python app.py
            env: {A: "1"}
          b:
            <<: *base
            env: {B: "2"}
        """
    )
    assert manifest.service("b").versions[0].command == ("python", "app.py")
    assert manifest.service("b").versions[0].env == (("B", "2"),)


def test_sidecar_router_accepts_the_normalised_traffic(full: Manifest) -> None:
    """The agent's output is the sidecar's input: compile it with the real router."""
    routing = pytest.importorskip("meshctl.proxy.routing")
    for service in full.services:
        routing.Router(service.name, service.traffic)


# ---------------------------------------------------------------- the schema


def test_schema_is_valid_draft_2020_12() -> None:
    schema = manifest_json_schema()
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"


def _object_schemas(node: object, where: str = "#"):
    if isinstance(node, dict):
        if "properties" in node:
            yield where, node
        for key, value in node.items():
            yield from _object_schemas(value, "%s/%s" % (where, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _object_schemas(value, "%s/%d" % (where, index))


def test_schema_describes_every_key_and_forbids_unknown_ones() -> None:
    objects = list(_object_schemas(manifest_json_schema()))
    assert len(objects) >= 20
    for where, schema in objects:
        assert schema.get("additionalProperties") is False, where
        for key, prop in schema["properties"].items():
            assert prop.get("description"), "%s/%s" % (where, key)


@pytest.mark.parametrize("template", ["shopfast.yaml", "hello.yaml"])
def test_templates_validate(template: str) -> None:
    path = REPO / "templates" / template
    if not path.exists():
        pytest.skip("templates/%s not written yet" % template)
    reader = YamlReader(str(path))
    document = reader.read(path.read_text())
    assert reader.problems == []
    Draft202012Validator(manifest_json_schema()).validate(document)
    manifest = load_manifest(path)
    assert manifest.services


# ---------------------------------------------------------------- durations


@pytest.mark.parametrize(
    ("written", "seconds"),
    [("250ms", 0.25), ("2s", 2.0), ("1.5s", 1.5), ("1m", 60.0), ("1h", 3600.0), (2, 2.0), (0.25, 0.25), ("0s", 0.0)],
)
def test_parse_duration(written: object, seconds: float) -> None:
    assert parse_duration(written) == seconds


@pytest.mark.parametrize("written", ["2", "1 s", "-1s", "1d", "s", True, None, -1, float("nan"), [1]])
def test_parse_duration_rejects(written: object) -> None:
    with pytest.raises(DurationError):
        parse_duration(written)


@pytest.mark.parametrize(("seconds", "text"), [(0.25, "250ms"), (2.0, "2s"), (1.5, "1.5s"), (90.0, "1m30s"), (3600.0, "1h")])
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# ---------------------------------------------------------------- robustness

_KEYS = st.sampled_from(
    [
        "mesh", "services", "ingress", "workdir", "command", "versions", "upstreams", "health", "env",
        "replicas", "restart", "split", "routes", "match", "path", "prefix", "regex", "version",
        "timeout", "retries", "load_balancer", "kind", "port", "service", "v1", "v2", "a", "b",
        "outlier_detection", "limits", "fault", "mirror", "headers", "method",
    ]
)  # fmt: skip
_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-5, max_value=70000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["a", "b", "v1", "v2", "x y", "2s", "((", "/", "round_robin", "consistent_hash", "no", "'"]),
    st.text(max_size=8),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(_KEYS, children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(_KEYS, _VALUES, max_size=5))
def test_random_structures_raise_only_manifest_errors(document: dict) -> None:
    text = yaml.safe_dump(document, allow_unicode=True)
    try:
        parse_manifest(text, "fuzz.yaml", base_dir="/tmp")
    except ManifestError as error:
        assert error.problems
        assert all(str(problem).startswith("fuzz.yaml") for problem in error.problems)


def _mutate(node: object, data: st.DataObject) -> object:
    """Replace or delete one randomly chosen value somewhere inside `node`."""
    if isinstance(node, dict) and node and data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(node)))
        if data.draw(st.integers(0, 3)) == 0:
            return {k: v for k, v in node.items() if k != key}
        return {**node, key: _mutate(node[key], data)}
    if isinstance(node, list) and node and data.draw(st.booleans()):
        index = data.draw(st.integers(0, len(node) - 1))
        return node[:index] + [_mutate(node[index], data)] + node[index + 1 :]
    return data.draw(_VALUES)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_good_manifests_raise_only_manifest_errors(data: st.DataObject) -> None:
    document = yaml.safe_load(FULL)
    for _ in range(data.draw(st.integers(1, 3))):
        document = _mutate(document, data)
    try:
        parse_manifest(yaml.safe_dump(document), "fuzz.yaml", base_dir="/tmp")
    except ManifestError as error:
        assert error.problems


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(list("ab:-[]{},&*!|>'\"#\n\t %@`?<=~0\x00") + ["  ", "mesh: a\n", "<<: "]), max_size=40).map("".join))
def test_random_text_raises_only_manifest_errors(text: str) -> None:
    try:
        parse_manifest(text, "fuzz.yaml", base_dir="/tmp")
    except ManifestError as error:
        assert error.problems
