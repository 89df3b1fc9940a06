"""A warm process for ad-hoc commands: what a command imports, imported once.

A `patchdrill` command spends about 1.4 s importing Prefect, the flows and the connectors before
it does anything. While patchdrill's background server runs (cli/api.py), a warm process runs
beside it: a Python process that has imported the command line, the flows and the connectors
and waits on a Unix socket. The `patchdrill` command (cli/launcher.py) hands it the command: the
arguments, the environment, the working directory, the umask and the standard output and error
themselves (the descriptors, passed over the socket). The warm process forks and the child
becomes the command: it runs exactly what `patchdrill` runs in a process of its own, writes
straight to the caller's terminal and reports the exit code back. Standard input is passed too,
except a terminal, which the caller reads and feeds through a pipe (the child is not in the
terminal's foreground process group, so it may not read the terminal itself).

The caller forwards Ctrl-C, SIGTERM, SIGHUP and SIGQUIT to the child's process group, as a
terminal would send them to a command and its subprocesses. A caller that dies (kill -9) closes
the socket, which the child takes as SIGTERM: the clean stop.

It is used only when it is the same as a fresh process would be: the same Python, the same user,
the same code (a stamp of the package's source files and of the environment's installed
packages), the same PREFECT_* and PATCHDRILL_* environment, which modules read on import, and
the same Prefect settings files (profiles, and .env, prefect.toml and pyproject.toml in the
working directory). The
warm process forks only while it has a single thread (checked every time), and PATCHDRILL_WARM=0
or PATCHDRILL_SERVER=temporary never use it. It stops with the background server it accompanies,
when another warm process replaces it, and on SIGTERM (`patchdrill server stop`).

This module is the caller's half and the shared parts, standard library only: it is what runs
before a command has imported anything. The warm process itself is cli/warm_process.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import sys
import threading
from pathlib import Path
from typing import Any

WARM_ENV = "PATCHDRILL_WARM"
#: set by the command itself (cli/api.py while a run reports to the background server, cli/app.py
#: for Prefect's temporary API), not by its caller
_NOT_KEYED = {"PATCHDRILL_PRIVATE_API", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"}
_PACKAGES = ("cli", "flows", "tasks", "connectors", "configs")
_SOURCE_SUFFIXES = (".py", ".ps1", ".sh", ".j2", ".html", ".yaml")
#: where Prefect finds settings in the working directory (besides the environment and profiles)
_CWD_SETTINGS_FILES = (".env", "prefect.toml", "pyproject.toml")
HEADER = struct.Struct("!Q")
#: the descriptors a command is handed: standard input, output and error
STDIO = 3
#: how often the warm process looks whether its server still runs and it is still the current one
CHECK_SECONDS = 1.0
#: a caller that is not the same user is refused (SO_PEERCRED: pid, uid, gid)
PEERCRED = struct.Struct("3i")
#: the environment as the command received it, before the command itself set anything (--log-json
#: sets Prefect's logging variables, cli/api.py its own): what a warm process is started with
_caller_env: dict[str, str] = dict(os.environ)
#: the modules a command may need, imported before the first fork
WARM_MODULES = (
    "cli.app", "flows.patch", "flows.backup", "flows.restore", "flows.verify", "flows.prune", "flows.drill",
    "flows.failover", "flows.freshness", "flows.inventory", "connectors.ssh", "connectors.winrm",
    "connectors.stores", "prefect.flow_engine", "prefect.task_engine", "prefect.client.orchestration",
)


# --------------------------------------------------------------------------- where, and whether it fits


def server_dir(env: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    """The background server's directory as Prefect's default settings place it (PREFECT_HOME or
    ~/.prefect): found without importing Prefect. cli/api.py's BackgroundServer checks it agrees."""
    return Path(env.get("PREFECT_HOME") or "~/.prefect").expanduser() / "patchdrill" / "server"


def state_file(env: dict[str, str] | os._Environ[str] = os.environ) -> Path:
    return server_dir(env) / "warm.json"


def code_stamp(root: Path = Path(__file__).resolve().parents[1]) -> str:
    """What changes when the code a command would import changes: the package's source files
    (names, sizes, mtimes) and the installed packages' directory."""
    digest = hashlib.sha256()
    pending = [root / name for name in _PACKAGES]
    while pending:
        directory = pending.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                if entry.name != "__pycache__":
                    pending.append(Path(entry.path))
            elif entry.name.endswith(_SOURCE_SUFFIXES):
                found = entry.stat(follow_symlinks=False)
                digest.update(f"{entry.path}\0{found.st_size}\0{found.st_mtime_ns}\n".encode())
    for path in sys.path:
        if path.endswith("site-packages"):
            try:
                digest.update(f"{path}\0{os.stat(path).st_mtime_ns}\n".encode())
            except OSError:
                pass
    return digest.hexdigest()


def fits_key(env: dict[str, str] | os._Environ[str] = os.environ) -> str:
    """Whom a warm process may serve: same interpreter, user, code and import-time environment."""
    keyed = sorted((k, v) for k, v in env.items()
                   if k.startswith(("PREFECT_", "PATCHDRILL_")) and k not in _NOT_KEYED)
    # Prefect also reads its settings from its profiles and from files in the working directory.
    settings_files = [Path(env.get("PREFECT_HOME") or "~/.prefect").expanduser() / "profiles.toml",
                      *(Path(name).absolute() for name in _CWD_SETTINGS_FILES)]
    blob = json.dumps([sys.executable, os.getuid(), code_stamp(), keyed, [_content_digest(p) for p in settings_files]])
    return hashlib.sha256(blob.encode()).hexdigest()


def _content_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return ""


def read_state(path: Path) -> dict[str, Any] | None:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def alive(pid: int, marker: str | None = None) -> bool:
    """The process exists, is not a zombie and, when a marker is given, its command line has it:
    a pid from an old state file may belong to another program by now."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace") if marker else ""
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z" and (marker is None or marker in cmdline)


# --------------------------------------------------------------------------- the caller's half


def run_warm(argv: list[str]) -> int | None:
    """Run the command in the warm process; its exit code, or None when no warm process fits
    (nothing has started then: the caller runs the command itself)."""
    if os.environ.get(WARM_ENV, "1") == "0" or os.environ.get("PATCHDRILL_SERVER") == "temporary":
        return None
    state = read_state(state_file())
    if state is None or not alive(int(state.get("pid", 0))) or state.get("key") != fits_key():
        return None
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        connection.connect(str(state["socket"]))
        child = _hand_over(connection, argv)
    except OSError:
        connection.close()
        return None
    if child is None:
        connection.close()
        return None
    return _wait_for(connection, child)


def _hand_over(connection: socket.socket, argv: list[str]) -> int | None:
    """Send the command; the child's pid once it has taken it, None if the warm process refused."""
    umask = os.umask(0o077)
    os.umask(umask)
    request = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd(), "umask": umask}).encode()
    stdin = 0
    feed_end = None
    if os.isatty(0):
        stdin, feed_end = os.pipe()
    try:
        socket.send_fds(connection, [HEADER.pack(len(request))], [stdin, 1, 2])
        connection.sendall(request)
    finally:
        if stdin != 0:
            os.close(stdin)
    reply = _read_line(connection)
    if not reply.startswith("pid "):
        if feed_end is not None:
            os.close(feed_end)
        return None
    if feed_end is not None:
        threading.Thread(target=_feed_terminal, args=(feed_end,), daemon=True).start()
    return int(reply.split()[1])


def _feed_terminal(feed_end: int) -> None:
    """Copy what is typed at the terminal to the child's standard input until end of input."""
    try:
        while chunk := os.read(0, 65536):
            os.write(feed_end, chunk)
    except OSError:
        pass
    finally:
        os.close(feed_end)


def _wait_for(connection: socket.socket, child: int) -> int:
    def forward(signum: int, _frame: object) -> None:
        try:
            os.killpg(child, signum)
        except (ProcessLookupError, PermissionError):
            pass

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
        signal.signal(signum, forward)
    reply = _read_line(connection)
    connection.close()
    if reply.startswith("exit "):
        return int(reply.split()[1])
    sys.stderr.write(f"error: the command's process (pid {child}) ended without an exit status (killed?)\n")
    return 1


def _read_line(connection: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = connection.recv(4096)
        if not chunk:
            return ""
        data += chunk
    return data.decode()





def adopt_caller_env(env: dict[str, str]) -> None:
    """In a warm process's child: the environment it was handed is its caller's."""
    global _caller_env
    _caller_env = dict(env)


def start(server_state: Path) -> None:
    """Start a warm process for this environment beside the background server whose state file
    is server_state, unless one that fits runs already. Never waits for it."""
    import subprocess

    if _caller_env.get(WARM_ENV, "1") == "0" or server_state.parent != server_dir(_caller_env):
        return
    env = {k: v for k, v in _caller_env.items() if k not in _NOT_KEYED}
    key = fits_key(env)
    state = read_state(state_file())
    if state is not None and alive(int(state.get("pid", 0))) and state.get("key") == key:
        return
    log = server_state.parent / "warm.log"
    with open(log, "ab") as output:
        subprocess.Popen([sys.executable, "-m", "cli.warm_process", "--key", key, "--server-state", str(server_state)],
                         env=env, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT,
                         start_new_session=True)  # in this directory: it reads the same settings files


def stop() -> int | None:
    """SIGTERM the warm process of this environment, if one runs; its pid."""
    state = read_state(state_file())
    if state is None or not alive(int(state.get("pid", 0))):
        return None
    pid = int(state["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return None
    return pid
