"""A stop asked for part-way through a backup or a restore, on a real local store.

The stop is requested from inside the run (after N blocks were read or restored) instead of by
a signal, so the moment it lands is exact; tests/e2e/test_stop_signals.py sends real signals to
the real command.
"""

from __future__ import annotations

import os
import random
import signal
from concurrent.futures import Future
from pathlib import Path
from typing import Iterator

import pytest

from connectors.stores import LocalBlobStore
from tasks.backup import cancel
from tasks.backup.repo.blockmap import BlockMap
from tasks.backup.engine import BackupRequest, backup
from tasks.backup.repo.repository import Repository
from tasks.backup.restore import restore
from tasks.backup.scheduling import Bounds, run_bounded
from tasks.backup.sources.base import BufferPool, SourceBlock
from tasks.backup.sources.local import LocalBlockSource, LocalTreeSource

BLOCK = 64 * 1024
BLOCKS = 64


@pytest.fixture(autouse=True)
def fresh_token() -> Iterator[None]:
    cancel.reset()
    yield
    cancel.reset()


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.open(LocalBlobStore(tmp_path / "repo"), create=True)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "disk.img"
    path.write_bytes(random.Random(3).randbytes(BLOCKS * BLOCK))
    return path


class StopAfter(LocalBlockSource):
    """The real image reader, asking for a stop once it has handed out `after` blocks."""

    def __init__(self, path: Path, after: int) -> None:
        super().__init__(path)
        self.after = after

    def blocks(self, block_size: int, previous: BlockMap | None, pool: BufferPool) -> Iterator[SourceBlock]:
        for block in super().blocks(block_size, previous, pool):
            if block.index == self.after:
                cancel.request("stopped by the test")
            yield block


def test_a_stop_mid_backup_writes_no_point_and_releases_the_lock(repo: Repository, image: Path) -> None:
    with pytest.raises(cancel.Interrupted, match="stopped by the test"):
        backup(repo, StopAfter(image, after=8), BackupRequest(host="web-1", disk="data", block_size=BLOCK, workers=2))

    assert repo.points() == []
    assert repo.locks() == []
    assert len(repo.chunk_ids()) < BLOCKS

    cancel.reset()
    point = backup(repo, LocalBlockSource(image), BackupRequest(host="web-1", disk="data", block_size=BLOCK))
    assert point.map.blocks == BLOCKS  # the next run starts and finishes normally


def test_a_stop_mid_directory_backup_writes_no_point(repo: Repository, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    for i in range(20):
        (tree / f"f{i}").write_bytes(random.Random(i).randbytes(BLOCK))
    cancel.request("stopped by the test")

    with pytest.raises(cancel.Interrupted):
        backup(repo, LocalTreeSource(tree), BackupRequest(host="web-1", disk="etc", block_size=BLOCK))
    assert repo.points() == [] and repo.locks() == []


class StopWhenRestored:
    """A progress listener that asks for a stop once `after` bytes were restored."""

    def __init__(self, after: int) -> None:
        self.after = after
        self.done = 0

    def add_total(self, what: str, nbytes: int) -> None:
        pass

    def advance(self, what: str, nbytes: int) -> None:
        self.done += nbytes
        if self.done >= self.after:
            cancel.request("stopped by the test")


def test_a_stopped_restore_leaves_neither_target_nor_temporary_file(repo: Repository, image: Path,
                                                                    tmp_path: Path) -> None:
    point = backup(repo, LocalBlockSource(image), BackupRequest(host="web-1", disk="data", block_size=BLOCK))
    out = tmp_path / "out"
    out.mkdir()

    with pytest.raises(cancel.Interrupted):
        restore(repo, point, out / "restored.img", workers=2, progress=StopWhenRestored(4 * BLOCK))

    assert list(out.iterdir()) == []


def test_a_stopped_forced_restore_stops_writing(repo: Repository, image: Path, tmp_path: Path) -> None:
    point = backup(repo, LocalBlockSource(image), BackupRequest(host="web-1", disk="data", block_size=BLOCK))
    target = tmp_path / "existing.img"
    target.write_bytes(bytes(BLOCKS * BLOCK))

    with pytest.raises(cancel.Interrupted):
        restore(repo, point, target, force=True, workers=2, progress=StopWhenRestored(4 * BLOCK))

    assert target.read_bytes() != image.read_bytes()  # part-way: what the command then reports


def test_run_bounded_starts_nothing_more_after_a_stop() -> None:
    started: list[tuple[str, str]] = []

    def submit(host: str, item: str) -> Future[None]:
        started.append((host, item))
        if len(started) == 2:
            cancel.request("stopped by the test")
        done: Future[None] = Future()
        done.set_result(None)
        return done

    finished = run_bounded([("a", ["x", "y"]), ("b", ["x"]), ("c", ["x"])], Bounds(max_hosts=1, max_per_host=1),
                           submit, lambda fs: fs[0], stopped=lambda: cancel.requested() is not None)

    assert started == [("a", "x"), ("a", "y")]
    assert [(h, i) for h, i, _ in finished] == started


def test_a_stop_cuts_a_stagger_pause_short() -> None:
    waits: list[float] = []

    def wait(seconds: float) -> bool:
        waits.append(seconds)
        cancel.request("stopped by the test")
        return True

    def submit(host: str, item: str) -> Future[None]:
        done: Future[None] = Future()
        done.set_result(None)
        return done

    finished = run_bounded([("a", ["x"]), ("b", ["x"])], Bounds(max_hosts=2, stagger_seconds=3600), submit,
                           lambda fs: fs[0], sleep=wait, stopped=lambda: cancel.requested() is not None)

    assert [h for h, _, _ in finished] == ["a"] and len(waits) == 1


def test_a_signal_inside_stop_on_signals_asks_for_a_stop_and_nested_scopes_share_it() -> None:
    before = {number: signal.getsignal(number) for number in cancel.STOP_SIGNALS}
    with cancel.stop_on_signals():
        with cancel.stop_on_signals():  # a flow inside the command: the same token
            os.kill(os.getpid(), signal.SIGTERM)
            assert cancel.requested() == "interrupted by SIGTERM"
        assert cancel.exit_code() == 143
        with pytest.raises(cancel.Interrupted, match="interrupted by SIGTERM"):
            cancel.check()
    # The process is on its way out after a stop: the handlers stay, so a second signal still
    # exits at once during teardown. Put back what pytest had.
    assert signal.getsignal(signal.SIGTERM) is not before[signal.SIGTERM]
    for number, handler in before.items():
        signal.signal(number, handler)


def test_without_a_stop_stop_on_signals_puts_the_handlers_back() -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with cancel.stop_on_signals():
        assert cancel.requested() is None
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
