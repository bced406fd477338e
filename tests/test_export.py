"""`meshctl export kubernetes`: schema-valid objects whose routing and policy match the mesh.

Core objects are validated with kubernetes-validate against a pinned Kubernetes version;
Linkerd policy objects against the CRD schemas shipped in tests/data/k8s-schemas/; Istio objects
with the pydantic models cloudcoil-models-istio generates from Istio's CRDs (see the README there).
Round trips: the weights and matches in the output equal the manifest's, or, with an agent
running the mesh, the live overrides made with `meshctl route`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.istio.networking.v1 import DestinationRule, VirtualService
from cloudcoil.models.istio.security.v1 import AuthorizationPolicy, PeerAuthentication

from agent.manifest import parse_manifest
from meshctl.export import ExportInput, MissingImages, export_objects
from meshctl.export.context import LiveRouting, live_routing
from tests.meshharness import free_port

KUBERNETES_VERSION = "1.31.0"
SCHEMAS = Path(__file__).parent / "data" / "k8s-schemas"
CRD_SCHEMAS = {
    ("policy.linkerd.io/v1beta3", "Server"): "linkerd-server-v1beta3.yaml",
    ("policy.linkerd.io/v1alpha1", "AuthorizationPolicy"): "linkerd-authorizationpolicy-v1alpha1.yaml",
    ("policy.linkerd.io/v1alpha1", "MeshTLSAuthentication"): "linkerd-meshtlsauthentication-v1alpha1.yaml",
}
CORE_KINDS = {"Deployment", "Service", "ServiceAccount"}
ISTIO_MODELS = {
    ("networking.istio.io/v1", "VirtualService"): VirtualService,
    ("networking.istio.io/v1", "DestinationRule"): DestinationRule,
    ("security.istio.io/v1", "PeerAuthentication"): PeerAuthentication,
    ("security.istio.io/v1", "AuthorizationPolicy"): AuthorizationPolicy,
}

SHOP = """
mesh: shop
default_policy: deny
services:
  payments:
    image: ghcr.io/shop/payments:1
    health: {http: /healthz}
    mtls: permissive
    authorization:
      deny: [{from: ["*"], paths: ["/admin/*"]}]
      allow: [{from: [cart], methods: [POST], paths: [/charge]}, {from: [ingress]}]
    load_balancer: {kind: consistent_hash, cookie: session}
    egress: [api.stripe.com]
  cart:
    upstreams: [payments]
    env: {LOG_LEVEL: info}
    versions:
      v1: {command: cart, image: ghcr.io/shop/cart:1, replicas: 2}
      v2: {command: cart, image: ghcr.io/shop/cart:2}
    split: {v1: 90, v2: 10}
    timeout: 3s
    retries: {attempts: 3, per_try_timeout: 1s, retry_on: [5xx, 503]}
    routes:
      - match: {headers: {x-canary: "true"}, method: [GET, HEAD]}
        version: v2
      - match: {path: {prefix: /api}, query: {beta: "1"}}
        split: {v1: 50, v2: 50}
        timeout: 1s
        fault: {abort: {status: 503, percent: 5}}
        mirror: {version: v2, percent: 10}
    authorization:
      allow: [{from: [frontend]}]
  frontend:
    command: web
    image: ghcr.io/shop/frontend:1
    upstreams: [cart]
ingress:
  port: 8080
  routes: [{path: /, service: frontend}]
"""


def shop():
    return parse_manifest(SHOP.replace("\n  payments:\n", "\n  payments:\n    command: pay\n", 1), "/tmp/shop.yaml")


def export(mesh: str, **extra):
    families, notes = export_objects(shop(), ExportInput(namespace="prod", mesh=mesh, **extra))
    return [item for objects in families.values() for item in objects], notes


def find(objects, kind, name, api_prefix=""):
    for item in objects:
        if item["kind"] == kind and item["metadata"]["name"] == name and item["apiVersion"].startswith(api_prefix):
            return item
    raise KeyError((kind, name))


def crd_schema(name: str) -> dict:
    return yaml.safe_load((SCHEMAS / name).read_text())


@pytest.mark.parametrize("mesh", ["linkerd", "istio"])
def test_core_objects_are_valid_kubernetes(mesh):
    objects, _ = export(mesh)
    core = [item for item in objects if item["kind"] in CORE_KINDS]
    assert {item["kind"] for item in core} == CORE_KINDS
    for item in core:
        kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)


def test_linkerd_policy_objects_match_the_published_crd_schemas():
    objects, _ = export("linkerd")
    checked = set()
    for item in objects:
        schema_file = CRD_SCHEMAS.get((item["apiVersion"], item["kind"]))
        if schema_file is not None:
            jsonschema.validate(item, crd_schema(schema_file))
            checked.add(item["kind"])
    assert checked == {"Server", "AuthorizationPolicy", "MeshTLSAuthentication"}


def test_the_crd_schemas_reject_a_broken_object():
    broken = {"apiVersion": "policy.linkerd.io/v1beta3", "kind": "Server", "spec": {"podSelector": {}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, crd_schema("linkerd-server-v1beta3.yaml"))


def validate_istio(item: dict) -> None:
    """Raise ValueError unless `item` parses into its Istio CRD model with nothing left over.

    The models ignore unknown fields, so the dump of what they parsed must equal the object:
    a misspelt or unknown field is lost in the round trip, a wrong type fails the parse.
    """
    parsed = ISTIO_MODELS[(item["apiVersion"], item["kind"])].model_validate(item)
    known = parsed.model_dump(by_alias=True, exclude_unset=True, mode="json")
    if known != item:
        raise ValueError("fields outside the %s schema: %r" % (item["kind"], item))


def test_istio_objects_match_the_crd_models():
    objects, _ = export("istio")
    checked = set()
    for item in objects:
        if (item["apiVersion"], item["kind"]) in ISTIO_MODELS:
            validate_istio(item)
            checked.add(item["kind"])
    assert checked == {"VirtualService", "DestinationRule", "PeerAuthentication", "AuthorizationPolicy"}
    assert not [item for item in objects if "istio.io" in item["apiVersion"] and item["kind"] not in checked]


@pytest.mark.parametrize("kind, breakage", [
    ("VirtualService", lambda spec: spec["http"][0]["route"][0].update(weigth=5)),
    ("VirtualService", lambda spec: spec["http"][0]["route"][0].update(weight="ten")),
    ("DestinationRule", lambda spec: spec.update(subset=[])),
    ("AuthorizationPolicy", lambda spec: spec["rules"][0]["from"][0]["source"].update(principals="cart")),
])
def test_the_istio_models_reject_a_broken_object(kind, breakage):
    objects, _ = export("istio")
    broken = find(objects, kind, "cart" if kind != "AuthorizationPolicy" else "payments-allow")
    validate_istio(broken)
    breakage(broken["spec"])
    with pytest.raises(ValueError):
        validate_istio(broken)


def test_deployments_carry_version_labels_identity_env_and_probes():
    objects, _ = export("linkerd")
    deployment = find(objects, "Deployment", "cart-v1")
    assert deployment["spec"]["replicas"] == 2
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["labels"] == {"app": "cart", "version": "v1"}
    assert pod["spec"]["serviceAccountName"] == "cart"
    container = pod["spec"]["containers"][0]
    assert container["image"] == "ghcr.io/shop/cart:1"
    env = {entry["name"]: entry.get("value") for entry in container["env"]}
    assert env["PORT"] == "8080"
    assert env["PAYMENTS_URL"] == "http://payments.prod.svc.cluster.local:80"
    assert env["LOG_LEVEL"] == "info"
    assert container["readinessProbe"]["tcpSocket"] == {"port": "http"}
    payments = find(objects, "Deployment", "payments-v1")["spec"]["template"]["spec"]["containers"][0]
    assert payments["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert find(objects, "Service", "cart-v2")["spec"]["selector"] == {"app": "cart", "version": "v2"}


def gateway_weights(route: dict) -> list[dict]:
    return [{ref["name"]: ref["weight"] for ref in rule["backendRefs"]} for rule in route["spec"]["rules"]]


def test_gateway_routes_round_trip_the_manifest():
    objects, _ = export("linkerd")
    main = find(objects, "HTTPRoute", "cart", "gateway.networking.k8s.io")
    assert main["spec"]["parentRefs"] == [{"group": "", "kind": "Service", "name": "cart", "port": 80}]
    # The first route shares the service's retries, the second has none of its own: both stay here.
    assert gateway_weights(main) == [{"cart-v2": 100}, {"cart-v1": 50, "cart-v2": 50}, {"cart-v1": 90, "cart-v2": 10}]
    first, second, default = main["spec"]["rules"]
    assert first["matches"] == [
        {"headers": [{"type": "Exact", "name": "x-canary", "value": "true"}], "method": method} for method in ("GET", "HEAD")
    ]
    assert second["matches"] == [{"path": {"type": "PathPrefix", "value": "/api"},
                                  "queryParams": [{"type": "Exact", "name": "beta", "value": "1"}]}]
    assert second["timeouts"] == {"request": "1s"}
    assert default["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    annotations = main["metadata"]["annotations"]
    assert annotations["retry.linkerd.io/http"] == "5xx,503"
    assert annotations["retry.linkerd.io/limit"] == "2"
    assert annotations["retry.linkerd.io/timeout"] == "1s"
    assert annotations["timeout.linkerd.io/request"] == "3s"


def test_istio_routes_round_trip_the_manifest():
    objects, _ = export("istio")
    http = find(objects, "VirtualService", "cart")["spec"]["http"]
    weights = [{d["destination"]["subset"]: d["weight"] for d in entry["route"]} for entry in http]
    assert weights == [{"v2": 100}, {"v1": 50, "v2": 50}, {"v1": 90, "v2": 10}]
    assert http[0]["match"] == [{"headers": {"x-canary": {"exact": "true"}}, "method": {"exact": m}} for m in ("GET", "HEAD")]
    assert http[1]["match"] == [{"uri": {"prefix": "/api"}, "queryParams": {"beta": {"exact": "1"}}}]
    assert http[1]["fault"] == {"abort": {"httpStatus": 503, "percentage": {"value": 5.0}}}
    assert http[1]["mirrorPercentage"] == {"value": 10.0}
    assert http[2]["retries"] == {"attempts": 2, "retryOn": "5xx,503", "perTryTimeout": "1s"}
    assert find(objects, "VirtualService", "frontend")["spec"]["http"][0]["retries"] == {"attempts": 0}
    rule = find(objects, "DestinationRule", "payments")["spec"]
    assert rule["trafficPolicy"]["loadBalancer"] == {"consistentHash": {"httpCookie": {"name": "session", "ttl": "0s"}}}
    assert [subset["name"] for subset in find(objects, "DestinationRule", "cart")["spec"]["subsets"]] == ["v1", "v2"]


def test_istio_security_keeps_deny_then_allow_then_default():
    objects, _ = export("istio")
    assert find(objects, "PeerAuthentication", "default")["spec"] == {"mtls": {"mode": "STRICT"}}
    assert find(objects, "PeerAuthentication", "payments")["spec"]["mtls"] == {"mode": "PERMISSIVE"}
    assert find(objects, "AuthorizationPolicy", "allow-nothing")["spec"] == {}
    deny = find(objects, "AuthorizationPolicy", "payments-deny")["spec"]
    assert deny["action"] == "DENY"
    assert deny["rules"] == [{"from": [{"source": {"principals": ["*"]}}], "to": [{"operation": {"paths": ["/admin/*"]}}]}]
    allow = find(objects, "AuthorizationPolicy", "payments-allow")["spec"]
    assert allow["rules"][0] == {
        "from": [{"source": {"principals": ["cluster.local/ns/prod/sa/cart"]}}],
        "to": [{"operation": {"paths": ["/charge"], "methods": ["POST"]}}],
    }
    assert allow["rules"][1]["from"][0]["source"]["principals"] == ["cluster.local/ns/prod/sa/shop-ingress-istio"]


def test_linkerd_authorization_objects():
    objects, notes = export("linkerd")
    assert find(objects, "Server", "payments")["spec"]["accessPolicy"] == "deny"
    assert find(objects, "Server", "frontend")["spec"]["accessPolicy"] == "deny"  # default_policy: deny
    authn = find(objects, "MeshTLSAuthentication", "payments-allow-0")["spec"]
    assert authn == {"identities": ["cart.prod.serviceaccount.identity.linkerd.cluster.local"]}
    policy = find(objects, "AuthorizationPolicy", "payments-allow-0")["spec"]
    assert policy["targetRef"] == {"group": "policy.linkerd.io", "kind": "HTTPRoute", "name": "payments-allow-0"}
    route = find(objects, "HTTPRoute", "payments-allow-0", "policy.linkerd.io")
    assert route["spec"]["rules"] == [{"matches": [{"path": {"type": "Exact", "value": "/charge"}, "method": "POST"}]}]
    assert find(objects, "AuthorizationPolicy", "cart-allow-0")["spec"]["targetRef"]["kind"] == "Server"
    assert "payments.authorization.deny[0]" in notes.names()


@pytest.mark.parametrize("mesh, expected", [
    ("linkerd", ["cart.routes[1].fault", "cart.routes[1].mirror", "payments.load_balancer.consistent_hash.cookie",
                 "payments.egress", "cart.routes order"]),
    ("istio", ["payments.egress", "cart.retries.idempotent-only"]),
])
def test_untranslatable_settings_are_named(mesh, expected):
    _, notes = export(mesh)
    for name in expected:
        assert name in notes.names()


def test_missing_images_are_all_listed_unless_placeholders_are_allowed():
    text = "mesh: m\nservices:\n  a: {command: x}\n  b: {command: x, versions: {v1: {image: 'r/b:1'}, v2: {}}}\n"
    manifest = parse_manifest(text, "/tmp/m.yaml")
    with pytest.raises(MissingImages) as caught:
        export_objects(manifest, ExportInput())
    assert caught.value.missing == ["a@v1", "b@v2"]
    families, _ = export_objects(manifest, ExportInput(allow_placeholders=True))
    images = [item["spec"]["template"]["spec"]["containers"][0]["image"]
              for item in families["workloads"] if item["kind"] == "Deployment"]
    assert images == ["registry.invalid/meshctl/a:v1", "r/b:1", "registry.invalid/meshctl/b:v2"]


def test_live_routing_replaces_the_manifest_routing():
    live = LiveRouting(7, {"cart": {"split": {"v1": 20, "v2": 80}, "routes": []}}, {"cart@v2": 3})
    objects, _ = export("linkerd", live=live)
    assert gateway_weights(find(objects, "HTTPRoute", "cart", "gateway.networking.k8s.io")) == [{"cart-v1": 20, "cart-v2": 80}]
    assert find(objects, "Deployment", "cart-v2")["spec"]["replicas"] == 3


def test_live_routing_reads_the_agent_answers():
    show = {"config_version": 4, "services": {"a": {"live": {"split": {"v1": 100}, "routes": []}}}}
    differences = [{"service": "a", "what": "replicas v1", "manifest": 1, "live": 2},
                   {"service": "a", "what": "split", "manifest": {}, "live": {}}]
    assert live_routing(show, differences) == LiveRouting(4, {"a": {"split": {"v1": 100}, "routes": []}}, {"a@v1": 2})


# ------------------------------------------------------------------ the CLI, with a real agent

CANARY = """
mesh: exportlive
services:
  api:
    health: {{http: /healthz}}
    versions:
      v1: {{command: {PY} {APPS}/echo.py, image: 'r/api:1'}}
      v2: {{command: {PY} {APPS}/echo.py, image: 'r/api:2'}}
    split: {{v1: 100}}
ingress:
  port: {port}
  routes: [{{path: /, service: api}}]
"""


def load_documents(path: Path) -> list[dict]:
    return [item for item in yaml.safe_load_all(path.read_text()) if item]


def test_cli_without_images_exits_2_naming_each_version(mesh):
    text = CANARY.format(port=free_port(), PY="{PY}", APPS="{APPS}")
    manifest = mesh.write_manifest(text.replace(", image: 'r/api:1'", "").replace(", image: 'r/api:2'", ""))
    result = mesh.cli("export", "kubernetes", "-f", str(manifest))
    assert result.returncode == 2, result.stderr
    assert "api@v1" in result.stderr and "api@v2" in result.stderr


def test_cli_exports_the_live_overrides_of_a_running_agent(mesh):
    manifest = mesh.write_manifest(CANARY.format(port=free_port(), PY="{PY}", APPS="{APPS}"))
    out = mesh.tmp / "out"
    alone = mesh.cli("export", "kubernetes", "-f", str(manifest), "-o", str(out), check=True)
    assert "manifest" in alone.stderr and "no agent" in alone.stderr
    route = find(load_documents(out / "traffic.yaml"), "HTTPRoute", "api")
    assert gateway_weights(route) == [{"api-v1": 100}]

    mesh.up()
    mesh.cli("route", "split", "api", "v1=30", "v2=70", check=True)
    mesh.cli("route", "set", "api", "--header", "x-canary=yes", "--to", "v2", check=True)
    live = mesh.cli("export", "kubernetes", "-f", str(manifest), "-o", str(out), "--mesh", "linkerd", check=True)
    assert "live overrides" in live.stderr
    shown = json.loads(mesh.cli("route", "show", "api", "-o", "json", check=True).stdout)["services"]["api"]["live"]
    objects = load_documents(out / "traffic.yaml")
    route = find(objects, "HTTPRoute", "api")
    assert gateway_weights(route) == [{"api-v2": 100}, {"api-v%s" % v[1:]: w for v, w in shown["split"].items()}]
    assert route["spec"]["rules"][0]["matches"] == [{"headers": [{"type": "Exact", "name": "x-canary", "value": "yes"}]}]
    assert "# routing from: manifest" in (out / "traffic.yaml").read_text().splitlines()[1]

    istio = mesh.cli("export", "kubernetes", "-f", str(manifest), "--mesh", "istio", check=True)
    service = find([item for item in yaml.safe_load_all(istio.stdout) if item], "VirtualService", "api")
    assert [{d["destination"]["subset"]: d["weight"] for d in e["route"]} for e in service["spec"]["http"]] == [
        {"v2": 100}, {"v1": 30, "v2": 70}]
