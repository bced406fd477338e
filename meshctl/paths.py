"""Where a mesh keeps its state: the directory holding agent.sock, agent.log and the rest.

The directory is `$MESHCTL_HOME` if set, else `$XDG_STATE_HOME/meshctl` (default
`~/.local/state/meshctl`). Anyone who can write into it can replace the control socket
and so drive the agent, which runs commands; a directory that others can write to, or
that belongs to someone else, is refused rather than used.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path

SOCKET_NAME = "agent.sock"
LOG_NAME = "agent.log"


class StateDirError(Exception):
    """The state directory cannot be used safely; `hint` says how to fix it."""

    def __init__(self, message: str, hint: str) -> None:
        super().__init__(message)
        self.hint = hint


def resolve_home(env: Mapping[str, str] | None = None) -> Path:
    """The state directory named by the environment, absolute, not yet checked."""
    env = os.environ if env is None else env
    explicit = env.get("MESHCTL_HOME")
    if explicit:
        return Path(explicit).expanduser().absolute()
    xdg_state = env.get("XDG_STATE_HOME")
    base = Path(xdg_state).expanduser() if xdg_state else Path.home() / ".local" / "state"
    return (base / "meshctl").absolute()


def unsafe_reason(mode: int, owner_uid: int, my_uid: int) -> str | None:
    """Why a directory with this mode and owner must not hold a mesh, or None if it may."""
    if owner_uid != my_uid:
        return f"it is owned by uid {owner_uid}, not by you (uid {my_uid})"
    if mode & stat.S_IWOTH:
        return "it is world-writable"
    if mode & stat.S_IWGRP:
        return "it is group-writable"
    return None


def check_home(home: Path) -> Path:
    """Refuse an existing state directory that others could tamper with."""
    try:
        info = home.stat()
    except OSError as exc:
        raise StateDirError(
            f"cannot use state directory {home}: {exc.strerror}",
            "set MESHCTL_HOME to a directory you own",
        ) from exc
    if not stat.S_ISDIR(info.st_mode):
        raise StateDirError(
            f"state directory {home} is not a directory",
            "set MESHCTL_HOME to a directory you own",
        )
    reason = unsafe_reason(info.st_mode, info.st_uid, os.geteuid())
    if reason is not None:
        raise StateDirError(
            f"refusing state directory {home}: {reason}",
            f"run `chmod 700 {home}` (and make sure you own it), or set MESHCTL_HOME elsewhere",
        )
    return home


def prepare_home(home: Path) -> Path:
    """Create the state directory (mode 0700) if needed, then check it."""
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise StateDirError(
            f"cannot create state directory {home}: {exc.strerror}",
            "set MESHCTL_HOME to a directory you can write to",
        ) from exc
    return check_home(home)


def existing_home(home: Path) -> Path | None:
    """The checked state directory if it exists, None if there is none (so no mesh)."""
    if not home.exists():
        return None
    return check_home(home)


def socket_path(home: Path) -> Path:
    return home / SOCKET_NAME


def log_path(home: Path) -> Path:
    return home / LOG_NAME
