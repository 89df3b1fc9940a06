"""The drill ledger: everything a drill creates, written to the store *before* it is created.

One blob per entry, `drills/<run-id>/ledger/<seq>-<kind>.json`, put without overwrite: two
writers never read-modify-write a shared document, and a writer that loses a race for a
sequence number takes the next one. A controller that dies mid-drill leaves a ledger that names
every namespace, process, unit, file tree, service or VM it may have made, so
`cleanup_run` (tasks/drill/cleanup.py) can remove exactly those later, from the store alone.

Entries are typed and validated on the way in and on the way out: a ledger entry edited into
something hostile (a namespace name with shell in it, a path outside its copy root) is refused
by name, never acted on. Entries hold names, paths, ports and pids only, never a secret: a
command that contains a known secret value is refused before it is recorded.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import PurePosixPath, PureWindowsPath
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from configs.secrets import redact
from connectors.stores.base import BlobExists, BlobStore, StoreError

#: What a run id may look like: it becomes one segment of a store key (Prefect ids are UUIDs).
RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,79}$")
_HOST = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
#: `ip netns` names this module and isolation.py accept: short, no shell, no path.
NETNS_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,30}$")
_SYSTEMD_UNIT = re.compile(r"^[A-Za-z0-9:_.\\@-]{1,200}\.service$")
#: Service, VM and domain names are quoted wherever they are used (a SQL Server instance's
#: service is called MSSQL$NAME): only control characters are refused.
_OBJECT_NAME = re.compile(r"^[^\x00-\x1f\x7f]{1,256}$")
#: Directories a copy root may never be, whatever a ledger says: removing one would wreck the host.
PROTECTED_ROOTS = frozenset({
    "/", "/bin", "/boot", "/dev", "/etc", "/home", "/lib", "/lib32", "/lib64", "/media", "/mnt", "/opt",
    "/proc", "/root", "/run", "/sbin", "/srv", "/sys", "/tmp", "/usr", "/var", "/var/lib", "/var/tmp",
    "/usr/local", "/usr/lib", "/var/log",
})
_PROTECTED_WINDOWS = ("windows", "program files", "program files (x86)", "programdata", "users")


class LedgerError(Exception):
    """The ledger cannot be read or written; names the store, run and entry."""


def _netns(value: str) -> str:
    if not NETNS_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is not a namespace name this tool makes (lowercase letters, digits, '-')")
    return value


def _unit(value: str) -> str:
    if not _SYSTEMD_UNIT.fullmatch(value):
        raise ValueError(f"{value!r} is not a systemd service unit name")
    return value


def _object_name(value: str) -> str:
    if not _OBJECT_NAME.fullmatch(value):
        raise ValueError(f"{value!r} is empty, too long or holds control characters")
    return value


def _no_secret(value: str) -> str:
    if redact(value) != value:
        raise ValueError("holds a secret value: the ledger is stored in plain text")
    return value


def path_problem(path: str, os_family: str) -> str | None:
    """Why `path` cannot be a copy root or a path under one, or None if it can."""
    windows = os_family == "windows"
    pure = PureWindowsPath(path) if windows else PurePosixPath(path)
    if not pure.is_absolute():
        return "not an absolute path"
    if "\x00" in path or any(part in ("..", ".") for part in path.replace("\\", "/").split("/")):
        return "has '.' or '..' segments"
    if not windows and (path != str(pure) or "//" in path):
        return "is not in normal form"
    parts = [part.lower() for part in pure.parts[1:]]
    if len(parts) < 2:
        return "is too close to the file system root to be a drill's copy"
    if not windows and str(pure) in PROTECTED_ROOTS:
        return "is a system directory"
    if windows and parts[0] in _PROTECTED_WINDOWS and len(parts) < 3:
        return "is a system directory"
    return None


def is_under(path: str, root: str, os_family: str) -> bool:
    """Whether `path` is `root` or lies below it (lexically; the host script checks links)."""
    kind = PureWindowsPath if os_family == "windows" else PurePosixPath
    return kind(path) == kind(root) or kind(root) in kind(path).parents


NetnsName = Annotated[str, AfterValidator(_netns)]
UnitName = Annotated[str, AfterValidator(_unit)]
ObjectName = Annotated[str, AfterValidator(_object_name)]
Command = Annotated[str, Field(min_length=1, max_length=4000), AfterValidator(_no_secret)]


class _Entry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    seq: int = Field(ge=0)
    host: str = Field(pattern=_HOST, description="The target host, as the inventory names it.")
    member: str | None = Field(default=None, max_length=200)
    recorded_at: datetime
    refines: int | None = Field(default=None, ge=0, description="The seq of the entry this one completes.")

    @property
    def identifier(self) -> str:
        raise NotImplementedError


class _Rooted(_Entry):
    """An entry about something under a copy root (checked on the target against its marker)."""

    os_family: Literal["linux", "windows"] = "linux"
    copy_root: str

    @model_validator(mode="after")
    def _root_is_safe(self) -> "_Rooted":
        problem = path_problem(self.copy_root, self.os_family)
        if problem:
            raise ValueError(f"copy root {self.copy_root!r} {problem}")
        return self


class NamespaceEntry(_Entry):
    kind: Literal["namespace"] = "namespace"
    name: NetnsName

    @property
    def identifier(self) -> str:
        return self.name


class CopyRootEntry(_Rooted):
    """The directory a member's copy is restored into; cleanup removes it whole."""

    kind: Literal["copy-root"] = "copy-root"

    @property
    def identifier(self) -> str:
        return self.copy_root


class PathEntry(_Rooted):
    """One restored file or directory (a disk image, say) under a recorded copy root."""

    kind: Literal["path"] = "path"
    path: str

    @model_validator(mode="after")
    def _path_is_under_root(self) -> "PathEntry":
        problem = path_problem(self.path, self.os_family)
        if problem:
            raise ValueError(f"path {self.path!r} {problem}")
        if not is_under(self.path, self.copy_root, self.os_family):
            raise ValueError(f"path {self.path!r} is not under its copy root {self.copy_root!r}")
        return self

    @property
    def identifier(self) -> str:
        return self.path


class ProcessEntry(_Rooted):
    """A plain process started detached; first recorded with its pidfile, then (refines=…)
    with the pid and start time the target reported."""

    kind: Literal["process"] = "process"
    pidfile: str
    namespace: NetnsName | None = None
    port: int | None = Field(default=None, ge=1, le=65535)
    pid: int | None = Field(default=None, ge=2)
    start_time: int | None = Field(default=None, ge=0)
    boot_id: str | None = Field(default=None, pattern=r"^[0-9a-f-]{8,64}$")

    @model_validator(mode="after")
    def _pidfile_is_under_root(self) -> "ProcessEntry":
        if path_problem(self.pidfile, self.os_family) or not is_under(self.pidfile, self.copy_root, self.os_family) \
                or self.pidfile == self.copy_root:
            raise ValueError(f"pidfile {self.pidfile!r} is not a file under its copy root {self.copy_root!r}")
        return self

    @property
    def identifier(self) -> str:
        return f"pid {self.pid}" if self.pid else self.pidfile


class UnitEntry(_Entry):
    """A transient systemd unit (systemd-run) that runs a copy."""

    kind: Literal["unit"] = "unit"
    unit: UnitName
    namespace: NetnsName | None = None
    port: int | None = Field(default=None, ge=1, le=65535)

    @property
    def identifier(self) -> str:
        return self.unit


class ServiceEntry(_Entry):
    """A Windows service a drill started."""

    kind: Literal["service"] = "service"
    service: ObjectName

    @property
    def identifier(self) -> str:
        return self.service


class VmEntry(_Entry):
    """A Hyper-V VM a drill started."""

    kind: Literal["hyperv-vm"] = "hyperv-vm"
    vm: ObjectName

    @property
    def identifier(self) -> str:
        return self.vm


class DomainEntry(_Entry):
    """A libvirt domain a drill started."""

    kind: Literal["libvirt-domain"] = "libvirt-domain"
    domain: ObjectName

    @property
    def identifier(self) -> str:
        return self.domain


class CommandEntry(_Entry):
    """A copy started by a free command: stopped by its stop command, proven stopped by its
    verify command (exit 0 = stopped) and, when it has one, by its port."""

    kind: Literal["command"] = "command"
    shell: Literal["sh", "powershell"] = "sh"
    stop: Command
    verify: Command | None = None
    namespace: NetnsName | None = None
    port: int | None = Field(default=None, ge=1, le=65535)

    @property
    def identifier(self) -> str:
        return f"port {self.port}" if self.port else self.stop[:60]


class ClosedEntry(_Entry):
    """Written last, when cleanup verified every entry before it."""

    kind: Literal["closed"] = "closed"
    items: int = Field(ge=0)

    @property
    def identifier(self) -> str:
        return f"{self.items} items verified"


LedgerEntry = Annotated[
    Union[NamespaceEntry, CopyRootEntry, PathEntry, ProcessEntry, UnitEntry, ServiceEntry, VmEntry, DomainEntry,
          CommandEntry, ClosedEntry],
    Field(discriminator="kind"),
]
_ENTRY: TypeAdapter[LedgerEntry] = TypeAdapter(LedgerEntry)
Resource = Union[NamespaceEntry, CopyRootEntry, PathEntry, ProcessEntry, UnitEntry, ServiceEntry, VmEntry,
                 DomainEntry, CommandEntry]


class InvalidEntry(BaseModel):
    """A blob in the ledger that is not a valid entry: reported and refused, never acted on."""

    model_config = ConfigDict(frozen=True)

    key: str
    seq: int
    problem: str


def check_run_id(run_id: str) -> str:
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise LedgerError(f"invalid drill run id {run_id!r}: letters, digits, '.', '_' and '-' only")
    return run_id


#: every drill run's ledger lives under LEDGERS_PREFIX<run-id>/ledger/
LEDGERS_PREFIX = "drills/"


def ledger_prefix(run_id: str) -> str:
    return f"{LEDGERS_PREFIX}{check_run_id(run_id)}/ledger/"


def _seq_of(key: str) -> int | None:
    name = key.rsplit("/", 1)[-1]
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else None


def _problem(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first["loc"] if not isinstance(part, int)) or "entry"
    return f"{where}: {first['msg']}"


class Ledger:
    """The append-only ledger of one drill run in a store."""

    def __init__(self, store: BlobStore, run_id: str) -> None:
        self.store = store
        self.run_id = check_run_id(run_id)
        self.prefix = ledger_prefix(run_id)
        self._next: int | None = None
        # Threads of one run (members of a group, a namespace made beside a restore) record at
        # once: two entries of different kinds under one number would not collide in the store
        # (the key holds the kind), and one would be lost when the ledger is read by number.
        self._lock = threading.Lock()

    def record(self, kind: str, **fields: Any) -> Resource | ClosedEntry:
        """Validate and append one entry; returns it with its sequence number and time.

        Call it before creating the thing it names: the ledger must know of anything that may
        exist. A ValueError names the field at fault (nothing is written then).
        """
        with self._lock:
            return self._append(kind, fields)

    def _append(self, kind: str, fields: dict[str, Any]) -> Resource | ClosedEntry:
        seq = self._next if self._next is not None else self._last_seq() + 1
        while True:
            data = {**fields, "kind": kind, "seq": seq, "recorded_at": datetime.now(timezone.utc)}
            try:
                entry = _ENTRY.validate_python(data)
            except ValidationError as exc:
                raise ValueError(f"drill {self.run_id}: {kind} entry for host {fields.get('host')!r} refused: "
                                 f"{_problem(exc)}") from None
            key = f"{self.prefix}{seq:06d}-{kind}.json"
            try:
                self.store.put(key, entry.model_dump_json().encode("utf-8"), overwrite=False)
            except BlobExists:
                # Another writer took this number first: the next free one is ours.
                seq += 1
                continue
            except StoreError as exc:
                raise LedgerError(f"drill {self.run_id}: cannot record {kind} in {self.store.name}: {exc}") from exc
            self._next = seq + 1
            return entry

    def _last_seq(self) -> int:
        seqs = [seq for info in self._list() if (seq := _seq_of(info)) is not None]
        return max(seqs, default=-1)

    def _list(self) -> list[str]:
        try:
            return [info.key for info in self.store.list(self.prefix)]
        except StoreError as exc:
            raise LedgerError(f"drill {self.run_id}: cannot list the ledger in {self.store.name}: {exc}") from exc

    def read(self) -> list[Resource | ClosedEntry | InvalidEntry]:
        """Every entry in sequence order; a blob that is not a valid entry comes back as an
        InvalidEntry, so cleanup can refuse it by name instead of failing on it or skipping it."""
        found: list[Resource | ClosedEntry | InvalidEntry] = []
        for key in self._list():
            seq = _seq_of(key)
            if seq is None:
                found.append(InvalidEntry(key=key, seq=-1, problem="not a ledger entry name"))
                continue
            try:
                raw = json.loads(self.store.get(key))
                entry = _ENTRY.validate_python(raw)
            except StoreError as exc:
                raise LedgerError(f"drill {self.run_id}: cannot read {key} in {self.store.name}: {exc}") from exc
            except ValidationError as exc:
                found.append(InvalidEntry(key=key, seq=seq, problem=_problem(exc)))
                continue
            except ValueError as exc:
                found.append(InvalidEntry(key=key, seq=seq, problem=f"not JSON: {exc}"))
                continue
            if entry.seq != seq:
                found.append(InvalidEntry(key=key, seq=seq, problem=f"names seq {entry.seq}, its key says {seq}"))
                continue
            found.append(entry)
        return sorted(found, key=lambda entry: entry.seq)

    def close(self, items: int) -> ClosedEntry:
        """Mark the ledger closed: cleanup verified every entry before this one."""
        entry = self.record("closed", host="controller", items=items)
        assert isinstance(entry, ClosedEntry)
        return entry

    def is_closed(self) -> bool:
        entries = self.read()
        return bool(entries) and isinstance(entries[-1], ClosedEntry)


def resources(entries: Sequence[Resource | ClosedEntry | InvalidEntry]) -> Iterator[Resource]:
    """The entries that name something a drill created, each merged with the entries refining it."""
    by_seq: dict[int, Resource] = {}
    for entry in entries:
        if isinstance(entry, (ClosedEntry, InvalidEntry)):
            continue
        base = by_seq.get(entry.refines) if entry.refines is not None else None
        if isinstance(base, ProcessEntry) and isinstance(entry, ProcessEntry) and _same_process(base, entry):
            # A refinement adds what the target reported after the start, and nothing else.
            by_seq[base.seq] = base.model_copy(update={"pid": entry.pid, "start_time": entry.start_time,
                                                       "boot_id": entry.boot_id})
            continue
        by_seq[entry.seq] = entry
    yield from (by_seq[seq] for seq in sorted(by_seq))


def _same_process(base: ProcessEntry, refinement: ProcessEntry) -> bool:
    return (base.host, base.copy_root, base.pidfile, base.namespace, base.port) == (
        refinement.host, refinement.copy_root, refinement.pidfile, refinement.namespace, refinement.port)


__all__ = [
    "ClosedEntry", "CommandEntry", "CopyRootEntry", "DomainEntry", "InvalidEntry", "Ledger", "LedgerEntry",
    "LedgerError", "NamespaceEntry", "PathEntry", "ProcessEntry", "Resource", "ServiceEntry", "UnitEntry",
    "VmEntry", "check_run_id", "is_under", "ledger_prefix", "path_problem",
]
