"""Authorization policies, checked by the receiving sidecar after the mTLS handshake.

Pure: `Policy.check(source, method, path, headers)` -> `Decision`. The order is Istio's:
1. a matching deny rule refuses;
2. if the service has allow rules (even an empty list), only a matching one admits;
3. otherwise the mesh's default policy (allow or deny) decides.

A rule matches when every field it has matches:
- `from`: service names (`cart`), SPIFFE IDs (`spiffe://shop.local/service/cart`), with `*`
  wildcards; `*` alone means any authenticated peer. A plaintext caller (permissive mode)
  has no identity and matches no `from` pattern.
- `paths`: exact (`/charge`) or prefix (`/admin/*`).
- `methods`: a list, upper-case.
- `headers`: name -> exact value.
The agent and `meshctl policy check` use this same module, so the answer a user gets from
the CLI is the one the sidecar enforces.
"""

from __future__ import annotations

import fnmatch
from typing import Any


class PolicyError(ValueError):
    pass


class Decision:
    __slots__ = ("allowed", "rule")

    def __init__(self, allowed: bool, rule: str) -> None:
        self.allowed = allowed
        self.rule = rule

    def __repr__(self) -> str:
        return "<Decision %s by %s>" % ("allow" if self.allowed else "deny", self.rule)


class Rule:
    __slots__ = ("name", "sources", "paths", "methods", "headers")

    def __init__(self, raw: dict[str, Any], name: str, trust_domain: str) -> None:
        if not isinstance(raw, dict):
            raise PolicyError("%s: expected a mapping" % name)
        unknown = set(raw) - {"from", "paths", "methods", "headers"}
        if unknown:
            raise PolicyError("%s: unknown key %s" % (name, sorted(unknown)[0]))
        self.name = name
        self.sources = [self._source_pattern(str(s), trust_domain) for s in raw.get("from") or []] or None
        self.paths = [str(p) for p in raw.get("paths") or []] or None
        self.methods = {str(m).upper() for m in raw.get("methods") or []} or None
        self.headers = {str(k).lower(): str(v) for k, v in (raw.get("headers") or {}).items()} or None

    @staticmethod
    def _source_pattern(pattern: str, trust_domain: str) -> str:
        if pattern == "*" or pattern.startswith("spiffe://"):
            return pattern
        return "spiffe://%s/service/%s" % (trust_domain, pattern)

    def matches(self, source: str | None, method: str, path: str, headers: dict[str, str] | None) -> bool:
        if self.sources is not None:
            if source is None or not any(p == "*" or fnmatch.fnmatchcase(source, p) for p in self.sources):
                return False
        if self.methods is not None and method.upper() not in self.methods:
            return False
        if self.paths is not None and not any(_path_matches(p, path) for p in self.paths):
            return False
        if self.headers is not None:
            if headers is None:
                return False
            for name, value in self.headers.items():
                if headers.get(name) != value:
                    return False
        return True


def _path_matches(pattern: str, path: str) -> bool:
    path = path.split("?", 1)[0]
    if pattern.endswith("*"):
        return path.startswith(pattern[:-1])
    return path == pattern


class Policy:
    """The policy of one receiving service."""

    __slots__ = ("default_allow", "allow", "deny", "needs_headers")

    def __init__(self, raw: dict[str, Any], trust_domain: str) -> None:
        default = raw.get("default", "allow")
        if default not in ("allow", "deny"):
            raise PolicyError("authz.default: must be allow or deny")
        self.default_allow = default == "allow"
        allow = raw.get("allow")
        self.allow = None if allow is None else [Rule(r, "allow[%d]" % i, trust_domain) for i, r in enumerate(allow)]
        self.deny = [Rule(r, "deny[%d]" % i, trust_domain) for i, r in enumerate(raw.get("deny") or [])]
        self.needs_headers = any(r.headers for r in [*self.deny, *(self.allow or [])])

    def check(self, source: str | None, method: str, path: str, headers: dict[str, str] | None = None) -> Decision:
        for rule in self.deny:
            if rule.matches(source, method, path, headers):
                return Decision(False, rule.name)
        if self.allow is not None:
            for rule in self.allow:
                if rule.matches(source, method, path, headers):
                    return Decision(True, rule.name)
            return Decision(False, "allow rules (none matched)")
        return Decision(self.default_allow, "default_policy")
