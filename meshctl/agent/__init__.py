"""The agent: meshctl's control plane, one detached process per mesh.

Parts (decide in pure modules, act in few):
- manifest: `model` (frozen data), `manifest` + `yamllines` (YAML with line numbers),
  `schema` + `schema_*` (the JSON Schema by family of keys), `durations`, `errors`;
- deciding, pure: `plan` (desired instances, apply plan), `lifecycle` (instance state
  machine, restart decision), `compile` (snapshot per sidecar), `overrides` (live routes
  and scale), `promote` (canary decisions), `stats` and `traces` (read-outs);
- acting: `supervisor` (apply, down, push), `instance` (one instance and its runner),
  `live` (rolling changes, converge), `sidecar` (handle on one sidecar), `process` and
  `sentinel` (keeps the data plane through an agent crash, for `agent_grace`), `probe`, `logs`, `observability`, `otlp_export`
  (spans to a collector, off the event loop);
- identity: `ca` (the CA, three-phase rotation), `identity` (per-sidecar leaves);
- the control API: `control`, `control_security`, `control_obs`; `daemon` is the entry.
"""
