"""Repository locks know their holder: a dead process on this host, a recycled pid, a silent other
host. Holders are real processes (a child killed with SIGKILL), on a real local store."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from datetime import timedelta
from pathlib import Path
from typing import Iterator

import pytest

from configs.policies import KeepRules
from connectors.stores import LocalBlobStore
from tasks.backup.engine import BackupRequest, backup
from tasks.backup.errors import RepositoryBusy
from tasks.backup.repo.locks import process_identity, this_host
from tasks.backup.repo.repository import Repository, utcnow
from tasks.backup.repo.retention import forget_and_prune, prune
from tasks.backup.sources.local import LocalBlockSource
from tests.unit.test_backup_engine import _STALLING_BACKUP

ROOT = Path(__file__).resolve().parents[2]
BLOCK = 64 * 1024

HOLDER = textwrap.dedent("""
    import sys, threading
    from connectors.stores import LocalBlobStore
    from tasks.backup.repo.repository import Repository
    repo = Repository.open(LocalBlobStore(sys.argv[1]))
    with repo.lock(sys.argv[2]):
        print("locked", file=sys.stderr, flush=True)
        threading.Event().wait()
""")


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.open(LocalBlobStore(tmp_path / "repo"), create=True)


@pytest.fixture
def holder(repo: Repository, request: pytest.FixtureRequest) -> Iterator[subprocess.Popen[str]]:
    """A separate process holding a lock (backup unless parametrized) until the test kills it."""
    kind = getattr(request, "param", "backup")
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(repo.store.root), kind], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stderr is not None and child.stderr.readline().strip() == "locked"
        yield child
    finally:
        child.kill()
        child.wait()


def _lock(repo: Repository, name: str, **body: object) -> None:
    now = utcnow().isoformat()
    repo.store.put(f"locks/{name}.json", json.dumps({"kind": "backup", "created": now, "refreshed": now} | body).encode())


def test_a_killed_holder_on_this_host_is_stale_at_once(repo: Repository, holder: subprocess.Popen[str]) -> None:
    with pytest.raises(RepositoryBusy, match=f"pid {holder.pid} on host {this_host()}: the process is running"):
        prune(repo)
    assert len(list(repo.store.list("locks/"))) == 1

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    # Well inside the 30-minute heartbeat limit: the pid alone says the holder is gone.
    report = prune(repo)
    assert len(report.stale_locks_removed) == 1
    assert f"pid {holder.pid} on host {this_host()}: the process is dead" in report.stale_locks_removed[0]
    assert list(repo.store.list("locks/")) == []


def test_a_recycled_pid_is_not_mistaken_for_the_holder(repo: Repository) -> None:
    # This process is alive, but it is not the process that wrote the lock (other start time).
    _lock(repo, "old", host=this_host(), pid=os.getpid(), process=f"{process_identity(os.getpid())}0")
    report = prune(repo)
    assert "the pid now belongs to another process" in report.stale_locks_removed[0]


def test_a_pid_from_another_boot_or_container_is_judged_by_its_heartbeat(repo: Repository) -> None:
    """Same host name, but another process table (a reboot since, or a container of the same
    name): its pid says nothing here, even if no such pid runs here now."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(gone.stdout)
    for other_table in ("00000000-0000-0000-0000-000000000000/pid:[4026531836]",
                        f"{Path('/proc/sys/kernel/random/boot_id').read_text().strip()}/pid:[1]"):
        _lock(repo, "twin", host=this_host(), pid=dead_pid, process=f"{other_table}/12345")
        with pytest.raises(RepositoryBusy, match=rf"pid {dead_pid} on host {this_host()}: refreshed \d+ s ago"):
            prune(repo)


def test_other_hosts_locks_expire_by_their_heartbeat(repo: Repository) -> None:
    _lock(repo, "fresh", host="db-7.example", pid=4242)
    with pytest.raises(RepositoryBusy, match=r"pid 4242 on host db-7.example: refreshed \d+ s ago \(stale after 30 min"):
        prune(repo)
    old = (utcnow() - timedelta(hours=2)).isoformat()
    _lock(repo, "fresh", host="db-7.example", pid=4242, refreshed=old)
    report = prune(repo)
    assert report.stale_locks_removed == [
        "a backup lock (locks/fresh.json) of pid 4242 on host db-7.example: last refreshed 2 h 0 min ago "
        "(stale after 30 min)"]


def test_prune_beside_a_running_backup_deletes_no_point(repo: Repository, tmp_path: Path,
                                                        holder: subprocess.Popen[str]) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(1).randbytes(2 * BLOCK))
    request = BackupRequest(host="h", disk="d", block_size=BLOCK, workers=1)
    # The holder shares with backups, so these run beside it.
    made = [backup(repo, LocalBlockSource(image), request).key for _ in range(3)]
    with pytest.raises(RepositoryBusy, match="process is running"):
        forget_and_prune(repo, KeepRules(last=1))
    assert repo.point_keys() == made


@pytest.mark.parametrize("holder", ["prune"], indirect=True)
def test_a_killed_prune_does_not_hold_up_backups(repo: Repository, tmp_path: Path,
                                                 holder: subprocess.Popen[str]) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(2).randbytes(BLOCK))
    request = BackupRequest(host="h", disk="d", block_size=BLOCK, workers=1, lock_wait=timedelta(0))
    with pytest.raises(RepositoryBusy, match="a prune lock .* the process is running"):
        backup(repo, LocalBlockSource(image), request)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert backup(repo, LocalBlockSource(image), request).totals.uploaded_chunks == 1


def test_a_held_lock_keeps_its_heartbeat(repo: Repository) -> None:
    with repo.lock("backup", refresh=timedelta(milliseconds=20)) as held:
        first = json.loads(repo.store.get(held.key))
        while json.loads(repo.store.get(held.key))["refreshed"] == first["refreshed"]:
            threading.Event().wait(0.01)
        body = json.loads(repo.store.get(held.key))
    assert body["created"] == first["created"] and body["process"] == process_identity(os.getpid())
    assert list(repo.store.list("locks/")) == []


def test_prune_right_after_a_backup_killed_mid_upload(tmp_path: Path) -> None:
    """The reported case: `kill -9` of a running backup used to block prune for 30 minutes."""
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(3).randbytes(16 * BLOCK))
    store = LocalBlobStore(tmp_path / "repo")
    proc = subprocess.Popen([sys.executable, "-c", _STALLING_BACKUP, str(store.root), str(image), "4"],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        while len(list(store.list("chunks/"))) < 4:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
            threading.Event().wait(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    [lock] = list(store.list("locks/"))

    report = prune(Repository.open(store))
    assert report.stale_locks_removed == [
        f"a backup lock ({lock.key}) of pid {proc.pid} on host {this_host()}: the process is dead"]
    assert report.chunks_deleted == 4 and list(store.list("locks/")) == []


_WAITING_BACKUP = textwrap.dedent("""
    import sys
    from datetime import timedelta
    from connectors.stores import LocalBlobStore
    from tasks.backup import cancel
    from tasks.backup.engine import BackupRequest, backup
    from tasks.backup.repo.repository import Repository
    from tasks.backup.sources.local import LocalBlockSource

    class Announcing(Repository):
        # Says on stderr when the backup first finds itself blocked, so the parent signals a waiter.
        def _conflicting_lock(self, held, kind, stale):
            blocker = super()._conflicting_lock(held, kind, stale)
            if blocker:
                print("waiting", file=sys.stderr, flush=True)
            return blocker

    repo = Announcing.open(LocalBlobStore(sys.argv[1]))
    request = BackupRequest(host="h", disk="d", block_size=65536, workers=1, lock_wait=timedelta(minutes=30))
    with cancel.stop_on_signals():
        try:
            backup(repo, LocalBlockSource(sys.argv[2]), request)
        except cancel.Interrupted as exc:
            print(f"interrupted: {exc}", file=sys.stderr, flush=True)
            sys.exit(cancel.exit_code())
    print("backed up", file=sys.stderr, flush=True)
""")


@pytest.mark.parametrize("holder", ["prune"], indirect=True)
def test_a_backup_waiting_for_a_prune_stops_on_the_first_signal(repo: Repository, tmp_path: Path,
                                                                holder: subprocess.Popen[str]) -> None:
    """A live prune holds the lock; the backup waits (up to 30 min) until a real SIGINT ends the wait."""
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(4).randbytes(BLOCK))
    waiter = subprocess.Popen([sys.executable, "-c", _WAITING_BACKUP, str(repo.store.root), str(image)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert waiter.stderr is not None and waiter.stderr.readline().strip() == "waiting"
        waiter.send_signal(signal.SIGINT)
        # A hang bound, not a speed measure: unstopped, the wait would last 30 minutes.
        code = waiter.wait(timeout=120)
        said = waiter.stderr.read()
    finally:
        waiter.kill()
        waiter.wait()
    assert code == 130, said
    assert "interrupted: interrupted by SIGINT" in said and "backed up" not in said
    assert repo.points() == [] and list(repo.store.list("chunks/")) == []
    # Only the prune's own lock is left: the waiter took its attempt back out.
    assert [state.kind for state in repo.lock_states()] == ["prune"]
