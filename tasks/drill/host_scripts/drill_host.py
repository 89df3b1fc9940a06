"""What a drill does to processes, ports and files on a Linux DR target, and how it proves it.

Runs on the target with nothing but the Python 3 standard library (fed to `python3 -` by the
connector, so nothing is left behind; `ip netns exec NS python3 - …` to act inside a network
namespace). Every subcommand prints one JSON object on stdout.

    start PIDFILE LOGFILE CWD COMMAND
        start COMMAND (`sh -c 'exec COMMAND'`) detached: its own session, stdin /dev/null,
        stdout and stderr to LOGFILE; write "PID START_TIME BOOT_ID" to PIDFILE.
        -> {"pid", "start_time", "boot_id"}
    identity PID
        -> {"pid", "alive", "start_time", "state", "boot_id"} (start_time: clock ticks since boot,
        field 22 of /proc/PID/stat: with the boot id, what makes a pid one process and not a
        later one that reused the number)
    pidfile PIDFILE
        -> {"found": bool, "pid", "start_time", "boot_id"}
    stop GRACE PID:START_TIME...
        SIGTERM each process (and its process group, when it leads one) that is still the
        recorded one, SIGKILL what is left after GRACE seconds, wait for it to go.
        -> {"processes": [{"pid", "was": "running|gone|reused", "signals": [...], "alive_after"}]}
    connect TIMEOUT HOST:PORT...
        -> {"results": [{"address", "port", "connected", "errno", "error", "seconds"}]}
    wait TIMEOUT HOST:PORT
        try to connect every 0.1 s until it works or TIMEOUT seconds passed.
        -> {"connected": bool, "errno", "seconds"}
    remove ROOT MARKER_TEXT PATH
        remove PATH (a file, link or whole tree, never following links out of it). PATH must
        lie under ROOT, and ROOT must hold the marker file whose text is MARKER_TEXT.
        -> {"existed": bool, "removed": bool, "error": str|null}
    exists PATH
        -> {"exists": bool, "kind": "file|directory|link|other|null"}
"""

from __future__ import annotations

import errno as errno_names
import json
import os
import shutil
import signal
import socket
import stat
import sys
import time

MARKER = ".patchdrill-drill"


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as handle:
        return handle.read().strip()


def identity(pid: int) -> dict:
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except (FileNotFoundError, ProcessLookupError):
        return {"pid": pid, "alive": False, "start_time": None, "state": None, "boot_id": boot_id()}
    # The command name may hold spaces and parentheses: the fields follow the last ")".
    fields = text.rsplit(")", 1)[1].split()
    state = fields[0]
    # A zombie has exited: it holds no port, no file, and only waits for its parent.
    return {"pid": pid, "alive": state not in ("Z", "X"), "start_time": int(fields[19]), "state": state,
            "boot_id": boot_id()}


def start(pidfile: str, logfile: str, cwd: str, command: str) -> dict:
    os.makedirs(os.path.dirname(pidfile), exist_ok=True)
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.setsid()
            os.chdir(cwd)
            null = os.open(os.devnull, os.O_RDONLY)
            log = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            os.dup2(null, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.set_inheritable(write_end, False)
            # exec keeps the pid: the pidfile names the application itself, not a shell.
            os.execvp("sh", ["sh", "-c", "exec " + command])
        except BaseException as exc:  # noqa: BLE001 - the parent reports it
            os.write(write_end, f"{type(exc).__name__}: {exc}".encode())
        os._exit(127)
    os.close(write_end)
    failure = os.read(read_end, 4096).decode(errors="replace")
    os.close(read_end)
    if failure:
        os.waitpid(pid, 0)
        fail(f"cannot start the command: {failure}")
    started = identity(pid)
    with open(pidfile + ".tmp", "w", encoding="ascii") as handle:
        handle.write(f"{pid} {started['start_time']} {started['boot_id']}\n")
    os.replace(pidfile + ".tmp", pidfile)
    return {"pid": pid, "start_time": started["start_time"], "boot_id": started["boot_id"]}


def read_pidfile(path: str) -> dict:
    try:
        with open(path, encoding="ascii") as handle:
            pid, start_time, recorded_boot = handle.read().split()
        return {"found": True, "pid": int(pid), "start_time": int(start_time), "boot_id": recorded_boot}
    except (OSError, ValueError):
        return {"found": False, "pid": None, "start_time": None, "boot_id": None}


def _still_ours(pid: int, start_time: int) -> bool:
    now = identity(pid)
    return now["alive"] and now["start_time"] == start_time


def _signal(pid: int, sig: int) -> None:
    try:
        # A detached copy leads its own session and group: its children go with it.
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def stop(grace: float, targets: list[tuple[int, int]]) -> dict:
    report = []
    for pid, start_time in targets:
        now = identity(pid)
        if not now["alive"]:
            was = "gone"
        elif now["start_time"] != start_time:
            was = "reused"
        else:
            was = "running"
        report.append({"pid": pid, "start_time": start_time, "was": was, "signals": []})
    running = [entry for entry in report if entry["was"] == "running"]
    for entry in running:
        _signal(entry["pid"], signal.SIGTERM)
        entry["signals"].append("TERM")
    deadline = time.monotonic() + grace
    while any(_still_ours(e["pid"], e["start_time"]) for e in running) and time.monotonic() < deadline:
        time.sleep(0.05)
    for entry in running:
        if _still_ours(entry["pid"], entry["start_time"]):
            _signal(entry["pid"], signal.SIGKILL)
            entry["signals"].append("KILL")
    deadline = time.monotonic() + 5.0
    while any(_still_ours(e["pid"], e["start_time"]) for e in running) and time.monotonic() < deadline:
        time.sleep(0.05)
    for entry in report:
        entry["alive_after"] = _still_ours(entry["pid"], entry["start_time"])
    return {"processes": report}


def connect(timeout: float, endpoints: list[str]) -> dict:
    results = []
    for endpoint in endpoints:
        address, _, port = endpoint.rpartition(":")
        address = address.strip("[]")
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        started = time.monotonic()
        result = {"address": address, "port": int(port), "connected": False, "errno": None, "error": None}
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect((address, int(port)))
                result["connected"] = True
            except socket.timeout:
                result["errno"], result["error"] = "ETIMEDOUT", f"no answer within {timeout:g}s"
            except OSError as exc:
                result["errno"] = errno_names.errorcode.get(exc.errno or 0, str(exc.errno))
                result["error"] = exc.strerror or str(exc)
        result["seconds"] = round(time.monotonic() - started, 4)
        results.append(result)
    return {"results": results}


def wait(timeout: float, endpoint: str) -> dict:
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    while True:
        result = connect(min(1.0, timeout), [endpoint])["results"][0]
        if result["connected"] or time.monotonic() >= deadline:
            return {"connected": result["connected"], "errno": result["errno"],
                    "seconds": round(time.monotonic() - started, 4)}
        time.sleep(0.1)


def _kind(path: str) -> str | None:
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISLNK(mode):
        return "link"
    if stat.S_ISDIR(mode):
        return "directory"
    return "file" if stat.S_ISREG(mode) else "other"


def remove(root: str, marker_text: str, path: str) -> dict:
    real_root = os.path.realpath(root)
    parent = os.path.realpath(os.path.dirname(path.rstrip("/")) or "/")
    target = os.path.join(parent, os.path.basename(path.rstrip("/")))
    inside = target == real_root or target.startswith(real_root.rstrip("/") + "/")
    if not inside:
        fail(f"refusing to remove {path}: it resolves to {target}, outside the copy root {real_root}")
    kind = _kind(target)
    if kind is None:
        return {"existed": False, "removed": False, "error": None}
    try:
        with open(os.path.join(real_root, MARKER), encoding="utf-8") as handle:
            claimed = handle.read().strip()
    except OSError:
        claimed = None
    if claimed != marker_text:
        fail(f"refusing to remove {path}: {real_root} holds no drill marker of this run "
             f"({MARKER} {'missing' if claimed is None else 'names another run'})")
    try:
        if kind == "directory":
            # rmtree never follows a link out of the tree (it unlinks the link itself).
            shutil.rmtree(target)
        else:
            os.unlink(target)
    except OSError as exc:
        return {"existed": True, "removed": False, "error": f"{exc.strerror or exc} ({exc.filename or target})"}
    return {"existed": True, "removed": True, "error": None}


def fail(message: str) -> None:
    print(message, file=sys.stderr)
    sys.exit(2)


def main(argv: list[str]) -> dict:
    command, args = argv[0], argv[1:]
    if command == "start":
        return start(*args)
    if command == "identity":
        return identity(int(args[0]))
    if command == "pidfile":
        return read_pidfile(args[0])
    if command == "stop":
        targets = [tuple(int(part) for part in arg.split(":")) for arg in args[1:]]
        return stop(float(args[0]), targets)  # type: ignore[arg-type]
    if command == "connect":
        return connect(float(args[0]), args[1:])
    if command == "wait":
        return wait(float(args[0]), args[1])
    if command == "remove":
        return remove(*args)
    if command == "exists":
        return {"exists": _kind(args[0]) is not None, "kind": _kind(args[0])}
    fail(f"unknown subcommand {command!r}")
    return {}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
