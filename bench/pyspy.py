"""Sampling profiles of a running sidecar with py-spy, and the table the hot-path developers read.

`py-spy record --format raw` writes collapsed stacks, one per line:
`outer (file.py:12);inner (file.py:40) 17`, the number being how many samples ended in
exactly that stack. A function's own time is the samples whose innermost frame is that
function; its total time is the samples whose stack contains it anywhere. Idle samples
(the loop waiting in epoll) are not recorded, so shares are of the time the process was
busy. `--nonblocking` keeps py-spy from pausing the sidecar, so throughput stays honest.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass

from procs import BenchError

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


@dataclass(frozen=True)
class FunctionTime:
    function: str  # "name (path)"
    own: int  # samples with this function innermost
    total: int  # samples with this function anywhere on the stack


@dataclass(frozen=True)
class Profile:
    samples: int
    functions: list[FunctionTime]  # by own samples, descending


def _function(frame: str) -> str:
    """`handle (/x/meshctl/proxy/server.py:120)` -> `handle (meshctl/proxy/server.py)`: one row per function."""
    match = _FRAME.match(frame.strip())
    if not match:
        return frame.strip()
    return "%s (%s)" % (match.group("func"), _short_path(match.group("file")))


def _short_path(path: str) -> str:
    if "/site-packages/" in path:
        return path.split("/site-packages/", 1)[1]
    stdlib = re.search(r"/lib/python3\.\d+/(.*)$", path)
    if stdlib:
        return stdlib.group(1)
    for package in ("meshctl",):
        marker = "/%s/" % package
        if marker in path:
            return package + "/" + path.rsplit(marker, 1)[1]
    return os.path.basename(path)


def aggregate(raw: str) -> Profile:
    """Own and total samples per function from py-spy's raw (collapsed) output."""
    own: collections.Counter[str] = collections.Counter()
    total: collections.Counter[str] = collections.Counter()
    samples = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        functions = [_function(frame) for frame in stack.split(";") if frame]
        if not functions:
            continue
        own[functions[-1]] += count
        for name in set(functions):
            total[name] += count
    ranked = sorted(own, key=lambda name: (-own[name], name))
    return Profile(samples, [FunctionTime(name, own[name], total[name]) for name in ranked])


def py_spy() -> str:
    beside_python = os.path.join(os.path.dirname(sys.executable), "py-spy")
    found = beside_python if os.path.exists(beside_python) else shutil.which("py-spy")
    if found is None:
        raise BenchError("py-spy is not installed (make bench-deps)")
    return found


def record(pid: int, seconds: float, out_path: str, rate: int = 250) -> subprocess.Popen:
    """Start sampling `pid` for `seconds` into `out_path`; the caller waits on the Popen."""
    argv = [py_spy(), "record", "--format", "raw", "--nonblocking", "--full-filenames", "--rate", str(rate),
            "--duration", str(max(1, round(seconds))), "--pid", str(pid), "--output", out_path]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
