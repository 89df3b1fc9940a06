"""Side by side: patchdrill's block-level backup against restic (and borg if installed).

Not a test: it measures, it asserts nothing. One run does, for each tool, on the same image:
full backup, incremental after rewriting 1% of the 4 MiB blocks at random, and a restore of the
latest backup (best of --runs); then prints seconds, MB/s, bytes added to the repository, and the
patchdrill/other ratios.

    uv run python bench/backup_vs_restic.py --size 2GiB [--workdir DIR] [--keep]

Both tools encrypt (restic always does; patchdrill uses AES-256-GCM here) and compress (restic
repository v2, compression auto; patchdrill zstd level 3). Both read the image from the page
cache: the image is written just before, and nothing drops caches on a shared machine. restic
does not fsync restored files, so the compared patchdrill restore does not either; the extra
`restore+fsync` line is patchdrill's default (flushed before it reports success).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import structlog

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from connectors.stores import LocalBlobStore  # noqa: E402
from tasks.backup.engine import BackupRequest, backup  # noqa: E402
from tasks.backup.repo.repository import Repository  # noqa: E402
from tasks.backup.restore import restore  # noqa: E402
from tasks.backup.sources.local import LocalBlockSource  # noqa: E402

BLOCK = 4 * 1024 * 1024
MIB = 1024 * 1024
PASSWORD = "benchmark passphrase, not a secret"


def parse_size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = text.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


def make_image(path: Path, size: int, seed: int = 1) -> None:
    """A disk-like mix per MiB: half incompressible, a quarter zeros, a quarter text-like."""
    rng = random.Random(seed)
    words = [rng.randbytes(rng.randint(3, 9)).hex().encode() for _ in range(512)]
    with open(path, "wb") as out:
        for i in range(size // MIB):
            kind = i % 4
            if kind in (0, 1):
                out.write(rng.randbytes(MIB))
            elif kind == 2:
                out.write(bytes(MIB))
            else:
                text = b" ".join(rng.choice(words) for _ in range(MIB // 6))
                out.write(text[:MIB].ljust(MIB, b"\n"))


def rewrite_one_percent(path: Path, size: int, seed: int = 2) -> int:
    rng = random.Random(seed)
    blocks = max(1, size // BLOCK)
    chosen = rng.sample(range(blocks), max(1, blocks // 100))
    with open(path, "r+b") as handle:
        for index in chosen:
            handle.seek(index * BLOCK)
            handle.write(rng.randbytes(BLOCK))
    return len(chosen) * BLOCK


def tree_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        while piece := handle.read(8 * MIB):
            h.update(piece)
    return h.hexdigest()


@dataclass
class Step:
    seconds: float
    added: int


def timed(repo_dir: Path, action: Callable[[], object]) -> Step:
    before = tree_bytes(repo_dir) if repo_dir.exists() else 0
    # Start every step with no dirty pages left by the one before, so no tool pays another's
    # writeback (this flushes; it drops no caches).
    os.sync()
    started = time.perf_counter()
    action()
    seconds = time.perf_counter() - started
    return Step(seconds, tree_bytes(repo_dir) - before)


class Patchdrill:
    name = "patchdrill"

    def __init__(self, work: Path, workers: int | None) -> None:
        self.repo_dir = work / "patchdrill-repo"
        os.environ["PD_BENCH_KEY"] = PASSWORD
        self.repo = Repository.open(LocalBlobStore(self.repo_dir), key_reference="env:PD_BENCH_KEY", create=True)
        self.request = BackupRequest(host="bench", disk="image", block_size=BLOCK,
                                     **({"workers": workers} if workers else {}))

    def backup(self, image: Path) -> None:
        backup(self.repo, LocalBlockSource(image), self.request)

    def restore(self, target: Path) -> None:
        # restic does not fsync what it restores; compare like with like, and time the flush
        # patchdrill does by default separately (restore_synced).
        restore(self.repo, self.repo.find_point("bench", "image"), target, sync=False)

    def restore_synced(self, target: Path) -> None:
        restore(self.repo, self.repo.find_point("bench", "image"), target)


class Restic:
    name = "restic"

    def __init__(self, work: Path) -> None:
        self.repo_dir = work / "restic-repo"
        self.env = {**os.environ, "RESTIC_PASSWORD": PASSWORD, "RESTIC_REPOSITORY": str(self.repo_dir),
                    "RESTIC_CACHE_DIR": str(work / "restic-cache")}
        self._run("init", "--repository-version", "2")

    def _run(self, *args: str) -> None:
        subprocess.run(["restic", "--quiet", *args], env=self.env, check=True, stdout=subprocess.DEVNULL)

    def backup(self, image: Path) -> None:
        self._run("backup", "--host", "bench", str(image))

    def restore(self, target: Path) -> None:
        out = target.parent / "restic-out"
        self._run("restore", "latest", "--target", str(out))
        found = next(p for p in out.rglob(target.name.replace("restored-restic", "disk")) if p.is_file())
        os.replace(found, target)
        shutil.rmtree(out)


class Borg:
    name = "borg"

    def __init__(self, work: Path) -> None:
        self.repo_dir = work / "borg-repo"
        self.env = {**os.environ, "BORG_PASSPHRASE": PASSWORD, "BORG_BASE_DIR": str(work / "borg-home")}
        self.count = 0
        subprocess.run(["borg", "init", "--encryption", "repokey", str(self.repo_dir)], env=self.env, check=True)

    def backup(self, image: Path) -> None:
        self.count += 1
        subprocess.run(["borg", "create", "--compression", "zstd,3", f"{self.repo_dir}::b{self.count}", str(image)],
                       env=self.env, check=True, cwd=image.parent)

    def restore(self, target: Path) -> None:
        out = target.parent / "borg-out"
        out.mkdir()
        subprocess.run(["borg", "extract", f"{self.repo_dir}::b{self.count}"], env=self.env, check=True, cwd=out)
        found = next(p for p in out.rglob("disk.img") if p.is_file())
        os.replace(found, target)
        shutil.rmtree(out)


def main() -> None:
    # The engine's per-blob debug events would drown the figures.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="2GiB", help="image size (e.g. 512MiB, 2GiB)")
    parser.add_argument("--workdir", type=Path, default=None, help="where to put the image and repositories")
    parser.add_argument("--workers", type=int, default=None, help="patchdrill threads per disk (default: engine's)")
    parser.add_argument("--runs", type=int, default=2, help="restores per tool; the best is reported")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="pd-bench-", dir=args.workdir))
    try:
        run(work, size, args.workers, args.runs)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def run(work: Path, size: int, workers: int | None, runs: int) -> None:
    tools: list[Patchdrill | Restic | Borg] = [Patchdrill(work, workers)]
    if shutil.which("restic"):
        tools.append(Restic(work))
    if shutil.which("borg"):
        tools.append(Borg(work))
    image = work / "disk.img"
    print(f"image: {size / MIB:.0f} MiB, block size {BLOCK // MIB} MiB, tools: {', '.join(t.name for t in tools)}")
    make_image(image, size)
    results: dict[str, dict[str, Step]] = {t.name: {} for t in tools}
    for tool in tools:
        results[tool.name]["full"] = timed(tool.repo_dir, lambda t=tool: t.backup(image))
    rewritten = rewrite_one_percent(image, size)
    expected = digest(image)
    for tool in tools:
        results[tool.name]["incremental"] = timed(tool.repo_dir, lambda t=tool: t.backup(image))
    # Restores can be repeated; the best of `runs`, taken in alternating tool order, keeps one
    # tool from paying for whatever else the shared machine was doing at that moment.
    for attempt in range(runs):
        for tool in tools if attempt % 2 == 0 else tools[::-1]:
            target = work / f"restored-{tool.name}.img"
            step = timed(tool.repo_dir, lambda t=tool, p=target: t.restore(p))
            if digest(target) != expected:
                raise SystemExit(f"{tool.name}: the restored image differs from the source")
            target.unlink()
            best = results[tool.name].get("restore")
            results[tool.name]["restore"] = step if best is None or step.seconds < best.seconds else best
    synced = work / "restored-synced.img"
    results["patchdrill"]["restore+fsync"] = timed(tools[0].repo_dir, lambda: tools[0].restore_synced(synced))
    synced.unlink()
    report(results, size, rewritten)


def report(results: dict[str, dict[str, Step]], size: int, rewritten: int) -> None:
    print(f"rewritten before the incremental: {rewritten / MIB:.0f} MiB ({rewritten // BLOCK} blocks)\n")
    print(f"{'tool':<11} {'step':<12} {'seconds':>8} {'MB/s':>8} {'added MiB':>10}")
    for name, steps in results.items():
        for step, r in steps.items():
            print(f"{name:<11} {step:<12} {r.seconds:8.2f} {size / 1e6 / r.seconds:8.0f} {r.added / MIB:10.1f}")
    ours = results["patchdrill"]
    for other in (n for n in results if n != "patchdrill"):
        ratios = ", ".join(f"{step} {ours[step].seconds / results[other][step].seconds:.2f}x"
                           for step in ours if step in results[other])
        print(f"\npatchdrill/{other} time: {ratios}")
    print(f"patchdrill incremental bytes added / rewritten bytes: {ours['incremental'].added / rewritten:.2f}")


if __name__ == "__main__":
    main()
