"""Who holds a repository lock, and whether that holder is still alive.

A lock records the host, the pid and the identity of the process: the kernel's boot id, its pid
namespace and the process's start time. A reader in the same boot and pid namespace (the same
machine, the same process table) recognises a dead holder at once, and a pid the kernel has
since given to another process is not mistaken for the holder. Every other lock (another
machine, another container, the same name after a reboot) cannot be checked that way: it
expires when its heartbeat (`refreshed`, rewritten by the holder) grows older than the stale
limit. docs/repository.md, *Locks*, is the specification.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any


def this_host() -> str:
    return socket.gethostname()


def _boot_id() -> str | None:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def _process_table() -> str | None:
    """`<boot id>/<pid namespace>`: where a pid means one process (None where /proc cannot tell)."""
    boot = _boot_id()
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return f"{boot}/{namespace}" if boot else None


def process_identity(pid: int) -> str | None:
    """`<boot id>/<pid namespace>/<start time in clock ticks>` of a live process in this process
    table, or None when it is gone (a zombie counts as gone: it will never release its lock) or
    /proc cannot tell (not Linux)."""
    table = _process_table()
    if table is None:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces; split after it.
    fields = stat.rsplit(")", 1)[1].split()
    state, start_ticks = fields[0], fields[19]
    if state in ("Z", "X"):
        return None
    return f"{table}/{start_ticks}"


def lock_body(kind: str, created: datetime, refreshed: datetime) -> dict[str, Any]:
    pid = os.getpid()
    return {"kind": kind, "host": this_host(), "pid": pid, "process": process_identity(pid),
            "created": created.isoformat(), "refreshed": refreshed.isoformat()}


def _age(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


@dataclass(frozen=True)
class LockState:
    key: str
    kind: str
    stale: bool
    #: one sentence on who holds it and why it is (or is not) considered alive
    why: str


def judge(key: str, body: dict[str, Any], *, now: datetime, stale_after: timedelta) -> LockState:
    """Is the lock at key still held? Same host: by its process; other hosts: by its heartbeat."""
    kind = str(body.get("kind", "?"))
    host, pid, identity = body.get("host"), body.get("pid"), body.get("process")
    holder = f"a {kind} lock ({key}) of pid {pid} on host {host}"
    try:
        refreshed = datetime.fromisoformat(str(body.get("refreshed")))
    except ValueError:
        refreshed = datetime(1970, 1, 1, tzinfo=timezone.utc)
    age = now - refreshed
    table = _process_table()
    if isinstance(pid, int) and isinstance(identity, str) and table and identity.rsplit("/", 1)[0] == table:
        current = process_identity(pid)
        if current is None:
            return LockState(key, kind, True, f"{holder}: the process is dead")
        if current != identity:
            return LockState(key, kind, True, f"{holder}: the pid now belongs to another process (the holder is dead)")
        return LockState(key, kind, False, f"{holder}: the process is running (held since {body.get('created')})")
    if age > stale_after:
        return LockState(key, kind, True, f"{holder}: last refreshed {_age(age)} ago (stale after {_age(stale_after)})")
    return LockState(key, kind, False, f"{holder}: refreshed {_age(age)} ago (stale after {_age(stale_after)} "
                                        "without a refresh; `patchdrill unlock --all` if that host is gone)")
