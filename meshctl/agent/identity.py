"""Workload identities: which sidecar holds which certificate, and when it is renewed.

Each sidecar (each instance, and the ingress) gets its own leaf with its service's SPIFFE ID.
A leaf is renewed once two thirds of its lifetime have passed: `leaf_for()` notices and
issues a new one, so renewal is simply part of compiling the next snapshot, and the
snapshot push delivers it without a restart (meshctl/proxy/tls.py builds new contexts; open
connections keep the old ones until they close).

CA rotation and import keep a window where both CAs are trusted (see meshctl/agent/ca.py):
`ca.stage_*()`, push; `commit_ca()`, push (every leaf reissued); `ca.finish()`, push.
The supervisor waits for every sidecar's ACK between the phases.
"""

from __future__ import annotations

import dataclasses
import ssl
import time
from pathlib import Path
from typing import Any

from meshctl.agent.ca import CLOCK_SKEW, CertificateAuthority, Leaf

RENEW_AT_FRACTION = 2 / 3


def renewal_time(leaf: Leaf) -> float:
    """Two thirds into the leaf's life, counted from when it was issued: the not-before is
    backdated for skewed clocks, and counting from it would renew a 1m leaf after 20 s."""
    issued = leaf.not_before + CLOCK_SKEW.total_seconds()
    return issued + (leaf.not_after - issued) * RENEW_AT_FRACTION


class IdentityManager:
    def __init__(self, home: str, mesh: str) -> None:
        self.ca = CertificateAuthority(Path(home) / "ca", mesh)
        self._leaves: dict[str, Leaf] = {}  # by owner: an instance's endpoint id, or "ingress"
        self._forced: set[str] = set()

    def leaf_for(self, owner: str, identity: str, lifetime_s: float, now: float | None = None) -> dict[str, Any]:
        """The leaf material for one sidecar's snapshot, renewed when due."""
        now = time.time() if now is None else now
        leaf = self._leaves.get(owner)
        if leaf is None or leaf.identity != identity or owner in self._forced or self._due(leaf, now):
            leaf = self.ca.issue(identity, lifetime_s)
            self._leaves[owner] = leaf
            self._forced.discard(owner)
        return {
            "identity": leaf.identity,
            "chain_pem": leaf.chain_pem,
            "key_pem": leaf.key_pem,
            "bundle_pem": self.ca.bundle_pem,
            "not_after": leaf.not_after,
        }

    @staticmethod
    def _due(leaf: Leaf, now: float) -> bool:
        return now >= renewal_time(leaf)

    def next_renewal(self) -> float | None:
        """When the soonest leaf falls due (unix time), for the renewal timer."""
        times = [renewal_time(leaf) for leaf in self._leaves.values()]
        return min(times) if times else None

    def export_leaves(self) -> dict[str, dict[str, Any]]:
        """Every sidecar's leaf, keys included, for the 0600 state file a new agent adopts
        the mesh from (agent.meshstate): its sidecars keep their certificates."""
        return {owner: dataclasses.asdict(leaf) for owner, leaf in self._leaves.items()}

    def restore_leaves(self, leaves: dict[str, dict[str, Any]]) -> None:
        for owner, fields in leaves.items():
            try:
                self._leaves[owner] = Leaf(**fields)
            except TypeError:
                continue  # written by another meshctl: that sidecar gets a new leaf

    def force_renewal(self, owners: list[str]) -> None:
        self._forced.update(owners)

    def prune(self, live_owners: set[str]) -> None:
        """Forget the leaves of sidecars that are gone."""
        for owner in [o for o in self._leaves if o not in live_owners]:
            del self._leaves[owner]
            self._forced.discard(owner)

    def commit_ca(self) -> None:
        """The staged CA signs from now on: every leaf is renewed with the next snapshot."""
        self.ca.commit()
        self._forced.update(self._leaves)

    def report(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        return {
            "root": self.ca.root_info(),
            "leaves": {
                owner: {**leaf.public(), "remaining_s": max(0.0, leaf.not_after - now)}
                for owner, leaf in sorted(self._leaves.items())
            },
        }


def load_user_tls(cert_path: str, key_path: str | None) -> dict[str, str]:
    """The user's ingress certificate, checked by loading it the way the sidecar will."""
    with open(cert_path) as fh:
        cert_pem = fh.read()
    with open(key_path or "") as fh:
        key_pem = fh.read()
    ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(cert_path, key_path)
    return {"cert_pem": cert_pem, "key_pem": key_pem}
