"""A drill's RTO against its floor: what restoring the point and starting the application take
on their own, so the drill's orchestration overhead is a measured ratio (target ≤ 1.2×).

Not a test: it measures, it asserts nothing. On the embedded lab (this machine as the primary,
a local store, the controller as DR target, the copy in a network namespace when root):

1. the primary: notes-app's data directory (examples/notes-app, seeded) with a disk image of
   --size beside its database, backed up with `patchdrill backup`;
2. the floor: the bare restore (tasks/backup's restore alone, no Prefect) onto an empty
   directory, plus notes-app's own start on that copy (process start to `/health` answering 200);
3. the drill: `patchdrill drill run bench`, its RTO read back from the evidence record in the
   store, beside the floor, with each step's duration so the overhead has names;
4. the same after 1% of the image is rewritten and an incremental taken, with the previous copy
   already on the target (delta restore): bare delta restore + start, and the drill again.

    uv run python bench/drill_rto.py --size 2GiB   # --runs K, --notes N, --port P, --workdir DIR, --keep

Every timed restore, bare or drilled, starts settled: nothing dirty left to write back and the
store's chunks dropped from the page cache (posix_fadvise), so the drill is not charged for an
earlier copy's writeback nor the floor credited with a store still warm from the backup; both
are the best of --runs.

Where the tree has no `patchdrill drill run` yet, the drill rows say "not measured" and only the
floor is measured.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import structlog

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from backup_vs_restic import make_image, parse_size, rewrite_one_percent  # noqa: E402

from configs.loader import load_config  # noqa: E402
from connectors.stores import open_store  # noqa: E402
from tasks.backup.policy import policy_from_config  # noqa: E402
from tasks.backup.restore import restore  # noqa: E402
from tasks.backup.disk import open_repository  # noqa: E402
from tasks.drill.evidence import DrillEvidence  # noqa: E402

APP_DIR = ROOT / "examples" / "notes-app"
PLAN = "bench"
HOST = "bench"
DISK = "data"
TARGET_RATIO = 1.2
START_TIMEOUT_SECONDS = 120

CONFIG = """\
version: 1
storage: {{kind: local, path: store}}
hosts:
  - name: {host}
    transport: local
    os_family: linux
    timezone: UTC
    disks:
      - {{name: {disk}, path: primary, kind: directory}}
backup_policies:
  default: {{block_size: 4194304, keep_last: 10}}
recovery_plans:
  {plan}:
    description: notes-app with a disk image beside its database, drilled onto this machine.
    rto_target: PT10M
    rpo_target: P1D
    groups:
      - name: app
        members:
          - host: {host}
            disks: [{disk}]
            point: latest
            target: {{host: controller, path: dr}}
            app:
              preset: process
              command: {python} {app} --data {{disk:{disk}}} --port {port} --bind 127.0.0.1
              port: {port}
            probes:
              - {{kind: http, url: "http://127.0.0.1:{port}/health", expect_status: 200, expect_body: "ok notes="}}
"""


@dataclass
class Floor:
    restore_seconds: float
    start_seconds: float
    #: Each round's (bare restore, drill RTO), side by side in time: their ratios are the
    #: comparison least moved by this disk's swings.
    rounds: list[tuple[float, float | None]] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return self.restore_seconds + self.start_seconds

    def round_ratios(self) -> list[float]:
        return [rto / (bare + self.start_seconds) for bare, rto in self.rounds if rto is not None]


def patchdrill(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """The command as a user runs it (Prefect's temporary API included)."""
    command = Path(sys.executable).with_name("patchdrill")
    return subprocess.run([str(command), *args, "--config", str(config)], cwd=ROOT,
                          capture_output=True, text=True, check=False)


def backup(config: Path) -> None:
    done = patchdrill(config, "backup", "--host", HOST)
    if done.returncode != 0:
        raise SystemExit(f"backup failed ({done.returncode}): {done.stderr[-2000:]}")


def bare_restore(config: Path, target: Path, *, force: bool) -> float:
    """tasks/backup's restore alone, onto target (force: over a previous copy, delta)."""
    loaded = load_config(config)
    repo = open_repository(loaded.config.storage, loaded.base_dir, policy_from_config(loaded.config.backup_policies, None))
    point = repo.find_point(HOST, DISK)
    settle(config.parent)
    started = time.perf_counter()
    restore(repo, point, target, force=force)
    return time.perf_counter() - started


def app_start(data: Path, port: int) -> float:
    """notes-app's own start on data: process start to its first `/health` 200."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, str(APP_DIR / "app.py"), "--data", str(data), "--port", str(port),
                                "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - started < START_TIMEOUT_SECONDS:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
                    if answer.status == 200:
                        return time.perf_counter() - started
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.01)
        raise SystemExit(f"notes-app did not answer on port {port} within {START_TIMEOUT_SECONDS} s")
    finally:
        process.terminate()
        process.wait(timeout=30)


def settle(work: Path) -> None:
    """The same start for every timed restore, bare or drilled: nothing left to write back (an
    fsync in the restore would otherwise pay for an earlier copy's writes) and the store's chunks
    out of the page cache (a drill reads its point seconds after the bare restores read it; a
    restore after a disaster reads a store nobody has read lately)."""
    os.sync()
    for path in (work / "store").rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def drill(config: Path, previous: Path | None) -> DrillEvidence | str:
    """One drill (onto a copy of `previous` left as an earlier drill would have, when given:
    delta); its evidence record, or why there is none."""
    if previous is not None:
        _place_previous_copy(previous, config.parent / "dr")
    return _drill_once(config)


def _drill_once(config: Path) -> DrillEvidence | str:
    settle(config.parent)
    done = patchdrill(config, "drill", "run", PLAN, "--yes")
    if "No such command" in done.stderr:
        return "not measured: this tree has no `patchdrill drill run`"
    newest = _newest_evidence(config)
    if newest is None:
        return f"not measured: the drill exited {done.returncode} without evidence: {done.stderr.strip()[-300:]}"
    return newest


def _newest_evidence(config: Path) -> DrillEvidence | None:
    loaded = load_config(config)
    store = open_store(loaded.config.storage, loaded.base_dir)
    try:
        records = [DrillEvidence.model_validate_json(store.get(item.key))
                   for item in store.list(f"evidence/drills/{PLAN}/") if item.key.endswith(".json")]
    finally:
        store.close()
    return max(records, key=lambda r: r.started, default=None)


def floor_and_drill(config: Path, copy: Path, port: int, runs: int,
                    previous: Path | None) -> tuple[Floor, DrillEvidence | str]:
    """`runs` rounds of one bare restore (onto a copy of `previous` when given: delta) then one
    drill, each side's best kept. Interleaved, because this machine's disk writes swing by 3x
    and more over minutes: all bare restores first and all drills after would compare two
    different stretches of the disk's speed, not the two ways of restoring."""
    best: float | None = None
    drilled: DrillEvidence | str | None = None
    rounds: list[tuple[float, float | None]] = []
    for _ in range(runs):
        shutil.rmtree(copy, ignore_errors=True)
        if previous is not None:
            shutil.copytree(previous, copy)
        seconds = bare_restore(config, copy, force=previous is not None)
        best = seconds if best is None else min(best, seconds)
        if isinstance(drilled, str):
            continue  # the drill could not be measured: only the floor is
        outcome = drill(config, previous)
        rounds.append((seconds, None if isinstance(outcome, str) else outcome.rto_seconds))
        if isinstance(outcome, str) or drilled is None or (outcome.rto_seconds or float("inf")) < (drilled.rto_seconds or float("inf")):
            drilled = outcome
    assert best is not None and drilled is not None
    return Floor(best, app_start(copy, port), rounds), drilled


def _place_previous_copy(previous: Path, root: Path) -> None:
    """Leave the previous point's copy on the DR target as an earlier drill would have: under a
    copy root carrying the drill's marker, which the drill claims and restores over (delta)."""
    from tasks.drill.copies import MARKER  # only on a tree that has the drill

    shutil.copytree(previous, root / DISK, dirs_exist_ok=True)
    (root / MARKER).write_text("bench-previous-copy\n", encoding="utf-8")


def run(work: Path, size: int, notes: int, port: int, runs: int) -> None:
    primary = work / "primary"
    seeded = subprocess.run([sys.executable, str(APP_DIR / "seed.py"), "--data", str(primary), "--notes", str(notes)],
                            capture_output=True, text=True, check=True).stdout.strip()
    make_image(primary / "disk.img", size)
    config = work / "config.yaml"
    config.write_text(CONFIG.format(host=HOST, disk=DISK, plan=PLAN, port=port,
                                    python=sys.executable, app=APP_DIR / "app.py"), encoding="utf-8")
    print(f"primary: notes-app ({seeded}) and a {size / (1 << 20):.0f} MiB disk image; store and DR target under {work}")
    backup(config)

    copy = work / "bare" / DISK
    fresh, fresh_drill = floor_and_drill(config, copy, port, runs, previous=None)
    previous = work / "previous" / DISK
    shutil.copytree(copy, previous)

    # Delta: the primary moves on (1% of the image, one more note), a new point is taken, and
    # both the bare restore and the drill start from a copy of the previous point.
    rewritten = rewrite_one_percent(primary / "disk.img", size)
    subprocess.run([sys.executable, str(APP_DIR / "seed.py"), "--data", str(primary), "--notes", "1"],
                   capture_output=True, check=True)
    backup(config)
    delta, delta_drill = floor_and_drill(config, copy, port, runs, previous=previous)

    print(f"rewritten before the delta runs: {rewritten / (1 << 20):.0f} MiB; bare restores and drills: best of {runs}\n")
    report("fresh target", fresh, fresh_drill)
    report("previous copy on the target (delta)", delta, delta_drill)


def report(title: str, floor: Floor, outcome: DrillEvidence | str) -> None:
    print(f"## {title}")
    print(f"{'bare restore':<28} {floor.restore_seconds:8.2f} s")
    print(f"{'notes-app start':<28} {floor.start_seconds:8.2f} s")
    print(f"{'floor (restore + start)':<28} {floor.seconds:8.2f} s")
    if isinstance(outcome, str):
        print(f"{'drill RTO':<28} {outcome}\n")
        return
    rto = outcome.rto_seconds
    if rto is None:
        print(f"{'drill RTO':<28} not reached (outcome {outcome.outcome}): {'; '.join(outcome.notes)[-300:]}")
    else:
        verdict = "within" if rto / floor.seconds <= TARGET_RATIO else "over"
        print(f"{'drill RTO':<28} {rto:8.2f} s   {rto / floor.seconds:.2f}x the floor ({verdict} {TARGET_RATIO}x), best against best")
        if ratios := floor.round_ratios():
            print(f"{'per round (drill / floor)':<28} {' '.join(f'{r:.2f}x' for r in ratios)}   "
                  f"median {statistics.median(ratios):.2f}x")
    for point in outcome.points:
        written = f"{point.bytes_written / (1 << 20):.1f} MiB written" if point.bytes_written is not None else ""
        print(f"  drill restore of {point.disk:<12} {point.restore_seconds or 0:8.2f} s  {written}")
    for step in outcome.steps:
        seconds = f"{step.seconds:8.2f} s" if step.seconds is not None else "unfinished"
        print(f"  step {step.name:<30} {seconds:>10}  {step.member or ''}")
    print()


def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2GiB", help="disk image beside the database (e.g. 512MiB, 2GiB)")
    parser.add_argument("--notes", type=int, default=1000, help="notes in the application's database")
    parser.add_argument("--port", type=int, default=18090, help="notes-app's port (inside its namespace in the drill)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to put the primary, the store and the copies")
    parser.add_argument("--runs", type=int, default=2, help="bare restores and drills per case; the best of each is compared")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pd-bench-drill-", dir=args.workdir))
    try:
        run(work, parse_size(args.size), args.notes, args.port, max(args.runs, 1))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(json.dumps({"kept": str(work)}))


if __name__ == "__main__":
    main()
