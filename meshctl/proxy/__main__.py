"""`python -m meshctl.proxy --control-fd N`: run one sidecar (docs/protocols.md, part 1).

The event loop is uvloop when it is installed, plain asyncio otherwise;
MESHCTL_PROXY_LOOP=asyncio forces plain asyncio. The transports and TLS are aiofastnet's
when it is installed (meshctl/proxy/transport.py). Logs go to stderr, the level from
MESHCTL_PROXY_LOG (default INFO). The first line names the build that runs: compiled or pure
Python (meshctl/proxy/build.py).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys

from meshctl.proxy.build import BUILD
from meshctl.proxy.control import ControlChannel
from meshctl.proxy.server import ServerState
from meshctl.proxy.transport import TRANSPORTS

log = logging.getLogger("proxy")


def _new_event_loop() -> asyncio.AbstractEventLoop:
    if os.environ.get("MESHCTL_PROXY_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:
            log.info("uvloop is not installed, using plain asyncio")
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


async def _serve(control_fd: int) -> int:
    loop = asyncio.get_running_loop()
    state = ServerState(loop)
    channel_sock = socket.socket(fileno=control_fd)
    channel_sock.setblocking(False)
    await loop.create_unix_connection(lambda: ControlChannel(state), sock=channel_sock)
    loop.add_signal_handler(signal.SIGTERM, state.drain)
    loop.add_signal_handler(signal.SIGINT, state.drain)
    code = await state.done
    if state.observer is not None:
        state.observer.flush_access()
        state.observer.shadow_results.flush()
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshctl.proxy", description="meshctl sidecar")
    parser.add_argument("--control-fd", type=int, required=True, help="inherited config channel (socketpair end)")
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=os.environ.get("MESHCTL_PROXY_LOG", "INFO").upper(),
        format="%(asctime)s sidecar[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    loop = _new_event_loop()
    TRANSPORTS.install(loop)
    asyncio.set_event_loop(loop)
    log.info("starting on %s, transports: %s, build: %s", type(loop).__module__, TRANSPORTS.name, BUILD.description)
    if BUILD.warning is not None:
        log.warning("%s", BUILD.warning)
    try:
        code = loop.run_until_complete(_serve(args.control_fd))
    finally:
        # Exit at once: in-flight work was either drained or is being abandoned on purpose.
        logging.shutdown()
    os._exit(code)


if __name__ == "__main__":
    main()
