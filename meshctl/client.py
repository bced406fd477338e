"""The control-API client: JSON lines over the agent's unix socket (docs/protocols.md, part 2).

Every request opens its own connection, sends one object and reads response lines until
the final `{"ok": ...}`. Socket and protocol failures are translated here into the small
`ClientError` hierarchy, so the CLI never sees a raw `OSError`.

`connect()` finds a running agent (or None), `connect_or_adopt()` also starts one that
re-adopts a crashed agent's mesh, `ensure_agent()` starts one detached if none answers (one CLI at a time: `start_turn()`), and `stop_agent()` asks it to go and
makes sure it has gone.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from meshctl.agent.meshstate import STATE_FILE
from meshctl.agent.sentinel import KEEPER_SOCKET, stop_kept_mesh
from meshctl.paths import log_path, socket_path

REQUEST_TIMEOUT_S = 30.0
PING_TIMEOUT_S = 3.0
STARTUP_DEADLINE_S = 10.0
# A CLI waiting for its turn to start the agent outlives the one starting it.
START_TURN_MARGIN_S = 5.0
START_LOCK_NAME = "agent.start.lock"
EXIT_RECORD_NAME = "agent.exit"  # written by meshctl.agent.daemon
KEPT_MESH_STOP_TIMEOUT_S = 15.0
POLL_INTERVAL_S = 0.05
LOG_TAIL_LINES = 20


class ClientError(Exception):
    """Talking to the agent failed. `hint` tells the user what to do next."""

    hint = "see the agent's log (agent.log in the state directory)"


class AgentUnavailable(ClientError):
    """Nothing listens on the control socket."""

    hint = "start a mesh with `meshctl up -f mesh.yaml`"


class AgentDisconnected(ClientError):
    """The agent closed or reset the connection before answering."""


class AgentTimeout(ClientError):
    """The agent accepted the connection but did not answer in time."""


class ProtocolError(ClientError):
    """The agent sent something that is not a control-API message."""


class AgentStartError(ClientError):
    """A freshly started agent exited or never answered; `log_tail` holds its last words."""

    def __init__(self, message: str, log_tail: list[str]) -> None:
        super().__init__(message)
        self.log_tail = log_tail


class AgentError(ClientError):
    """The agent answered with an error object; `code` is one of its stable error codes."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    @property
    def hint(self) -> str:  # type: ignore[override]
        if self.code == "manifest-invalid":
            return "fix the manifest, then run `meshctl validate -f FILE` to check it"
        if self.code == "unknown-service":
            return "run `meshctl status` to list the services of this mesh"
        if self.code == "mesh-mismatch":
            return "run `meshctl down` first, or use another MESHCTL_HOME for a second mesh"
        return "see the agent's log (agent.log in the state directory)"


class Client:
    """One agent, addressed by its socket; `info` is its answer to `ping`."""

    def __init__(self, sock: Path, *, timeout: float = REQUEST_TIMEOUT_S) -> None:
        self.sock = sock
        self.timeout = timeout
        self.info: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"<Client {self.sock} mesh={self.info.get('mesh')!r} pid={self.info.get('pid')}>"

    def request(self, op: str, **fields: Any) -> Any:
        """Send one request and return its `result`; events, if any, are dropped."""
        exchange = self._exchange(op, fields, self.timeout)
        while True:
            try:
                next(exchange)
            except StopIteration as done:
                return done.value

    def events(self, op: str, *, follow: bool = False, **fields: Any) -> Generator[dict[str, Any], None, None]:
        """Yield the events of a streaming op (`logs`); close the iterator to stop following.

        A final result that is a list is yielded item by item, so an agent that answers
        a non-following `logs` with a list works the same as one that streams events.
        """
        timeout = None if follow else self.timeout
        result = yield from self._exchange(op, {**fields, "follow": follow}, timeout)
        if isinstance(result, list):
            yield from result

    def _exchange(
        self, op: str, fields: dict[str, Any], timeout: float | None
    ) -> Generator[dict[str, Any], None, Any]:
        """Yield the events of one request, then return its result."""
        request = json.dumps({"op": op, **fields}).encode() + b"\n"
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(timeout)
                self._connect(conn)
                conn.sendall(request)
                with conn.makefile("rb") as replies:
                    for raw in replies:
                        message = _decode(raw)
                        if "event" in message:
                            yield message["event"]
                            continue
                        if message.get("ok") is True:
                            return message.get("result")
                        if message.get("ok") is False:
                            error = message.get("error") or {}
                            raise AgentError(
                                str(error.get("code", "internal")),
                                str(error.get("message", "(no message)")),
                            )
                        raise ProtocolError(f"unexpected message from the agent: {raw[:200]!r}")
        except TimeoutError as exc:
            raise AgentTimeout(f"the agent did not answer `{op}` within {timeout:g} s") from exc
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise AgentDisconnected(
                f"the agent dropped the connection during `{op}` ({exc.strerror})"
            ) from exc
        raise AgentDisconnected(f"the agent closed the connection before answering `{op}`")

    def _connect(self, conn: socket.socket) -> None:
        try:
            conn.connect(str(self.sock))
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise AgentUnavailable(f"no agent listens on {self.sock}") from exc
        except OSError as exc:
            raise ClientError(f"cannot connect to {self.sock}: {exc}") from exc


def _decode(raw: bytes) -> dict[str, Any]:
    try:
        message = json.loads(raw)
    except ValueError as exc:
        raise ProtocolError(f"the agent sent a line that is not JSON: {raw[:200]!r}") from exc
    if not isinstance(message, dict):
        raise ProtocolError(f"the agent sent a non-object: {raw[:200]!r}")
    return message


def connect(home: Path) -> Client | None:
    """The agent of this state directory if one answers `ping`, else None.

    A socket file with no listener behind it (left by a killed agent) counts as no agent.
    """
    sock = socket_path(home)
    if not sock.exists():
        return None
    probe = Client(sock, timeout=PING_TIMEOUT_S)
    try:
        info = probe.request("ping")
    except AgentUnavailable:
        return None
    client = Client(sock)
    client.info = info if isinstance(info, dict) else {}
    return client


def connect_or_adopt(home: Path) -> Client | None:
    """The agent of `home`; if none answers but a crashed agent's mesh is still served (its
    sentinel keeps it), a new agent started here, which re-adopts that mesh (agent.adopt)."""
    client = connect(home)
    if client is None and ((home / KEEPER_SOCKET).exists() or (home / STATE_FILE).exists()):
        client = ensure_agent(home)
    return client


def agent_command(home: Path) -> list[str]:
    return [sys.executable, "-m", "meshctl.agent", "--home", str(home)]


def ensure_agent(
    home: Path,
    *,
    command: Sequence[str] | None = None,
    deadline_s: float = STARTUP_DEADLINE_S,
) -> Client:
    """Connect to the agent of `home`, starting it detached first if none answers.

    `command` replaces the agent's argv (tests use it to start a stand-in).
    """
    client = connect(home)
    if client is not None:
        return client
    with start_turn(home, deadline_s + START_TURN_MARGIN_S):
        # Whoever had the turn before us may have started the agent we want.
        client = connect(home)
        if client is not None:
            return client
        return _start_agent(home, list(command or agent_command(home)), deadline_s)


@contextmanager
def start_turn(home: Path, wait_s: float) -> Iterator[None]:
    """Hold `agent.start.lock`: one CLI at a time starts an agent, the others then find it.

    Without it, CLIs started side by side would each spawn an agent; all but one would
    find the agent lock taken and exit before the winner answers.
    """
    fd = os.open(home / START_LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        give_up_at = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > give_up_at:
                    raise AgentStartError(
                        f"another meshctl has been starting the agent for over {wait_s:g} s",
                        tail_lines(log_path(home)),
                    ) from None
                time.sleep(POLL_INTERVAL_S)
        yield
    finally:
        os.close(fd)  # releases the lock


def _start_agent(home: Path, argv: list[str], deadline_s: float) -> Client:
    log = log_path(home)
    pid = _spawn_detached(argv, log)
    give_up_at = time.monotonic() + deadline_s
    while True:
        client = connect(home)
        if client is not None:
            return client
        exit_status = _reap(pid)
        if exit_status is not None:
            # An agent started by other means (not through start_turn) may have won.
            client = connect(home)
            if client is not None:
                return client
            raise AgentStartError(
                f"the agent exited ({exit_status}) before it answered", tail_lines(log)
            )
        if time.monotonic() > give_up_at:
            _kill(pid)
            raise AgentStartError(
                f"the agent did not answer within {deadline_s:g} s; stopped it", tail_lines(log)
            )
        time.sleep(POLL_INTERVAL_S)


def _spawn_detached(argv: list[str], log: Path) -> int:
    """Start `argv` in its own session, stdin from /dev/null, output appended to `log`.

    posix_spawn rather than subprocess.Popen: the CLI exits while the agent lives on,
    and a Popen object that outlives its process tracking complains about it.
    """
    actions = [
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
        (os.POSIX_SPAWN_OPEN, 1, str(log), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600),
        (os.POSIX_SPAWN_DUP2, 1, 2),
    ]
    return os.posix_spawnp(
        argv[0],
        argv,
        dict(os.environ),
        file_actions=actions,
        setsid=True,
        # Python ignores SIGPIPE and SIGXFSZ; ignored signals would be inherited.
        setsigdef=(signal.SIGPIPE, signal.SIGXFSZ),
    )


def _reap(pid: int) -> str | None:
    """How our child `pid` ended, or None while it runs."""
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return "status unknown"
    if done == 0:
        return None
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def tail_lines(path: Path, count: int = LOG_TAIL_LINES) -> list[str]:
    """The last `count` lines of a log file, or none if it cannot be read."""
    try:
        with path.open("rb") as log:
            log.seek(0, os.SEEK_END)
            log.seek(max(0, log.tell() - 16384))
            text = log.read().decode(errors="replace")
    except OSError:
        return []
    return text.splitlines()[-count:]


def exit_reason(home: Path, pid: Any) -> str | None:
    """Why the agent `pid` stopped, as it wrote in `agent.exit` ("down", "signal SIGTERM"),
    or None if it left no word (it crashed, or is still running)."""
    try:
        record = json.loads((home / EXIT_RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("pid") != pid:
        return None
    return str(record.get("reason") or "") or None


def pid_alive(pid: int) -> bool:
    """True while `pid` runs; a zombie has finished and counts as gone."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@dataclass(frozen=True)
class StopOutcome:
    stopped: list[str]  # instance ids the agent reported stopping
    killed: bool  # the agent outlived the deadline and was SIGKILLed


def stop_agent(client: Client, home: Path, timeout_s: float) -> StopOutcome:
    """Send `down`, then wait until the agent has exited and its socket is silent.

    An agent still alive at the deadline is SIGKILLed, and its sentinel is asked to stop
    the process groups it supervised at once rather than after `agent_grace`. Every wait here has a deadline, so this never hangs.
    """
    pid = client.info.get("pid")
    give_up_at = time.monotonic() + timeout_s
    stopped: list[str] = []
    try:
        result = client.request("down")
        if isinstance(result, dict):
            # "stopping" is what an agent says when it answers before it has finished.
            stopped = list(result.get("stopped") or result.get("stopping") or [])
    except (AgentDisconnected, AgentUnavailable):
        pass  # it went away while answering: what we asked for
    except AgentTimeout:
        pass  # the deadline below decides

    def gone() -> bool:
        if isinstance(pid, int) and pid_alive(pid):
            return False
        return _silent(home)

    if wait_until(gone, give_up_at):
        return StopOutcome(stopped=stopped, killed=False)
    if isinstance(pid, int):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        wait_until(lambda: not pid_alive(pid), time.monotonic() + 5.0)
        # Its sentinel would keep the mesh serving for agent_grace: stop it now.
        stop_kept_mesh(home, KEPT_MESH_STOP_TIMEOUT_S)
    return StopOutcome(stopped=stopped, killed=True)


def wait_until(condition: Callable[[], bool], give_up_at: float) -> bool:
    """Poll `condition` until it holds (True) or the monotonic deadline passes (False)."""
    while not condition():
        if time.monotonic() > give_up_at:
            return False
        time.sleep(POLL_INTERVAL_S)
    return True


def _silent(home: Path) -> bool:
    try:
        return connect(home) is None
    except ClientError:
        return False
