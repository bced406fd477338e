"""Load balancing: which endpoint of the chosen version takes a request.

``make_balancer(lb_cfg, endpoints)`` builds one balancer per upstream service and config
snapshot, grouping endpoints by version once; ``pick(version, ...)`` runs per request.

Kinds (``load_balancer.kind``):

* ``least_request`` (default): power of two choices on in-flight requests
  (``Endpoint.active``, kept by the engine): two distinct random endpoints, the less busy
  one wins. Cheap, and avoids the herding of a strict "least".
* ``round_robin``: cycles through the endpoints of each version.
* ``random``: uniform.
* ``consistent_hash``: a ring hash (160 virtual nodes per endpoint, positions from
  BLAKE2b of the endpoint id, so stable across processes) on a key from a header, a
  cookie or the client IP. A key sticks to one endpoint; when an endpoint joins or
  leaves only about 1/N of the keys move. A request without a key falls back to
  least_request.

Health and retries, in this order of preference:

1. Endpoints ejected by outlier detection (``ejected_until > now``) are skipped. If every
   endpoint of the version is ejected, the balancer ignores ejection (**panic mode**, as in
   Envoy): sending to a possibly-bad endpoint beats failing every request.
2. Endpoint ids in ``exclude`` (the ones a retry already tried) are skipped when another
   eligible endpoint exists; otherwise the retry goes to an excluded one.

``now`` must come from the same clock the outlier detector uses (time.monotonic()).
"""

from __future__ import annotations

import bisect
import hashlib
import random
from typing import Any, Sequence

KINDS = ("least_request", "round_robin", "random", "consistent_hash")
HASH_SOURCES = ("header", "cookie", "source_ip")
VIRTUAL_NODES = 160
_NO_EXCLUSIONS: frozenset[str] = frozenset()


class BalancerConfigError(ValueError):
    """A load_balancer block that cannot be used; the message starts with the key path."""

    code = "config-invalid"


class Endpoint:
    """One upstream sidecar. ``active`` and ``ejected_until`` are mutated by the engine."""

    __slots__ = ("id", "version", "address", "active", "ejected_until")

    def __init__(
        self, id: str, version: str, address: tuple[str, int], active: int = 0, ejected_until: float = 0.0
    ) -> None:
        self.id = id
        self.version = version
        self.address = address
        self.active = active  # requests in flight
        self.ejected_until = ejected_until  # monotonic time; ejected while now < this

    @classmethod
    def from_config(cls, entry: dict[str, Any]) -> Endpoint:
        """From a snapshot's ``{"id", "version", "address": [host, port]}``."""
        host, port = entry["address"]
        return cls(entry["id"], entry["version"], (host, int(port)))

    def available(self, now: float) -> bool:
        return now >= self.ejected_until

    def __repr__(self) -> str:
        return "Endpoint(%r, %s:%d, active=%d%s)" % (
            self.id,
            self.address[0],
            self.address[1],
            self.active,
            ", ejected_until=%.1f" % self.ejected_until if self.ejected_until else "",
        )


def _eligible(group: Sequence[Endpoint], exclude: frozenset[str], now: float) -> Sequence[Endpoint]:
    """The endpoints a pick may choose from; ``group`` itself (no copy) in the common case."""
    for endpoint in group:
        if endpoint.ejected_until > now or (exclude and endpoint.id in exclude):
            break
    else:
        return group
    healthy = [endpoint for endpoint in group if endpoint.ejected_until <= now] or group
    if exclude:
        preferred = [endpoint for endpoint in healthy if endpoint.id not in exclude]
        if preferred:
            return preferred
    return healthy


class Balancer:
    """Base: endpoints grouped by version; subclasses choose among the eligible ones."""

    __slots__ = ("endpoints", "needs_headers", "_by_version", "_rng")
    kind = ""

    def __init__(self, endpoints: list[Endpoint], rng: random.Random | None = None) -> None:
        self.endpoints = endpoints
        self.needs_headers = False
        self._rng = rng or random.Random()
        by_version: dict[str, list[Endpoint]] = {}
        for endpoint in endpoints:
            by_version.setdefault(endpoint.version, []).append(endpoint)
        self._by_version: dict[str, tuple[Endpoint, ...]] = {v: tuple(g) for v, g in by_version.items()}

    def hash_key_for(self, headers: dict[str, str] | None, client_ip: str) -> str | None:
        """The consistent-hash key of a request; None for balancers that do not hash."""
        return None

    def pick(
        self, version: str, hash_key: str | None = None, exclude: frozenset[str] = _NO_EXCLUSIONS, now: float = 0.0
    ) -> Endpoint | None:
        """An endpoint of ``version``, or None when the version has no endpoint at all."""
        group = self._by_version.get(version)
        if not group:
            return None
        if len(group) == 1:
            return group[0]
        return self._choose(version, _eligible(group, exclude, now), hash_key)

    def _choose(self, version: str, candidates: Sequence[Endpoint], hash_key: str | None) -> Endpoint:
        raise NotImplementedError

    def __repr__(self) -> str:
        counts = ", ".join("%s=%d" % (version, len(group)) for version, group in self._by_version.items())
        return "%s(%s, %d endpoints: %s)" % (type(self).__name__, self.kind, len(self.endpoints), counts)


def _least_request(candidates: Sequence[Endpoint], draw: Any) -> Endpoint:
    count = len(candidates)
    if count == 1:
        return candidates[0]
    first = int(draw() * count)
    second = int(draw() * (count - 1))
    if second >= first:
        second += 1
    a, b = candidates[first], candidates[second]
    return a if a.active <= b.active else b


class LeastRequestBalancer(Balancer):
    __slots__ = ()
    kind = "least_request"

    def pick(
        self, version: str, hash_key: str | None = None, exclude: frozenset[str] = _NO_EXCLUSIONS, now: float = 0.0
    ) -> Endpoint | None:
        group = self._by_version.get(version)
        if not group:
            return None
        count = len(group)
        if count == 1:
            return group[0]
        # Draw first, check only the two drawn: no pass over the group unless one of them
        # is ejected or excluded, and then a fresh draw among the eligible ones.
        draw = self._rng.random
        first = int(draw() * count)
        second = int(draw() * (count - 1))
        if second >= first:
            second += 1
        a, b = group[first], group[second]
        if a.ejected_until > now or b.ejected_until > now or (exclude and (a.id in exclude or b.id in exclude)):
            return _least_request(_eligible(group, exclude, now), draw)
        return a if a.active <= b.active else b


class RandomBalancer(Balancer):
    __slots__ = ()
    kind = "random"

    def _choose(self, version: str, candidates: Sequence[Endpoint], hash_key: str | None) -> Endpoint:
        return candidates[int(self._rng.random() * len(candidates))]


class RoundRobinBalancer(Balancer):
    __slots__ = ("_turn",)
    kind = "round_robin"

    def __init__(self, endpoints: list[Endpoint], rng: random.Random | None = None) -> None:
        super().__init__(endpoints, rng)
        # Start each version at a random offset so sidecars do not march in lockstep.
        self._turn = {version: self._rng.randrange(len(group)) for version, group in self._by_version.items()}

    def _choose(self, version: str, candidates: Sequence[Endpoint], hash_key: str | None) -> Endpoint:
        turn = self._turn[version]
        self._turn[version] = turn + 1
        return candidates[turn % len(candidates)]


def stable_hash(text: str) -> int:
    """A 64-bit hash that is the same in every process (unlike the built-in hash())."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


class _Ring:
    __slots__ = ("points", "owners")

    def __init__(self, group: Sequence[Endpoint]) -> None:
        nodes = sorted(
            (stable_hash("%s#%d" % (endpoint.id, replica)), endpoint.id, endpoint)
            for endpoint in group
            for replica in range(VIRTUAL_NODES)
        )
        self.points = [point for point, _, _ in nodes]
        self.owners = [endpoint for _, _, endpoint in nodes]

    def lookup(self, key: str, candidates: Sequence[Endpoint], group: Sequence[Endpoint]) -> Endpoint:
        start = bisect.bisect_left(self.points, stable_hash(key))
        owners = self.owners
        size = len(owners)
        if candidates is group:
            return owners[start % size]
        allowed = {endpoint.id for endpoint in candidates}
        for step in range(size):
            owner = owners[(start + step) % size]
            if owner.id in allowed:
                return owner
        return candidates[0]


class ConsistentHashBalancer(Balancer):
    __slots__ = ("source", "name", "_rings")
    kind = "consistent_hash"

    def __init__(self, endpoints: list[Endpoint], source: str, name: str | None, rng: random.Random | None = None) -> None:
        super().__init__(endpoints, rng)
        self.source = source
        self.name = name
        self.needs_headers = source != "source_ip"
        self._rings = {version: _Ring(group) for version, group in self._by_version.items()}

    def hash_key_for(self, headers: dict[str, str] | None, client_ip: str) -> str | None:
        if self.source == "source_ip":
            return client_ip or None
        name = self.name
        if not headers or name is None:
            return None
        if self.source == "header":
            return headers.get(name)
        return _cookie_value(headers.get("cookie"), name)

    def _choose(self, version: str, candidates: Sequence[Endpoint], hash_key: str | None) -> Endpoint:
        if hash_key is None:  # a request without the key: balance it like least_request
            return _least_request(candidates, self._rng.random)
        return self._rings[version].lookup(hash_key, candidates, self._by_version[version])

    def __repr__(self) -> str:
        return "%s on %s %s" % (super().__repr__(), self.source, self.name or "")


def _cookie_value(header: str | None, name: str) -> str | None:
    if not header:
        return None
    for part in header.split(";"):
        key, sep, value = part.partition("=")
        if sep and key.strip() == name:
            return value.strip()
    return None


def make_balancer(
    lb_cfg: dict[str, Any] | str | None, endpoints: list[Endpoint], rng: random.Random | None = None
) -> Balancer:
    """Build the balancer a ``load_balancer`` block asks for (None: least_request)."""
    if lb_cfg is None:
        return LeastRequestBalancer(endpoints, rng)
    if isinstance(lb_cfg, str):
        lb_cfg = {"kind": lb_cfg}
    if not isinstance(lb_cfg, dict):
        raise BalancerConfigError("load_balancer: expected a mapping, got %r" % (lb_cfg,))
    kind = lb_cfg.get("kind", "least_request")
    if kind == "least_request":
        return LeastRequestBalancer(endpoints, rng)
    if kind == "round_robin":
        return RoundRobinBalancer(endpoints, rng)
    if kind == "random":
        return RandomBalancer(endpoints, rng)
    if kind != "consistent_hash":
        raise BalancerConfigError("load_balancer.kind: unknown kind %r (known: %s)" % (kind, ", ".join(KINDS)))
    sources = [source for source in HASH_SOURCES if lb_cfg.get(source) not in (None, False)]
    if len(sources) != 1:
        raise BalancerConfigError(
            "load_balancer: consistent_hash needs exactly one of header, cookie, source_ip, got %r" % (lb_cfg,)
        )
    source = sources[0]
    name = lb_cfg[source]
    if source == "source_ip":
        if name is not True:
            raise BalancerConfigError("load_balancer.source_ip: expected true, got %r" % (name,))
        return ConsistentHashBalancer(endpoints, source, None, rng)
    if not isinstance(name, str) or not name:
        raise BalancerConfigError("load_balancer.%s: expected a name, got %r" % (source, name))
    return ConsistentHashBalancer(endpoints, source, name.lower() if source == "header" else name, rng)
