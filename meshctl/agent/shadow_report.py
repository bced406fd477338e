"""The shadow report: the sidecars' compared requests added up, noise told apart.

Pure. Sidecars compare each shadowed request themselves (proxy.shadow, proxy.compare)
and send one result per request: the fields that differ between the primary's and the
shadow's answers (`diffs`), and for some requests the fields that differ between two
primaries (`noise`). A `ShadowTally` adds them up per service (or per replay):

* a field that differs between two primaries about as often as between the primary and
  the shadow is noise (Diffy's rule, with its thresholds: the shadow's rate must exceed
  the primaries' by more than ABSOLUTE_THRESHOLD and by more than RELATIVE_THRESHOLD of
  itself to be a difference). Noise is reported under `noise`, not under `fields`, and
  a request whose only differences are noise counts as identical. It is learned as
  results come in, so the decision is made when the report is read, from the set of
  differing fields of each request. A rare difference between primaries (one answered
  an error, so every field of the other is "absent") does not make a field noise;
* each differing field keeps its count and the first EXAMPLES examples;
* `failed` counts requests whose shadow errored or timed out.
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any

EXAMPLES = 3
ABSOLUTE_THRESHOLD = 0.03
RELATIVE_THRESHOLD = 0.2
MAX_FIELD_SETS = 4096  # distinct sets of differing fields kept; beyond, a request counts as different
LATENCY_SAMPLES = 10_000
_OVERFLOW = frozenset({"(too many kinds of difference to tell noise apart)"})


def percentile(samples: list[float], fraction: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))], 3)


class ShadowTally:
    """What one shadow (or one replay) has compared so far."""

    def __init__(self, service: str, version: str) -> None:
        self.service = service
        self.version = version
        self.compared = 0
        self.failed = 0
        self.field_counts: Counter[str] = Counter()
        self.examples: dict[str, list[dict[str, Any]]] = {}
        self.field_sets: Counter[frozenset[str]] = Counter()
        self.noise_counts: Counter[str] = Counter()  # times a field differed between two primaries
        self.references = 0
        self.failures: Counter[str] = Counter()
        self.primary_ms: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.shadow_ms: deque[float] = deque(maxlen=LATENCY_SAMPLES)
        self.updated = time.monotonic()

    def __repr__(self) -> str:
        return "<ShadowTally %s@%s %d compared, %d failed>" % (self.service, self.version, self.compared, self.failed)

    def add(self, result: dict[str, Any]) -> None:
        self.updated = time.monotonic()
        if isinstance(result.get("primary_ms"), (int, float)):
            self.primary_ms.append(float(result["primary_ms"]))
        if result.get("failed"):
            self.failed += 1
            self.failures[str(result["failed"])[:200]] += 1
            return
        if isinstance(result.get("shadow_ms"), (int, float)):
            self.shadow_ms.append(float(result["shadow_ms"]))
        self.compared += 1
        diffs = result.get("diffs") or {}
        for where, values in diffs.items():
            self.field_counts[where] += 1
            examples = self.examples.setdefault(where, [])
            if len(examples) < EXAMPLES:
                primary, shadow = (list(values) + [None, None])[:2]
                examples.append({"method": result.get("method"), "path": result.get("path"),
                                 "primary": primary, "shadow": shadow})
        fields = frozenset(diffs)
        if fields in self.field_sets or len(self.field_sets) < MAX_FIELD_SETS:
            self.field_sets[fields] += 1
        else:
            self.field_sets[_OVERFLOW] += 1
        noise = result.get("noise")
        if noise is not None:
            self.references += 1
            self.noise_counts.update(noise)

    def is_noise(self, where: str) -> bool:
        between = self.noise_counts.get(where, 0)
        if not between:
            return False
        shadow_rate = self.field_counts.get(where, 0) / self.compared if self.compared else 0.0
        excess = shadow_rate - between / self.references
        return excess <= ABSOLUTE_THRESHOLD or excess <= RELATIVE_THRESHOLD * shadow_rate

    def report(self, ignored: tuple[str, ...] = ()) -> dict[str, Any]:
        """The JSON of `meshctl shadow report`."""
        noise = {where for where in self.noise_counts if self.is_noise(where)}
        identical = sum(count for fields, count in self.field_sets.items() if not (fields - noise))
        fields = [
            {"where": where, "count": count, "examples": self.examples.get(where, [])}
            for where, count in sorted(self.field_counts.items(), key=lambda item: (-item[1], item[0]))
            if where not in noise
        ]
        return {
            "service": self.service,
            "version": self.version,
            "compared": self.compared,
            "identical": identical,
            "different": self.compared - identical,
            "failed": self.failed,
            "fields": fields,
            "noise": [
                {"where": where, "count": self.field_counts.get(where, 0), "between_primaries": count}
                for where, count in sorted(self.noise_counts.items()) if where in noise
            ],
            "references": self.references,
            "ignored": list(ignored),
            "failures": [{"reason": reason, "count": count} for reason, count in self.failures.most_common(5)],
            "latency": {
                "primary": {"p50_ms": percentile(list(self.primary_ms), 0.5), "p99_ms": percentile(list(self.primary_ms), 0.99)},
                "shadow": {"p50_ms": percentile(list(self.shadow_ms), 0.5), "p99_ms": percentile(list(self.shadow_ms), 0.99)},
            },
        }
