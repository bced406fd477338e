"""Per-process log files, with timestamps, rotation, tails and live followers.

Each app and sidecar writes to a pipe; the agent stamps every line and appends it to
`logs/<instance>.log` (apps) or `logs/<instance>.sidecar.log`, rotating at a size limit.
Followers (`meshctl logs -f`) get each line as it is written.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MAX_LOG_BYTES = 10 * 1024 * 1024
MAX_LINE_BYTES = 64 * 1024


@dataclass(frozen=True)
class LogLine:
    instance: str
    ts: float
    line: str

    def to_json(self) -> dict:
        return {"instance": self.instance, "ts": self.ts, "line": self.line}


def format_record(ts: float, line: str) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(ts))
    return f"{stamp}.{int(ts % 1 * 1000):03d} {line}\n"


def parse_record(record: str) -> tuple[float, str]:
    stamp, _, line = record.rstrip("\n").partition(" ")
    try:
        whole, _, millis = stamp.partition(".")
        ts = time.mktime(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(millis or 0) / 1000
    except ValueError:
        return 0.0, record.rstrip("\n")
    return ts, line


class LogBook:
    """All log files of one mesh, plus the followers listening to them."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._followers: set[Callable[[LogLine], None]] = set()

    def path(self, name: str) -> Path:
        return self.directory / f"{name}.log"

    def append(self, name: str, line: str, instance: str | None = None) -> None:
        ts = time.time()
        path = self.path(name)
        try:
            if path.exists() and path.stat().st_size > MAX_LOG_BYTES:
                os.replace(path, path.with_suffix(".log.1"))
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, format_record(ts, line).encode("utf-8", "replace"))
            finally:
                os.close(fd)
        except OSError:
            log.warning("cannot write log %s", path, exc_info=True)
        if instance is not None and self._followers:
            entry = LogLine(instance, ts, line)
            for follower in list(self._followers):
                follower(entry)

    def follow(self, callback: Callable[[LogLine], None]) -> Callable[[], None]:
        self._followers.add(callback)
        return lambda: self._followers.discard(callback)

    def tail(self, name: str, instance: str, count: int) -> list[LogLine]:
        path = self.path(name)
        if count <= 0 or not path.exists():
            return []
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            chunk = min(size, max(8192, count * 256))
            while True:
                fh.seek(size - chunk)
                data = fh.read(chunk)
                lines = data.splitlines()
                if len(lines) > count or chunk == size:
                    break
                chunk = min(size, chunk * 4)
        if chunk < size:
            lines = lines[1:]  # the first line was cut by the seek
        out = []
        for raw in lines[-count:]:
            ts, line = parse_record(raw.decode("utf-8", "replace"))
            out.append(LogLine(instance, ts, line))
        return out

    async def pump(self, stream: asyncio.StreamReader, name: str, instance: str | None) -> None:
        """Copy a child's output into its log until EOF."""
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line longer than the stream limit
                raw = await stream.read(MAX_LINE_BYTES)
            except (ConnectionError, asyncio.IncompleteReadError):
                return
            if not raw:
                return
            self.append(name, raw.decode("utf-8", "replace").rstrip("\r\n"), instance)
