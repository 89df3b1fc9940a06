"""Side by side: what a sparse, mostly empty image costs patchdrill and restic.

Not a test: it measures, it asserts nothing. The image is --size apparent bytes holding --data
bytes of random (incompressible) data in 1 MiB pieces spread over it, the rest holes. It is
backed up twice per tool: once as a sparse file, once fully allocated (the same bytes, its
zeros written, as a preallocated or wiped disk holds them). For each: the backup's seconds, the
bytes it added to the repository, what patchdrill's process read (/proc/self/io), a restore to a
new file (checked against the image's SHA-256) and the restored file's allocated bytes (`du`).

    uv run python bench/sparse_image.py --size 256MiB --data 4MiB   # --images sparse, --workdir, --keep

Both tools encrypt and compress (patchdrill AES-256-GCM and zstd 3, restic repository v2), as in
bench/backup_vs_restic.py, whose tool wrappers this reuses. Target (issue 13): the 256 MiB image
with 4 MiB of data costs patchdrill ≤ 5 MiB in the repository.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.backup_vs_restic import MIB, Patchdrill, Restic, digest, parse_size, tree_bytes  # noqa: E402


def make_sparse_image(path: Path, size: int, data: int, *, allocated: bool) -> None:
    """`data` bytes of random data in 1 MiB pieces evenly spread over `size`; holes elsewhere, or
    written zeros when `allocated`."""
    rng = random.Random(13)
    pieces = max(1, data // MIB)
    step = size // pieces
    with open(path, "wb") as out:
        if allocated:
            for _ in range(size // MIB):
                out.write(bytes(MIB))
        else:
            out.truncate(size)
        for n in range(pieces):
            out.seek(n * step)
            out.write(rng.randbytes(min(MIB, data - n * MIB)))
        out.flush()
        os.fsync(out.fileno())


def read_bytes_of_this_process() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def allocated_bytes(path: Path) -> int:
    return os.stat(path).st_blocks * 512


IMAGES = ("sparse", "allocated")


@dataclass
class Row:
    tool: str
    image: str
    backup_seconds: float
    added: int
    read: int | None
    restore_seconds: float
    restored_allocated: int


def measure(tool: Patchdrill | Restic, image: Path, kind: str, work: Path) -> Row:
    before_bytes = tree_bytes(tool.repo_dir)
    before_read = read_bytes_of_this_process()
    os.sync()
    started = time.perf_counter()
    tool.backup(image)
    backup_seconds = time.perf_counter() - started
    # restic runs in its own process: what it read is not this process's.
    read = read_bytes_of_this_process() - before_read if isinstance(tool, Patchdrill) else None
    added = tree_bytes(tool.repo_dir) - before_bytes
    target = work / f"restored-{tool.name}.img"
    os.sync()
    started = time.perf_counter()
    tool.restore(target)
    restore_seconds = time.perf_counter() - started
    if digest(target) != digest(image):
        raise SystemExit(f"{tool.name}: the restored {kind} image differs from the source")
    row = Row(tool.name, kind, backup_seconds, added, read, restore_seconds, allocated_bytes(target))
    target.unlink()
    return row


def main() -> None:
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="256MiB", help="apparent image size")
    parser.add_argument("--data", default="4MiB", help="bytes of data in it (1 MiB pieces)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to put the image and repositories")
    parser.add_argument("--images", nargs="+", choices=IMAGES, default=list(IMAGES),
                        help="which images (an allocated one of many GiB takes that much disk)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    size, data = parse_size(args.size), parse_size(args.data)
    work = Path(tempfile.mkdtemp(prefix="pd-sparse-", dir=args.workdir))
    try:
        run(work, size, data, args.images)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run(work: Path, size: int, data: int, images: list[str]) -> None:
    rows: list[Row] = []
    for kind in images:
        # A fresh repository per image: the second image's data would otherwise dedup to nothing.
        directory = work / kind
        directory.mkdir()
        tools: list[Patchdrill | Restic] = [Patchdrill(directory, None)]
        if shutil.which("restic"):
            tools.append(Restic(directory))
        image = directory / "disk.img"  # restic's wrapper finds its restored file by this name
        make_sparse_image(image, size, data, allocated=kind == "allocated")
        print(f"{kind} image: {size / MIB:.0f} MiB apparent, {data / MIB:.0f} MiB of data, "
              f"{allocated_bytes(image) / MIB:.1f} MiB allocated")
        rows += [measure(tool, image, kind, directory) for tool in tools]
    print()
    print(f"{'tool':<11} {'image':<10} {'backup s':>8} {'repo MiB':>9} {'read MiB':>9} {'restore s':>9} "
          f"{'du MiB':>7}")
    for r in rows:
        read = f"{r.read / MIB:9.1f}" if r.read is not None else f"{'-':>9}"
        print(f"{r.tool:<11} {r.image:<10} {r.backup_seconds:8.2f} {r.added / MIB:9.2f} {read} "
              f"{r.restore_seconds:9.2f} {r.restored_allocated / MIB:7.1f}")
    by = {(r.tool, r.image): r for r in rows}
    for kind in images:
        ours, theirs = by[("patchdrill", kind)], by.get(("restic", kind))
        if theirs is not None:
            print(f"\n{kind}: patchdrill/restic backup time {ours.backup_seconds / theirs.backup_seconds:.3g}x, "
                  f"repository {ours.added / theirs.added:.3g}x, restore time "
                  f"{ours.restore_seconds / theirs.restore_seconds:.3g}x", end="")
    print()


if __name__ == "__main__":
    main()
