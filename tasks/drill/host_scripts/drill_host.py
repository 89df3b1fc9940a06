"""What a drill does to processes, ports and files on a Linux DR target, and how it proves it.

Runs on the target with nothing but the Python 3 standard library (fed to `python3 -` by the
connector, so nothing is left behind; `ip netns exec NS python3 - …` to act inside a network
namespace). Every subcommand prints one JSON object on stdout.

    start PIDFILE LOGFILE CWD COMMAND [ENDPOINT TIMEOUT]
        start COMMAND (`sh -c 'exec COMMAND'`) detached: its own session, stdin /dev/null,
        stdout and stderr to LOGFILE; write "PID START_TIME BOOT_ID" to PIDFILE. With ENDPOINT
        (ADDRESS:PORT), then wait as `wait` does, ending early if COMMAND exits.
        -> {"pid", "start_time", "boot_id"[, "wait": {"connected", "errno", "exited", "seconds"}]}
    stop GRACE JSON
        JSON: {"pidfile", "root", "marker", "processes": [{"pid", "start_time", "boot_id"}]};
        with no process given, the pidfile's. A running process is signalled only when the
        pidfile, under a ROOT marked with this run's MARKER text, names it (exit 3 otherwise).
        SIGTERM each process (and its process
        group, when it leads one) that is still the recorded one (same pid, start time and
        boot id: a reused pid is another process and is left alone), SIGKILL what is left
        after GRACE seconds, wait for it to go.
        -> {"processes": [{"pid", "start_time", "was": "running|gone|reused|rebooted", "signals", "alive_after"}],
            "pidfile": {"found", ...}}
    stop-pidfile GRACE PIDFILE
        a failover's application on one side: stop the process PIDFILE names (patchdrill's
        "PID START_TIME BOOT_ID", or a daemon's own "PID") while it is still that process, as
        stop does. The pidfile's path comes from the config, not from a ledger in the store.
        -> {"processes": [...] (empty when PIDFILE names no process), "pidfile": {"found", ...}}
    netns-remove NAME GRACE
        stop every process in namespace NAME (as stop does), then `ip netns del NAME`.
        -> {"existed": bool, "stopped": [...], "deleted": bool, "error": str|null}
    checks JSON
        run each check of a JSON list and answer {"results": [...]} in the same order. Checks:
        {"kind": "process", "pid", "start_time", "boot_id", "pidfile"} -> is the recorded
            process (or the pidfile's) still running: {"source", "pid", "state", "running", "why"}
        {"kind": "exists", "path"} -> {"exists", "kind"}
        {"kind": "netns", "name"} -> {"listed", "file", "count", "pids"}
        {"kind": "connect", "address", "port", "namespace"} -> as connect, plus
            "namespace_gone" when the namespace no longer exists
        {"kind": "boot"} -> {"boot_id"}
    connect TIMEOUT HOST:PORT...
        -> {"results": [{"address", "port", "connected", "errno", "error", "seconds"}]}
    inside TIMEOUT HOST:PORT...
        (run inside a namespace) its links and routes, then connect as above.
        -> {"links": [...], "routes": [...], "results": [...]}
    wait TIMEOUT HOST:PORT
        try to connect (every 10 ms at first, every 100 ms later) until it works or TIMEOUT
        seconds passed.
        -> {"connected": bool, "errno", "exited": null, "seconds"}
    remove ROOT MARKER_TEXT PATH
        remove PATH (a file, link or whole tree, never following links out of it). PATH must
        lie under ROOT, and ROOT must hold the marker file whose text is MARKER_TEXT.
        -> {"existed": bool, "removed": bool, "error": str|null}; exit status 3 when refused

Exit status 2 with a one-line message on stderr when a subcommand fails.
"""

from __future__ import annotations

import errno as errno_names
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
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


def start(pidfile: str, logfile: str, cwd: str, command: str, endpoint: str = "", timeout: str = "0") -> dict:
    """Start command detached, its pidfile written; with an endpoint, then wait (up to timeout
    seconds) until it accepts connections there or exits, in the same call: one interpreter
    start less on the way to the first probe."""
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
    answer = {"pid": pid, "start_time": started["start_time"], "boot_id": started["boot_id"]}
    if endpoint:
        answer["wait"] = wait(float(timeout), endpoint, child=pid)
    return answer


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


def _state_of(pid: int, start_time: int, recorded_boot: str | None) -> str:
    now = identity(pid)
    if recorded_boot and recorded_boot != now["boot_id"]:
        return "rebooted"
    if not now["alive"]:
        return "gone"
    return "running" if now["start_time"] == start_time else "reused"


def stop_processes(grace: float, targets: list[dict]) -> list[dict]:
    report = [{"pid": t["pid"], "start_time": t["start_time"], "was": _state_of(t["pid"], t["start_time"], t.get("boot_id")),
               "signals": []} for t in targets]
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
    return report


def _marked(root: str, marker_text: str) -> bool:
    try:
        with open(os.path.join(root, MARKER), encoding="utf-8") as handle:
            return handle.read().strip() == marker_text
    except OSError:
        return False


def stop(grace: float, request: dict) -> dict:
    """Stop the process a drill started: the one its pidfile names, under a copy root that
    carries this run's marker. A pid the ledger recorded is signalled only when that pidfile
    agrees (same pid and start time): a ledger alone cannot get any other process killed."""
    found = read_pidfile(request["pidfile"]) if _marked(request["root"], request["marker"]) else {"found": False}
    targets = list(request.get("processes", []))
    if not targets and found["found"]:
        targets.append({"pid": found["pid"], "start_time": found["start_time"], "boot_id": found["boot_id"]})
    for target in targets:
        state = _state_of(target["pid"], target["start_time"], target.get("boot_id"))
        corroborated = found["found"] and (found["pid"], found["start_time"]) == (target["pid"], target["start_time"])
        if state == "running" and not corroborated:
            refuse(f"refusing to signal pid {target['pid']}: it is running, but no pidfile of this run's copy "
                   f"({request['pidfile']}) names it")
    return {"processes": stop_processes(grace, targets), "pidfile": found}


def stop_pidfile(grace: float, pidfile: str) -> dict:
    found = read_pidfile(pidfile)
    if not found["found"]:
        try:
            with open(pidfile, encoding="ascii") as handle:
                pid = int(handle.read().strip())
        except (OSError, ValueError):
            return {"processes": [], "pidfile": found}
        # A daemon's own pidfile records no start time: the process holding the pid now is it.
        found = {"found": True, "pid": pid, "start_time": identity(pid)["start_time"], "boot_id": None}
    return {"processes": stop_processes(grace, [found]), "pidfile": found}


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


def netns_names() -> list[str]:
    return [line.split()[0] for line in _ip("netns", "list").stdout.splitlines() if line.strip()]


def netns_pids(name: str) -> list[int]:
    return sorted({int(token) for token in _ip("netns", "pids", name).stdout.split() if token.isdigit()})


def netns_remove(name: str, grace: float) -> dict:
    if name not in netns_names() and not os.path.exists(f"/run/netns/{name}"):
        return {"existed": False, "stopped": [], "deleted": False, "error": None}
    targets = []
    for pid in netns_pids(name):
        now = identity(pid)
        if now["alive"]:
            targets.append({"pid": pid, "start_time": now["start_time"], "boot_id": now["boot_id"]})
    stopped = stop_processes(grace, targets)
    deleted = _ip("netns", "del", name)
    error = (deleted.stderr.strip() or f"exit {deleted.returncode}") if deleted.returncode else None
    return {"existed": True, "stopped": stopped, "deleted": deleted.returncode == 0, "error": error}


def process_check(check: dict) -> dict:
    pid, start_time, recorded_boot, source = check.get("pid"), check.get("start_time"), check.get("boot_id"), "ledger"
    if pid is None and check.get("pidfile"):
        found = read_pidfile(check["pidfile"])
        if found["found"]:
            pid, start_time, recorded_boot, source = found["pid"], found["start_time"], found["boot_id"], "pidfile"
    if pid is None:
        return {"source": "none", "pid": None, "state": None, "running": False, "why": "no pid recorded, no pidfile"}
    now = identity(pid)
    state = _state_of(pid, start_time, recorded_boot)
    why = {"rebooted": "the host rebooted since it started (boot id changed)",
           "gone": "a zombie: exited" if now["state"] == "Z" else "no such process",
           "reused": f"now another process (start time {now['start_time']}, ours {start_time}): ours is gone",
           "running": f"still running (start time {start_time}), state {now['state']}"}[state]
    return {"source": source, "pid": pid, "state": now["state"], "running": state == "running", "why": why}


_CONNECT_INSIDE = (
    "import json, socket, sys\n"
    "s = socket.socket(socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET)\n"
    "s.settimeout(float(sys.argv[3]))\n"
    "try:\n    s.connect((sys.argv[1], int(sys.argv[2]))); r = [True, None]\n"
    "except socket.timeout:\n    r = [False, 'ETIMEDOUT']\n"
    "except OSError as e:\n    import errno; r = [False, errno.errorcode.get(e.errno, str(e.errno))]\n"
    "print(json.dumps(r))\n"
)


def connect_check(check: dict) -> dict:
    namespace, address, port = check.get("namespace"), check["address"], int(check["port"])
    result = {"address": address, "port": port, "connected": False, "errno": None, "namespace_gone": False}
    if namespace is None:
        return {**result, **connect(check.get("timeout", 3.0), [f"[{address}]:{port}"])["results"][0]}
    if namespace not in netns_names():
        return {**result, "namespace_gone": True}
    done = subprocess.run(["ip", "netns", "exec", namespace, sys.executable, "-I", "-S", "-c", _CONNECT_INSIDE, address, str(port),
                           str(check.get("timeout", 3.0))], capture_output=True, text=True, check=False)
    try:
        result["connected"], result["errno"] = json.loads(done.stdout)
    except ValueError:
        result["errno"] = "ERROR"
        result["error"] = done.stderr.strip()[-300:]
    return result


def checks(items: list[dict]) -> dict:
    results = []
    for check in items:
        kind = check["kind"]
        if kind == "process":
            results.append(process_check(check))
        elif kind == "exists":
            results.append({"exists": _kind(check["path"]) is not None, "kind": _kind(check["path"])})
        elif kind == "netns":
            names = netns_names()
            listed = check["name"] in names
            results.append({"listed": listed, "file": os.path.exists(f"/run/netns/{check['name']}"),
                            "count": len(names), "pids": netns_pids(check["name"]) if listed else []})
        elif kind == "connect":
            results.append(connect_check(check))
        elif kind == "boot":
            results.append({"boot_id": boot_id()})
        else:
            fail(f"unknown check {kind!r}")
    return {"results": results}


def inside(timeout: float, endpoints: list[str]) -> dict:
    links = [line.split(":")[1].strip().split("@")[0] for line in _ip("-o", "link", "show").stdout.splitlines()
             if line.strip()]
    routes = [line.strip() for line in _ip("route", "show").stdout.splitlines() if line.strip()]
    return {"links": links, "routes": routes, **connect(timeout, endpoints)}


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


def wait(timeout: float, endpoint: str, child: int | None = None) -> dict:
    """Until endpoint accepts a connection or timeout passes; polled every 10 ms at first (an
    application's start is often shorter than a fixed 100 ms poll) and every 100 ms later.
    child: the started process, still this script's child: its exit ends the wait at once."""
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    interval = 0.01
    while True:
        result = connect(min(1.0, timeout), [endpoint])["results"][0]
        answer = {"connected": result["connected"], "errno": result["errno"], "exited": None}
        if child is not None and not result["connected"]:
            pid, status = os.waitpid(child, os.WNOHANG)
            if pid:
                answer["exited"] = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
        if result["connected"] or answer["exited"] is not None or time.monotonic() >= deadline:
            return {**answer, "seconds": round(time.monotonic() - started, 4)}
        time.sleep(interval)
        interval = min(interval * 1.5, 0.1)


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
        refuse(f"refusing to remove {path}: it resolves to {target}, outside the copy root {real_root}")
    kind = _kind(target)
    if kind is None:
        return {"existed": False, "removed": False, "error": None}
    if not _marked(real_root, marker_text):
        refuse(f"refusing to remove {path}: {real_root} holds no drill marker of this run ({MARKER})")
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


def refuse(message: str) -> None:
    """Exit 3: the request was refused for safety, nothing was touched."""
    print(message, file=sys.stderr)
    sys.exit(3)


def main(argv: list[str]) -> dict:
    command, args = argv[0], argv[1:]
    if command == "start":
        return start(*args)
    if command == "stop":
        return stop(float(args[0]), json.loads(args[1]))
    if command == "stop-pidfile":
        return stop_pidfile(float(args[0]), args[1])
    if command == "netns-remove":
        return netns_remove(args[0], float(args[1]))
    if command == "checks":
        return checks(json.loads(args[0]))
    if command == "inside":
        return inside(float(args[0]), args[1:])
    if command == "connect":
        return connect(float(args[0]), args[1:])
    if command == "wait":
        return wait(float(args[0]), args[1])
    if command == "remove":
        return remove(*args)
    fail(f"unknown subcommand {command!r}")
    return {}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])))
