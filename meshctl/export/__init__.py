"""`meshctl export kubernetes`: the manifest (plus the live overrides) as Kubernetes objects.

Every module is pure: `agent.model.Manifest` and an `ExportInput` in, plain dicts out,
ready for `yaml.safe_dump`. Parts:

- `context`: the input (namespace, target mesh, live routing), naming rules, the
  `Notes` collector of everything that could not be translated, and the error types.
- `workloads`: Deployment per version, Service and ServiceAccount per service,
  per-version Services for weighted backendRefs.
- `gateway`: Gateway API HTTPRoutes for mesh traffic (GAMMA, Service parents) and the
  ingress as a Gateway plus HTTPRoute.
- `istio`: VirtualService, DestinationRule, PeerAuthentication, AuthorizationPolicy.
- `linkerd`: retry/timeout/failure-accrual annotations, Server, AuthorizationPolicy,
  MeshTLSAuthentication, and policy.linkerd.io HTTPRoutes for path-scoped rules.
- `writer`: files on disk (one multi-document YAML file per family).

`export_objects()` is the one entry point the CLI uses.
"""

from __future__ import annotations

from meshctl.agent.model import Manifest
from meshctl.export import gateway, istio, linkerd, workloads
from meshctl.export.context import ExportError, ExportInput, MissingImages, Notes, check_images

__all__ = ["ExportError", "ExportInput", "MissingImages", "Notes", "export_objects"]


def export_objects(manifest: Manifest, given: ExportInput) -> tuple[dict[str, list[dict]], Notes]:
    """Objects by family (file stem), and the notes on what was not translated.

    Raises MissingImages (listing every service@version) unless each version has an image
    or `given.allow_placeholders` is set.
    """
    check_images(manifest, given)
    notes = Notes()
    families: dict[str, list[dict]] = {"workloads": workloads.objects(manifest, given, notes)}
    if given.mesh == "istio":
        families["traffic"] = istio.traffic_objects(manifest, given, notes)
        families["security"] = istio.security_objects(manifest, given, notes)
    else:
        families["traffic"] = gateway.mesh_routes(manifest, given, notes)
        families["security"] = linkerd.security_objects(manifest, given, notes)
    if manifest.ingress is not None:
        families["ingress"] = gateway.ingress_objects(manifest, given, notes)
    workloads.common_notes(manifest, given, notes)
    return families, notes
