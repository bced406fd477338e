"""Deployments, Services and ServiceAccounts: the processes of the manifest as workloads.

One Deployment per service version (`cart-v1`, labels app=cart, version=v1), one Service
per service (`cart`, port 80 to the container's 8080), one ServiceAccount per service
(the mesh identity: cart's pods run as ServiceAccount cart, so Istio sees
cluster.local/ns/NS/sa/cart and Linkerd cart.NS.serviceaccount.identity...). With
Linkerd, per-version Services (`cart-v1`) give HTTPRoute backendRefs something to weigh.
"""

from __future__ import annotations

from typing import Any

from meshctl.agent.model import DEFAULT_STOP_GRACE_S, Manifest, RestartPolicy, ServiceSpec, VersionSpec
from meshctl.export import linkerd
from meshctl.export.context import (
    APP_PORT,
    PORT_NAME,
    SERVICE_PORT,
    ExportInput,
    Notes,
    deployment_name,
    env_name,
    image_of,
    labels,
    metadata,
    replicas_of,
    upstream_url,
    version_service_name,
    whole_seconds,
)

LIVENESS_PERIOD_S = 10
LIVENESS_FAILURES = 3


def objects(manifest: Manifest, given: ExportInput, notes: Notes) -> list[dict]:
    out: list[dict] = []
    for service in manifest.services:
        out.append(service_account(service, given))
        annotations = linkerd.service_annotations(service, notes) if given.mesh == "linkerd" else {}
        out.append(service_object(service.name, labels(service.name), given, annotations))
        if given.mesh == "linkerd":
            out.extend(
                service_object(version_service_name(service.name, version.name), labels(service.name, version.name), given)
                for version in service.versions
            )
        out.extend(deployment(manifest, service, version, given) for version in service.versions)
    return out


def service_account(service: ServiceSpec, given: ExportInput) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": metadata(service.name, given, labels=labels(service.name)),
    }


def service_object(name: str, selector: dict[str, str], given: ExportInput, annotations: dict | None = None) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(name, given, labels=dict(selector), annotations=annotations),
        "spec": {
            "selector": dict(selector),
            "ports": [{"name": PORT_NAME, "port": SERVICE_PORT, "targetPort": PORT_NAME, "appProtocol": "http"}],
        },
    }


def deployment(manifest: Manifest, service: ServiceSpec, version: VersionSpec, given: ExportInput) -> dict:
    pod_labels = labels(service.name, version.name)
    annotations = {"linkerd.io/inject": "enabled"} if given.mesh == "linkerd" else {}
    if given.mesh == "istio":
        pod_labels = {**pod_labels, "sidecar.istio.io/inject": "true"}
    container = {
        "name": service.name,
        "image": image_of(service, version.name),
        "ports": [{"name": PORT_NAME, "containerPort": APP_PORT, "protocol": "TCP"}],
        "env": environment(manifest, service, version, given),
        "readinessProbe": {**probe_action(version), "periodSeconds": whole_seconds(version.health.period_s),
                           "timeoutSeconds": whole_seconds(version.health.timeout_s)},
        "livenessProbe": {**probe_action(version), "periodSeconds": LIVENESS_PERIOD_S,
                          "timeoutSeconds": whole_seconds(version.health.timeout_s),
                          "failureThreshold": LIVENESS_FAILURES},
    }
    template_meta: dict = {"labels": pod_labels}
    if annotations:
        template_meta["annotations"] = annotations
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": metadata(deployment_name(service.name, version.name), given, labels=labels(service.name, version.name)),
        "spec": {
            "replicas": replicas_of(service, version.name, given),
            "selector": {"matchLabels": labels(service.name, version.name)},
            "template": {
                "metadata": template_meta,
                "spec": {
                    "serviceAccountName": service.name,
                    "terminationGracePeriodSeconds": whole_seconds(service.stop_grace_s),
                    "containers": [container],
                },
            },
        },
    }


def probe_action(version: VersionSpec) -> dict:
    if version.health.http is not None:
        return {"httpGet": {"path": version.health.http, "port": PORT_NAME}}
    return {"tcpSocket": {"port": PORT_NAME}}


def environment(manifest: Manifest, service: ServiceSpec, version: VersionSpec, given: ExportInput) -> list[dict]:
    """What the agent gives an app, in cluster terms; the manifest's env wins on a clash."""
    base = {
        "PORT": str(APP_PORT),
        "MESH_NAME": manifest.mesh,
        "MESH_SERVICE": service.name,
        "MESH_VERSION": version.name,
        **{env_name(upstream): upstream_url(upstream, given.namespace) for upstream in service.upstreams},
        **dict(version.env),
    }
    env: list[dict[str, Any]] = [{"name": name, "value": value} for name, value in base.items()]
    env.append({"name": "MESH_INSTANCE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}})
    return env


def common_notes(manifest: Manifest, given: ExportInput, notes: Notes) -> None:
    """Manifest settings that have no Kubernetes or mesh counterpart at all."""
    for service in manifest.services:
        if service.restart != RestartPolicy():
            notes.add(service.name, "restart", "Kubernetes restarts containers with its own backoff")
        if service.http_proxy:
            notes.add(service.name, "http_proxy", "no forward proxy in the cluster: use the *_URL variables")
        if service.egress:
            notes.add(service.name, "egress", "egress lists need the mesh's egress policy, not exported")
        if service.listen == "unix":
            notes.add(service.name, "listen", "the container gets PORT=8080, not MESH_SOCKET: a pod is isolated already")
        protocol = getattr(service, "protocol", "http")
        if protocol != "http":
            notes.add(service.name, "protocol", "%s is exported as HTTP; set appProtocol and routes by hand" % protocol)
        if service.stop_grace_s != DEFAULT_STOP_GRACE_S and service.stop_grace_s % 1:
            notes.add(service.name, "stop_grace", "rounded up to whole seconds")
    notes.add("*", "command, workdir", "the container image decides what runs; PORT=%d is set" % APP_PORT)
    if manifest.security.trust_domain != "%s.local" % manifest.mesh:
        notes.add("mesh", "trust_domain", "identities become cluster.local service accounts")
    if manifest.security.leaf_lifetime_s != 24 * 3600.0:
        notes.add("mesh", "certificates.leaf_lifetime", "set by the mesh's own CA")
    if manifest.observability.access_log != "off" or manifest.observability.sampling != 0.01:
        notes.add("mesh", "observability", "configure the mesh's telemetry instead")
