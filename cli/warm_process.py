"""The warm process of cli/warm.py: imports what a command needs, then forks one child per command.

`python -m cli.warm_process --key K --server-state PATH`, started by cli/warm.py's `start`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from cli import warm
from cli.server_daemon import write_state
from cli.warm import CHECK_SECONDS, HEADER, PEERCRED, STDIO, alive, read_state

def serve(key: str, server_state: Path) -> None:
    import importlib

    for module in warm.WARM_MODULES:
        importlib.import_module(module)
    if threading.active_count() != 1:
        raise SystemExit(f"warm process: {threading.active_count()} threads after the imports; a fork would "
                         "copy them half-way: not serving")
    directory = server_state.parent
    own_state = directory / "warm.json"
    path = directory / f"warm-{os.getpid()}.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        listener.bind(str(path))
    finally:
        os.umask(old_umask)
    listener.listen(16)
    listener.settimeout(CHECK_SECONDS)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel: no zombies

    def stop_serving(_signum: int, _frame: object) -> None:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop_serving)
    state = {"pid": os.getpid(), "key": key, "socket": str(path), "served": 0}
    write_state(own_state, state)
    try:
        while _still_wanted(own_state, server_state):
            try:
                connection, _ = listener.accept()
            except socket.timeout:
                continue
            connection.settimeout(None)
            pid, uid, _gid = PEERCRED.unpack(connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                                    PEERCRED.size))
            if uid != os.getuid() or threading.active_count() != 1:
                _refuse(connection, "not the same user" if uid != os.getuid() else "more than one thread")
                continue
            if os.fork() == 0:
                listener.close()
                _become_the_command(connection)  # never returns
            connection.close()
            state["served"] += 1
            write_state(own_state, state)
    finally:
        listener.close()
        path.unlink(missing_ok=True)
        found = read_state(own_state)
        if found is not None and found.get("pid") == os.getpid():
            own_state.unlink(missing_ok=True)


def _still_wanted(own_state: Path, server_state: Path) -> bool:
    mine = read_state(own_state)
    server = read_state(server_state)
    return (mine is not None and mine.get("pid") == os.getpid()
            and server is not None and alive(int(server.get("pid", 0))))


def _refuse(connection: socket.socket, why: str) -> None:
    try:
        for fd in socket.recv_fds(connection, HEADER.size, STDIO)[1]:
            os.close(fd)
        connection.sendall(f"refused {why}\n".encode())
    except OSError:
        pass
    connection.close()


def _become_the_command(connection: socket.socket) -> None:
    """In the forked child: take the caller's descriptors, environment and place, run the
    command as cli/launcher.py would in its own process, report its exit code, exit."""
    code = 1
    try:
        request = _receive(connection)
        for signum in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # a terminal with `stty tostop` still gets the output
        os.setpgid(0, 0)  # a group of its own: the caller forwards signals to it and its subprocesses
        os.environ.clear()
        os.environ.update(request["env"])
        warm.adopt_caller_env(request["env"])
        os.chdir(request["cwd"])
        os.umask(int(request["umask"]))
        for stream in (sys.stdout, sys.stderr):
            stream.reconfigure(line_buffering=stream.isatty())
        from cli.common import reopen_consoles

        reopen_consoles()
        connection.sendall(f"pid {os.getpid()}\n".encode())
    except BaseException:  # noqa: BLE001 - nothing has run: the caller sees no pid and runs it itself
        os._exit(1)
    threading.Thread(target=_stop_when_caller_leaves, args=(connection,), daemon=True).start()
    try:
        code = _run(request["argv"])
    finally:
        import atexit

        atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        try:
            connection.sendall(f"exit {code}\n".encode())
        except OSError:
            pass
        os._exit(code)


def _receive(connection: socket.socket) -> dict[str, Any]:
    header, fds, _flags, _address = socket.recv_fds(connection, HEADER.size, STDIO)
    if len(header) != HEADER.size or len(fds) != STDIO:
        raise OSError("incomplete request")
    (length,) = HEADER.unpack(header)
    payload = b""
    while len(payload) < length:
        chunk = connection.recv(min(65536, length - len(payload)))
        if not chunk:
            raise OSError("incomplete request")
        payload += chunk
    request: dict[str, Any] = json.loads(payload)
    # Still the warm process's log (the caller's descriptors are not in place yet): who ran what.
    print(f"pid {os.getpid()}: patchdrill {' '.join(request['argv'])} (in {request['cwd']})", flush=True)
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    return request


def _stop_when_caller_leaves(connection: socket.socket) -> None:
    """The caller waits on the socket until the end; if it closes first, it was killed: stop
    cleanly, as on SIGTERM."""
    try:
        while connection.recv(4096):
            pass
    except OSError:
        pass
    os.kill(os.getpid(), signal.SIGTERM)


def _run(argv: list[str]) -> int:
    from cli.app import main

    sys.argv = ["patchdrill", *argv]
    try:
        main()
    except KeyboardInterrupt:
        return 130
    except SystemExit as done:
        if done.code is None:
            return 0
        if isinstance(done.code, int):
            return done.code
        print(done.code, file=sys.stderr)
        return 1
    return 0


def _main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key", required=True)
    parser.add_argument("--server-state", type=Path, required=True)
    args = parser.parse_args()
    serve(args.key, args.server_state)


if __name__ == "__main__":
    _main()
