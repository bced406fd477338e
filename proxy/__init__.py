"""The sidecar: meshctl's data plane, one lean process per instance.

It imports only the standard library, uvloop, httptools and h2, never the agent or the
CLI: its configuration arrives as plain data over the config channel
(docs/protocols.md, part 1). Traffic policy shapes are in proxy/policy.md.
"""
