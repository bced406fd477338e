"""The sidecar: meshctl's data plane, one lean process per instance.

It imports only the standard library, uvloop, httptools, ngh2 (the HTTP/2 codec, with h2
as the fallback where ngh2 is not installed) and h2, never the agent or the CLI: its configuration arrives as plain data over the config channel
(docs/protocols.md, part 1). Traffic policy shapes are in meshctl/proxy/policy.md.

Parts:
- config: `control` (the channel, ACK/NACK), `snapshot` (compiled, immutable config);
- connections: `listeners`, `tls` (mTLS, per-accept acceptor), `detect` + `dispatch`
  (HTTP/1, HTTP/2 or opaque), `server` (client connections, drain), `seams` (the server and
  a client connection as Protocols, for the modules `server` imports);
- HTTP/1.1: `http1` (sans-IO parser), `exchange` (one request), `pool`, `mirror`,
  `upgrade` (WebSocket; like CONNECT tunnels, it ends in an `opaque` relay);
- HTTP/2 and TCP: `h2conn` (sans-IO, over ngh2 or h2), `h1bridge` (an h2 stream to an
  HTTP/1.1 app), `h2proxy`, `opaque`;
- decisions, pure: `routing`, `balance`, `retry`, `outlier`, `limits`, `authz`; `errors`
  maps every generated error to its HTTP/1.1, HTTP/2 and gRPC answer;
- observability: `observe` (the per-request hook), `metrics`, `tracing`, `admin`.
"""

# Before any module of the package loads: a compiled build that no longer matches its
# sources is set aside here, so the .py files run instead (meshctl/proxy/build.py).
from meshctl.proxy.build import BUILD

BUILD.select()
