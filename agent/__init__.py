"""The agent: meshctl's control plane, one detached process per mesh.

Parts:
- `model`: the validated manifest as frozen data.
- `manifest`, `schema`: YAML -> model, with file:line errors; the JSON Schema.
- `supervisor`: the instance state machine and the reconcile step (decide, then act).
- `process`: spawning process groups that cannot outlive the agent; `sentinel` is the
  watchdog that kills them if the agent is SIGKILLed.
- `compile`: model + live state -> one config snapshot per sidecar.
- `control`: the JSON-lines control API on agent.sock.
- `daemon`: the entry point (`python -m agent`), lock, state directory.
"""
