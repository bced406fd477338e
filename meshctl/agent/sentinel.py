"""The sentinel: kills the mesh's process groups when the agent dies without cleaning up.

The agent starts one sentinel per mesh with a pipe on its stdin and writes `+PGID` when it
starts a process group and `-PGID` when that group is gone. If the agent is SIGKILLed or
crashes, the pipe reaches EOF and the sentinel SIGKILLs every group still registered, so
that nothing the mesh started outlives it, grandchildren included. PR_SET_PDEATHSIG covers
each group's leader too; this covers what the leader started.

It runs in its own session so that a signal aimed at the agent's group does not take it
along, and it imports nothing but the standard library so that it starts fast.
"""

from __future__ import annotations

import os
import signal
import sys


def apply_line(line: str, groups: set[int]) -> None:
    line = line.strip()
    if len(line) < 2 or line[0] not in "+-" or not line[1:].isdigit():
        return
    pgid = int(line[1:])
    if line[0] == "+":
        groups.add(pgid)
    else:
        groups.discard(pgid)


def kill_groups(groups: set[int]) -> None:
    for pgid in sorted(groups):
        try:
            os.killpg(pgid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def main() -> None:
    # Terminal signals must not stop the sentinel before it has done its one job.
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    groups: set[int] = set()
    for line in sys.stdin:
        if line.strip() == "exit":  # the agent shut down cleanly and stopped everything itself
            return
        apply_line(line, groups)
    kill_groups(groups)


if __name__ == "__main__":
    main()
