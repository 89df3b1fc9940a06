"""Changed-block tracking and instant restores on a loop-mounted XFS, against restic.

Not a test: it measures, it asserts nothing. As root (loop mount, dropping the page cache):

    uv run python bench/cbt_xfs.py [--sizes 2GiB,8GiB] [--workdir DIR] [--no-restic] [--keep]

For each size, an image (bench/backup_vs_restic.py's mix) on a fresh XFS with reflink,
loop-mounted from a sparse file in the work directory: a full patchdrill backup (a real disk
run: reflink snapshot, scan, upload, point, the clone kept), then the same number of 4 MiB
blocks rewritten on every image (1% of the smallest) and the incremental, timed from snapshot to
snapshot removal, the clone compared by extent map. On the largest image also: an incremental
with no kept clone (read and hash) for reference; restic's full backup; 1% of the blocks
rewritten and both tools' incrementals of that same change; an instant restore of the latest
point (cloned from the kept clone) and restic's restore of its latest snapshot, both onto the
same XFS, each checked against the image's SHA-256. The page cache is dropped (`echo 3 > /proc/sys/vm/drop_caches`, after a sync) before
every timed step where the machine allows it, so each tool reads from the disk.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.backup_vs_restic import BLOCK, MIB, PASSWORD, Restic, digest, make_image, parse_size  # noqa: E402
from configs.models import DiskConfig, HostConfig, LocalStorage  # noqa: E402
from configs.policies import BackupPolicy  # noqa: E402
from tasks.backup.disk import back_up_disk, open_repository  # noqa: E402
from tasks.backup.kept import restore_instantly  # noqa: E402

GIB = 1024 * MIB


def drop_caches() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def timed(action: Callable[[], object], cold: bool) -> float:
    if cold:
        drop_caches()
    else:
        os.sync()
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


@contextmanager
def loop_xfs(work: Path, size: int) -> Iterator[Path]:
    backing, mount = work / "xfs.img", work / "mnt"
    mount.mkdir()
    with backing.open("wb") as handle:
        handle.truncate(size)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(backing)], check=True)
    subprocess.run(["mount", "-o", "loop", str(backing), str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


class Disk:
    """One image on the XFS, backed up as host bench's disk by real disk runs."""

    def __init__(self, work: Path, mount: Path, name: str, size: int) -> None:
        self.image = mount / f"{name}.img"
        self.host = HostConfig(name="bench", transport="local",
                               disks=[DiskConfig(name=name, path=str(self.image), kind="block")])
        self.storage = LocalStorage(kind="local", path=str(work / f"repo-{name}"))
        self.work = work
        self.size = size
        os.environ["PD_BENCH_KEY"] = PASSWORD
        self.tracked = BackupPolicy(block_size=BLOCK, encryption_key="env:PD_BENCH_KEY",
                                    kept_clones={"points": 3, "days": 5, "space_limit": "4GiB"})
        self.plain = self.tracked.model_copy(update={"kept_clones": None})

    def backup(self, policy: BackupPolicy) -> None:
        report = back_up_disk(self.storage, self.work, self.host, self.host.disks[0], policy)
        if report.status != "ok" or report.warning:
            raise SystemExit(f"backup of {self.image}: {report.error or report.warning}")

    def latest_notes(self) -> list[str]:
        repo = open_repository(self.storage, self.work, self.tracked)
        return repo.find_point("bench", self.host.disks[0].name).notes

    def instant_restore(self, target: Path) -> None:
        repo = open_repository(self.storage, self.work, self.tracked)
        point = repo.find_point("bench", self.host.disks[0].name)
        done = restore_instantly(point, self.host, None, str(target), self.work, force=False)
        if isinstance(done, str):
            raise SystemExit(f"no instant restore: {done}")


def rewrite_blocks(path: Path, count: int, seed: int) -> None:
    """Rewrite `count` random 4 MiB blocks with new random bytes."""
    rng = random.Random(seed)
    blocks = path.stat().st_size // BLOCK
    with open(path, "r+b") as handle:
        for index in rng.sample(range(blocks), count):
            handle.seek(index * BLOCK)
            handle.write(rng.randbytes(BLOCK))


def run(work: Path, sizes: list[int], with_restic: bool) -> None:
    cold = drop_caches()
    largest, smallest = max(sizes), min(sizes)
    same_change = max(1, smallest // BLOCK // 100)
    print(f"page cache dropped before each timed step: {'yes' if cold else 'no (needs root)'}")
    print(f"images: {', '.join(f'{s / GIB:g} GiB' for s in sizes)}, block size {BLOCK // MIB} MiB; the size "
          f"comparison rewrites {same_change} blocks ({same_change * BLOCK // MIB} MiB) of each, the restic "
          f"comparison 1% of the {largest / GIB:g} GiB image's blocks")
    restic = Restic(work) if with_restic and shutil.which("restic") else None
    # Room for every image, the restic restore of the largest, and what the kept clones hold.
    with loop_xfs(work, sum(sizes) + largest + 4 * GIB) as mount:
        rows: list[tuple[str, float]] = []
        incremental: dict[int, float] = {}
        for size in sizes:
            disk = Disk(work, mount, f"disk{size // MIB}m", size)
            label = f"{size / GIB:g} GiB"
            make_image(disk.image, size)
            rows.append((f"patchdrill full, {label}", timed(lambda: disk.backup(disk.tracked), cold)))
            rewrite_blocks(disk.image, same_change, seed=2)
            incremental[size] = timed(lambda: disk.backup(disk.tracked), cold)
            print(f"  {label}: {_how(disk)}")
            rows.append((f"patchdrill incremental, {same_change} blocks, {label}", incremental[size]))
            if size != largest:
                continue
            rewrite_blocks(disk.image, size // BLOCK // 100, seed=4)
            rows.append((f"patchdrill incremental, read and hash, 1%, {label}",
                         timed(lambda: disk.backup(disk.plain), cold)))
            # The read-and-hash point kept no clone: this backup reads too, and keeps one.
            disk.backup(disk.tracked)
            if restic is not None:
                rows.append((f"restic full, {label}", timed(lambda: restic.backup(disk.image), cold)))
            rewrite_blocks(disk.image, size // BLOCK // 100, seed=3)
            expected = digest(disk.image)
            rows.append((f"patchdrill incremental, tracked, 1%, {label}", timed(lambda: disk.backup(disk.tracked), cold)))
            print(f"  {label}, 1%: {_how(disk)}")
            if restic is not None:
                rows.append((f"restic incremental, 1%, {label}", timed(lambda: restic.backup(disk.image), cold)))
            target = mount / "restored.img"
            rows.append((f"patchdrill instant restore, {label}", timed(lambda: disk.instant_restore(target), cold)))
            if digest(target) != expected:
                raise SystemExit("the instant restore differs from the image")
            target.unlink()
            if restic is not None:
                restic_target = mount / "restic" / "restored.img"
                restic_target.parent.mkdir()
                rows.append((f"restic restore, {label}",
                             timed(lambda: _restic_restore(restic, disk.image, restic_target), cold)))
                if digest(restic_target) != expected:
                    raise SystemExit("restic's restore differs from the image")
                restic_target.unlink()
        report(rows, incremental, largest)


def _how(disk: Disk) -> str:
    return next(n for n in disk.latest_notes() if n.startswith(("changed-block tracking", "read and hash")))


def _restic_restore(restic: Restic, image: Path, target: Path) -> None:
    out = target.parent / "out"
    restic._run("restore", "latest", "--target", str(out))
    found = next(p for p in out.rglob(image.name) if p.is_file())
    os.replace(found, target)
    shutil.rmtree(out)


def report(rows: list[tuple[str, float]], incremental: dict[int, float], largest: int) -> None:
    print(f"\n{'step':<52} {'seconds':>8}")
    for name, seconds in rows:
        print(f"{name:<52} {seconds:8.2f}")
    by = dict(rows)
    big = f"{largest / GIB:g} GiB"
    if f"restic incremental, 1%, {big}" in by:
        print(f"\nincremental, patchdrill tracked / restic ({big}, 1%): "
              f"{by[f'patchdrill incremental, tracked, 1%, {big}'] / by[f'restic incremental, 1%, {big}']:.3f}x")
        print(f"instant restore / restic restore ({big}): "
              f"{by[f'patchdrill instant restore, {big}'] / by[f'restic restore, {big}']:.3f}x")
    if len(incremental) > 1:
        small = min(incremental)
        print(f"incremental {big} / {small / GIB:g} GiB (the same 1% change): "
              f"{incremental[largest] / incremental[small]:.2f}x")


def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="2GiB,8GiB", help="image sizes, comma-separated; the largest is compared with restic")
    parser.add_argument("--workdir", type=Path, default=None, help="where the XFS backing file and repositories go")
    parser.add_argument("--no-restic", action="store_true", help="patchdrill only")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (unmounted)")
    args = parser.parse_args()
    if os.geteuid() != 0 or not shutil.which("mkfs.xfs"):
        # Said, not failed: `make bench` runs the others as any user.
        print("cbt_xfs: skipped: needs root and xfsprogs (it loop-mounts an XFS and drops the page cache)")
        return
    work = Path(tempfile.mkdtemp(prefix="pd-cbt-", dir=args.workdir))
    try:
        run(work, sorted(parse_size(s) for s in args.sizes.split(",")), not args.no_restic)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
