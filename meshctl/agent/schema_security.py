"""The manifest keys for identity, mTLS and authorization, and their semantic checks.

Top level:

    mtls: strict                 # strict | permissive | off [strict]
    trust_domain: shop.local     # SPIFFE trust domain [<mesh>.local]
    certificates: {leaf_lifetime: 24h}
    default_policy: allow        # allow | deny: for services without allow rules [allow]

Per service:

    mtls: permissive             # overrides the mesh's mode for calls *to* this service
    authorization:
      deny:  [{from: ["*"], paths: ["/admin/*"]}]
      allow: [{from: [cart, frontend], methods: [POST], paths: [/charge]}]

A rule's `from` names services of this mesh (or `ingress`), SPIFFE IDs, or patterns with
`*`; `paths` are exact or end in `*` for a prefix; `headers` map names to exact values.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

MTLS_MODES = ("strict", "permissive", "off")
TRUST_DOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"

_RULE = {
    "type": "object",
    "properties": {
        "from": {
            "type": "array",
            "items": {"type": "string", "minLength": 1},
            "description": "Callers: service names, SPIFFE IDs or patterns with *; '*' is any authenticated caller.",
        },
        "paths": {
            "type": "array",
            "items": {"type": "string", "pattern": "^/"},
            "description": "Exact paths, or prefixes ending in *.",
        },
        "methods": {
            "type": "array",
            "items": {"type": "string", "pattern": "^[A-Za-z]+$"},
            "description": "HTTP methods.",
        },
        "headers": {
            "type": "object",
            "additionalProperties": {"type": "string"},
            "description": "Header name -> exact value.",
        },
    },
    "additionalProperties": False,
    "description": "One authorization rule; it matches when every field it has matches.",
}

MANIFEST_PROPERTIES: dict[str, Any] = {
    "mtls": {"enum": list(MTLS_MODES), "description": "mTLS between sidecars: strict, permissive or off [strict]."},
    "trust_domain": {
        "type": "string",
        "pattern": TRUST_DOMAIN_PATTERN,
        "description": "SPIFFE trust domain of the identities [<mesh>.local].",
    },
    "certificates": {
        "type": "object",
        "properties": {
            "leaf_lifetime": {
                "$ref": "#/$defs/duration",
                "description": "Lifetime of each sidecar's certificate; rotated at two thirds [24h].",
            },
        },
        "additionalProperties": False,
        "description": "Certificate settings of the mesh's CA.",
    },
    "default_policy": {
        "enum": ["allow", "deny"],
        "description": "What a service without allow rules admits from authenticated callers [allow].",
    },
}

SERVICE_PROPERTIES: dict[str, Any] = {
    "mtls": {"enum": list(MTLS_MODES), "description": "mTLS mode for calls to this service [the mesh's]."},
    "authorization": {
        "type": "object",
        "properties": {
            "allow": {"type": "array", "items": _RULE, "description": "Only matching callers get in (an empty list denies all)."},
            "deny": {"type": "array", "items": _RULE, "description": "Matching callers are refused, before allow rules."},
        },
        "additionalProperties": False,
        "description": "Who may call this service; deny rules first, then allow rules, then default_policy.",
    },
}


def source_problems(path: tuple, authorization: Any, services: dict) -> Iterator[tuple[tuple, str]]:
    """A `from` entry that looks like a service name must name one: typos would silently deny."""
    if not isinstance(authorization, dict):
        return
    for kind in ("allow", "deny"):
        rules = authorization.get(kind)
        if not isinstance(rules, list):
            continue
        for index, rule in enumerate(rules):
            if not isinstance(rule, dict):
                continue
            for position, source in enumerate(rule.get("from") or []):
                if not isinstance(source, str) or "*" in source or source.startswith("spiffe://"):
                    continue
                if source != "ingress" and source not in services:
                    yield (
                        path + ("authorization", kind, index, "from", position),
                        f"unknown service {source!r} (services: {', '.join(sorted(services))}, or ingress)",
                    )


def normal_authorization(raw: Any) -> dict | None:
    if not raw:
        return None
    return {"allow": raw.get("allow"), "deny": list(raw.get("deny") or [])}
