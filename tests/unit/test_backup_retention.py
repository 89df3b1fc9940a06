"""Retention (which points a policy keeps), forget, and prune with its lock scheme."""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from configs.policies import KeepRules
from connectors.stores import LocalBlobStore
from tasks.backup.engine import BackupRequest, backup
from tasks.backup.errors import RepositoryBusy
from tasks.backup.repo.repository import Repository, utcnow
from tasks.backup.restore import restore
from tasks.backup.repo.retention import forget, prune, select_kept
from tasks.backup.sources.local import LocalBlockSource
from tasks.backup.repo.verify import referenced_chunks, verify

BLOCK = 4096
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)

times_strategy = st.lists(st.integers(min_value=0, max_value=400 * 24), min_size=0, max_size=40, unique=True).map(
    lambda hours: [T0 + timedelta(hours=h) for h in hours])
budget = st.one_of(st.none(), st.integers(min_value=1, max_value=6))

PERIODS = {"daily": lambda t: t.date(), "weekly": lambda t: t.isocalendar()[:2], "monthly": lambda t: (t.year, t.month)}


@settings(max_examples=300, deadline=None)
@given(times=times_strategy, last=budget, daily=budget, weekly=budget, monthly=budget)
def test_retention_keeps_exactly_what_the_rules_justify(times: list[datetime], last: int | None, daily: int | None,
                                                        weekly: int | None, monthly: int | None) -> None:
    rules = KeepRules(last=last, daily=daily, weekly=weekly, monthly=monthly)
    kept = select_kept(times, rules)
    if rules.keeps_everything:
        assert kept == set(range(len(times)))
        return
    newest_first = sorted(range(len(times)), key=lambda i: times[i], reverse=True)
    justified: set[int] = set(newest_first[: last or 0])
    for name, period_of in PERIODS.items():
        n = {"daily": daily, "weekly": weekly, "monthly": monthly}[name] or 0
        periods = sorted({period_of(t) for t in times}, reverse=True)[:n]
        for period in periods:  # the newest point of each of the newest n periods
            justified.add(max((i for i in range(len(times)) if period_of(times[i]) == period), key=lambda i: times[i]))
    assert kept == justified


def test_retention_example() -> None:
    # Two points a day for ten days, newest last.
    times = [T0 + timedelta(days=d, hours=h) for d in range(10) for h in (1, 13)]
    kept = select_kept(times, KeepRules(last=3, daily=5))
    kept_times = sorted(times[i] for i in kept)
    assert kept_times[-3:] == times[-3:]
    assert {t.date() for t in kept_times} == {(T0 + timedelta(days=d)).date() for d in range(5, 10)}
    assert len(kept) == 6  # 3 newest (days 9, 9, 8) + newest of days 5..9, of which days 8-9 already kept


def _image(path: Path, blocks: int, seed: int) -> Path:
    path.write_bytes(random.Random(seed).randbytes(blocks * BLOCK))
    return path


def _repo(root: Path) -> Repository:
    return Repository.open(LocalBlobStore(root), create=True)


def test_forget_then_prune_keeps_kept_points_whole(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "repo")
    image = _image(tmp_path / "disk.img", 8, seed=1)
    request = BackupRequest(host="db-1", disk="os", block_size=BLOCK, workers=2)
    base = backup(repo, LocalBlockSource(image), request)
    # Points on five different days: each a copy of a fresh backup, re-dated.
    rng = random.Random(5)
    for day in range(1, 5):
        with open(image, "r+b") as handle:
            handle.seek(rng.randrange(8) * BLOCK)
            handle.write(rng.randbytes(BLOCK))
        fresh = backup(repo, LocalBlockSource(image), request)
        repo.store.delete(fresh.key)
        repo.write_point(fresh.model_copy(update={"time": base.time + timedelta(days=day)}))
    repo.store.delete(base.key)
    repo.write_point(base.model_copy(update={"time": base.time - timedelta(days=30)}))
    before = {bytes(k) for k in referenced_chunks(repo, repo.points())}

    report = forget(repo, KeepRules(last=2))
    assert len(report.kept) == 2 and len(report.forgotten) == 3
    pruned = prune(repo)
    live = referenced_chunks(repo, repo.points())
    stored = {bytes.fromhex(i.key.rsplit("/", 1)[1]) for i in repo.store.list("chunks/")}
    assert stored == set(live)
    assert pruned.chunks_deleted == len(before - set(live)) > 0
    assert len(list(repo.store.list("maps/"))) == 2
    assert verify(repo).ok


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_prune_never_removes_a_referenced_chunk(tmp_path_factory: pytest.TempPathFactory, data: st.DataObject) -> None:
    root = tmp_path_factory.mktemp("prop")
    repo = _repo(root / "repo")
    disks = {name: _image(root / f"{name}.img", 4, seed=i) for i, name in enumerate(("a", "b"))}
    for step in range(data.draw(st.integers(2, 6), label="backups")):
        name = data.draw(st.sampled_from(sorted(disks)), label="disk")
        changed = data.draw(st.lists(st.integers(0, 3), max_size=3), label="changed blocks")
        with open(disks[name], "r+b") as handle:
            for index in changed:
                handle.seek(index * BLOCK)
                handle.write(random.Random(step * 10 + index).randbytes(BLOCK))
        backup(repo, LocalBlockSource(disks[name]), BackupRequest(host="h", disk=name, block_size=BLOCK, workers=2))
    forget(repo, KeepRules(last=data.draw(st.integers(1, 3), label="keep_last")))
    prune(repo)
    assert verify(repo).ok
    for point in repo.points():
        out = root / f"out-{point.time.timestamp()}.img"
        restore(repo, point, out)


def test_prune_refuses_beside_a_running_backup_and_ignores_stale_locks(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "repo")
    with repo.lock("backup"):
        with pytest.raises(RepositoryBusy, match="busy: a backup"):
            prune(repo)
    assert list(repo.store.list("locks/")) == []

    stale = (utcnow() - timedelta(hours=2)).isoformat()
    repo.store.put("locks/crashed.json", json.dumps({"kind": "backup", "pid": 1, "host": "x", "created": stale,
                                                     "refreshed": stale}).encode())
    prune(repo)  # the killed backup's lock no longer holds the repository
    assert list(repo.store.list("locks/")) == []


def test_backup_waits_for_prune_then_gives_up_clearly(tmp_path: Path) -> None:
    repo = _repo(tmp_path / "repo")
    image = _image(tmp_path / "disk.img", 2, seed=3)
    request = BackupRequest(host="h", disk="d", block_size=BLOCK, workers=1, lock_wait=timedelta(0))
    with repo.lock("prune"):
        with pytest.raises(RepositoryBusy, match="a prune"):
            backup(repo, LocalBlockSource(image), request)
    assert backup(repo, LocalBlockSource(image), request).totals.uploaded_chunks == 2
