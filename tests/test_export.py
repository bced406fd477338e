"""`meshctl export kubernetes`: schema-valid objects whose routing and policy match the mesh.

Core objects are validated with kubernetes-validate against a pinned Kubernetes version;
Linkerd policy objects and Gateway API objects against the published CRD schemas shipped in
tests/data/k8s-schemas/, with unknown fields refused as `kubectl apply` refuses them; Istio
objects with the pydantic models cloudcoil-models-istio generates from Istio's CRDs (see the
README there).
Round trips: the weights and matches in the output equal the manifest's, or, with an agent
running the mesh, the live overrides made with `meshctl route`.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from cloudcoil.models.istio.networking.v1 import DestinationRule, VirtualService
from cloudcoil.models.istio.security.v1 import AuthorizationPolicy, PeerAuthentication

from meshctl.agent.manifest import parse_manifest
from meshctl.export import ExportInput, MissingImages, export_objects
from meshctl.export.context import ROUTE_MAX_MATCHES, ROUTE_MAX_RULES, LiveRouting, live_routing
from meshctl.export.gateway import GATEWAY_DURATION, gateway_duration
from tests.meshharness import free_port

KUBERNETES_VERSION = "1.31.0"
SCHEMAS = Path(__file__).parent / "data" / "k8s-schemas"
CRD_SCHEMAS = {
    ("policy.linkerd.io/v1beta3", "Server"): "linkerd-server-v1beta3.yaml",
    ("policy.linkerd.io/v1alpha1", "AuthorizationPolicy"): "linkerd-authorizationpolicy-v1alpha1.yaml",
    ("policy.linkerd.io/v1alpha1", "MeshTLSAuthentication"): "linkerd-meshtlsauthentication-v1alpha1.yaml",
    ("policy.linkerd.io/v1beta3", "HTTPRoute"): "linkerd-httproute-v1beta3.yaml",
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): "gateway-httproute-v1.yaml",
    ("gateway.networking.k8s.io/v1", "Gateway"): "gateway-gateway-v1.yaml",
}
CRD_GROUPS = ("policy.linkerd.io/", "gateway.networking.k8s.io/")
ROOT_FIELDS = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"}}
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
    stream_idle_timeout: 1m
    retries: {attempts: 3, per_try_timeout: 1s, retry_on: [5xx, 503]}
    routes:
      - match: {headers: {x-canary: "true"}, method: [GET, HEAD]}
        version: v2
      - match: {path: {prefix: /api}, query: {beta: "1"}}
        split: {v1: 50, v2: 50}
        timeout: 1s
        stream_idle_timeout: 10s
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


def closed(schema: dict) -> dict:
    """`schema` with every object closed to fields outside its `properties`, as the API server's
    strict field validation (kubectl apply's default) refuses them; x-kubernetes-preserve-unknown-fields
    keeps an object open. Only the structural keywords are followed, not oneOf/anyOf branches."""
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: closed(child) for name, child in out["properties"].items()}
        if "additionalProperties" not in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    for keyword in ("items", "additionalProperties"):
        if isinstance(out.get(keyword), dict):
            out[keyword] = closed(out[keyword])
    return out


@functools.cache
def crd_validator(name: str) -> jsonschema.protocols.Validator:
    """The published schema as the API server applies it; apiVersion, kind and metadata are always
    accepted at the root, also where a CRD (Linkerd's) does not list them."""
    schema = crd_schema(name)
    schema["properties"] = {**ROOT_FIELDS, **schema["properties"]}
    closed_schema = closed(schema)
    validator = jsonschema.validators.validator_for(closed_schema)
    validator.check_schema(closed_schema)
    return validator(closed_schema)


def validate_crd(item: dict) -> None:
    """Raise jsonschema.ValidationError unless `item` fits the published schema of its kind."""
    crd_validator(CRD_SCHEMAS[(item["apiVersion"], item["kind"])]).validate(item)


@pytest.mark.parametrize("mesh", ["linkerd", "istio"])
def test_core_objects_are_valid_kubernetes(mesh):
    objects, _ = export(mesh)
    core = [item for item in objects if item["kind"] in CORE_KINDS]
    assert {item["kind"] for item in core} == CORE_KINDS
    for item in core:
        kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)


def check_crd_objects(objects: list[dict]) -> set[tuple[str, str]]:
    """Validate every Linkerd policy and Gateway API object; return the (apiVersion, kind)s seen."""
    checked = set()
    for item in objects:
        if item["apiVersion"].startswith(CRD_GROUPS):
            validate_crd(item)
            checked.add((item["apiVersion"], item["kind"]))
            if item["apiVersion"] == "gateway.networking.k8s.io/v1" and item["kind"] == "HTTPRoute":
                check_route_cel_rules(item)
    return checked


def check_route_cel_rules(route: dict) -> None:
    """Two of the HTTPRoute CRD's CEL rules (x-kubernetes-validations) that jsonschema skips and
    an export could break: Exact and PathPrefix values are absolute paths, Service refs have a port."""
    for rule in route["spec"]["rules"]:
        for match in rule["matches"]:
            path = match.get("path", {"type": "PathPrefix", "value": "/"})
            assert path["type"] == "RegularExpression" or path["value"].startswith("/"), path
        for ref in rule.get("backendRefs", []):
            assert "port" in ref, ref


GATEWAY_KINDS = {("gateway.networking.k8s.io/v1", "HTTPRoute"), ("gateway.networking.k8s.io/v1", "Gateway")}


@pytest.mark.parametrize("mesh, expected", [
    ("linkerd", set(CRD_SCHEMAS)),
    ("istio", GATEWAY_KINDS),  # the ingress; mesh routing is in VirtualServices
])
def test_policy_and_gateway_objects_match_the_published_crd_schemas(mesh, expected):
    objects, _ = export(mesh)
    assert check_crd_objects(objects) == expected


METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]


def wide_manifest():
    """More routes, matches and paths than one CRD rule or route holds, a long timeout, a TLS ingress."""
    routes = [{"match": {"path": {"prefix": "/r%d/" % n}}, "version": "v2"} for n in range(16)]
    routes.append({"match": {"method": METHODS, "headers": {"x-a": {"prefix": "b"}}, "path": {"regex": "/x/[0-9]+"}},
                   "version": "v1", "timeout": "100.5s"})
    routes.append({"match": {"path": {"exact": "/slow"}}, "version": "v1", "retries": {"attempts": 2}})
    paths = ["/p%d" % n for n in range(15)]
    document = {
        "mesh": "wide",
        "services": {
            "api": {"command": "x", "versions": {"v1": {"image": "r/a:1"}, "v2": {"image": "r/a:2"}},
                    "split": {"v1": 50, "v2": 50}, "routes": routes,
                    "authorization": {"allow": [{"from": ["web"], "methods": METHODS, "paths": paths}]}},
            "web": {"command": "x", "image": "r/w:1", "upstreams": ["api"]},
        },
        "ingress": {"port": 8443, "tls": {"cert": "c.pem", "key": "k.pem"}, "routes": [{"path": "/", "service": "web"}]},
    }
    return parse_manifest(yaml.safe_dump(document), "/tmp/wide.yaml")


@pytest.mark.parametrize("mesh", ["linkerd", "istio"])
def test_objects_past_the_crd_caps_are_split_and_still_valid(mesh):
    families, _ = export_objects(wide_manifest(), ExportInput(mesh=mesh))
    objects = [item for items in families.values() for item in items]
    assert GATEWAY_KINDS <= check_crd_objects(objects)
    for item in objects:
        for rule in item["spec"].get("rules", []) if item["kind"] == "HTTPRoute" else []:
            assert len(rule["matches"]) <= ROUTE_MAX_MATCHES
    if mesh == "istio":
        return
    api = [find(objects, "HTTPRoute", name, "gateway.networking.k8s.io") for name in ("api", "api-part2")]
    rules = [rule for route in api for rule in route["spec"]["rules"]]
    assert [len(route["spec"]["rules"]) for route in api] == [ROUTE_MAX_RULES, 3]
    assert api[0]["metadata"]["annotations"] == api[1]["metadata"]["annotations"]
    methods = [match["method"] for rule in rules[16:18] for match in rule["matches"]]
    assert methods == METHODS and rules[16]["backendRefs"] == rules[17]["backendRefs"]
    assert rules[16]["timeouts"] == rules[17]["timeouts"] == {"request": "1m40s500ms"}
    assert rules[-1]["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    allowed = []
    for name in ("api-allow-0", "api-allow-0-part2"):
        route = find(objects, "HTTPRoute", name, "policy.linkerd.io")
        allowed += [(m["path"]["value"], m["method"]) for rule in route["spec"]["rules"] for m in rule["matches"]]
        policy = find(objects, "AuthorizationPolicy", name)["spec"]
        assert policy["targetRef"] == {"group": "policy.linkerd.io", "kind": "HTTPRoute", "name": name}
        assert policy["requiredAuthenticationRefs"][0]["name"] == "api-allow-0"
    assert allowed == [("/p%d" % n, method) for n in range(15) for method in METHODS]


@pytest.mark.parametrize("seconds, expected", [
    (3.0, "3s"), (0.25, "250ms"), (99.999, "99999ms"), (100.5, "1m40s500ms"), (100000.0, "27h46m40s"),
])
def test_gateway_durations_fit_the_crd_pattern(seconds, expected):
    assert gateway_duration(seconds) == expected
    assert GATEWAY_DURATION.match(expected)


def broken(kind: str, api_prefix: str, name: str, breakage) -> dict:
    objects, _ = export("linkerd")
    item = find(objects, kind, name, api_prefix)
    validate_crd(item)
    breakage(item)
    return item


@pytest.mark.parametrize("kind, api_prefix, name, breakage", [
    ("Server", "policy.linkerd.io", "payments", lambda item: item["spec"].pop("port")),
    ("Server", "policy.linkerd.io", "payments", lambda item: item["spec"].update(proxyProtocl="HTTP/1")),
    ("HTTPRoute", "gateway.networking.k8s.io", "cart", lambda item: item["spec"]["rules"][1]["backendRefs"][0].update(weight=-1)),
    ("HTTPRoute", "gateway.networking.k8s.io", "cart", lambda item: item["spec"]["rules"][1]["backendRefs"][0].update(wieght=5)),
    ("HTTPRoute", "gateway.networking.k8s.io", "cart",
     lambda item: item["spec"]["rules"][1]["matches"][0]["path"].update(type="Prefix")),
    ("HTTPRoute", "gateway.networking.k8s.io", "cart", lambda item: item["spec"]["rules"][1]["timeouts"].update(request="1.5s")),
    ("HTTPRoute", "gateway.networking.k8s.io", "cart", lambda item: item["spec"]["rules"][0]["matches"].extend([{}] * 7)),
    ("HTTPRoute", "gateway.networking.k8s.io", "cart", lambda item: item["spec"]["parentRefs"][0].update(port=0)),
    ("Gateway", "gateway.networking.k8s.io", "shop-ingress", lambda item: item["spec"]["listeners"][0].pop("protocol")),
    ("Gateway", "gateway.networking.k8s.io", "shop-ingress", lambda item: item["spec"]["listeners"][0].update(prot=80)),
    ("Gateway", "gateway.networking.k8s.io", "shop-ingress", lambda item: item["spec"].update(listeners=[])),
    ("HTTPRoute", "policy.linkerd.io", "payments-allow-0", lambda item: item["spec"]["rules"][0]["matches"][0].update(method="post")),
    ("HTTPRoute", "policy.linkerd.io", "payments-allow-0",
     lambda item: item["spec"]["rules"][0]["matches"][0]["path"].update(type="Glob")),
    ("HTTPRoute", "policy.linkerd.io", "payments-allow-0", lambda item: item["spec"]["rules"][0].update(action="allow")),
    ("HTTPRoute", "policy.linkerd.io", "payments-allow-0", lambda item: item["spec"].update(rules=[{"matches": []}] * 17)),
])
def test_the_crd_schemas_reject_a_broken_object(kind, api_prefix, name, breakage):
    with pytest.raises(jsonschema.ValidationError):
        validate_crd(broken(kind, api_prefix, name, breakage))


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
    assert annotations["timeout.linkerd.io/idle"] == "60s"
    # No timeout set: none in Linkerd either; the default stream idle timeout (5m) is written out.
    frontend = find(objects, "HTTPRoute", "frontend", "gateway.networking.k8s.io")["metadata"]["annotations"]
    assert "timeout.linkerd.io/request" not in frontend and frontend["timeout.linkerd.io/idle"] == "300s"


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
    assert "timeout" not in find(objects, "VirtualService", "frontend")["spec"]["http"][0]  # none by default, as Istio
    assert [entry.get("timeout") for entry in http] == ["3s", "1s", "3s"]
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
                 "payments.egress", "cart.routes order", "cart.routes[1].stream_idle_timeout"]),
    ("istio", ["payments.egress", "cart.retries.idempotent-only", "cart.stream_idle_timeout", "cart.routes[1].stream_idle_timeout"]),
])
def test_untranslatable_settings_are_named(mesh, expected):
    _, notes = export(mesh)
    for name in expected:
        assert name in notes.names()


def test_istio_names_a_mirror_comparison_it_cannot_translate():
    text = SHOP.replace("\n  payments:\n", "\n  payments:\n    command: pay\n", 1).replace(
        "mirror: {version: v2, percent: 10}", "mirror: {version: v2, percent: 10, compare: true}")
    _, notes = export_objects(parse_manifest(text, "/tmp/shop.yaml"), ExportInput(namespace="prod", mesh="istio"))
    assert "cart.routes[1].mirror.compare" in notes.names()


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
