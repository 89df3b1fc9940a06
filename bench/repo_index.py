"""A backup's cost as the repository grows: with the chunk index it should not follow the number
of stored chunks (docs/repository.md, *Index*).

For each size in `--chunks`, a fresh local repository gets that many stored chunks (other
disks' data, written straight into the store without fsync to save setup time, and indexed as
prune leaves them: one index file), then one disk (`--disk-mib`, 1 MiB blocks) is backed up in
full and its incremental after rewriting one block is timed (best of `--runs`). Beside it, what
every backup paid before the index: listing chunks/ with a stat per file (`chunk_ids()`).

On Azurite (started from node_modules, as the tests do), the same incremental's list requests
are counted as they leave the SDK at each of `--azure-chunks`, with the requests a listing of
chunks/ would take.

    uv run python bench/repo_index.py --chunks 1000 100000 --azure-chunks 1000 10000 --runs 5
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # The bench runs as a script; the project lives one level up.
    sys.path.insert(0, str(REPO_ROOT))

import structlog  # noqa: E402

from connectors.stores import AzureBlobStore, BlobStore, LocalBlobStore  # noqa: E402
from tasks.backup.engine import BackupRequest, backup  # noqa: E402
from tasks.backup.repo.repository import Repository, chunk_key  # noqa: E402
from tasks.backup.sources.local import LocalBlockSource  # noqa: E402

BLOCK = 1024 * 1024


def _filler(n: int) -> bytes:
    return n.to_bytes(8, "big") * 16


def _fill_local(repo: Repository, root: Path, count: int) -> None:
    ids = set()
    for n in range(count):
        data = _filler(n)
        chunk_id = repo.codec.chunk_id(data)
        path = root / chunk_key(chunk_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(repo.codec.encode(chunk_id, data))
        ids.add(chunk_id)
    repo.write_index(ids)


def _fill_store(repo: Repository, count: int) -> None:
    def put(n: int) -> bytes:
        data = _filler(n)
        chunk_id = repo.codec.chunk_id(data)
        repo.put_chunk(chunk_id, data)
        return chunk_id

    with ThreadPoolExecutor(max_workers=8) as pool:
        repo.write_index(set(pool.map(put, range(count))))


def _incremental(repo: Repository, image: Path, runs: int) -> float:
    request = BackupRequest(host="bench", disk="data", block_size=BLOCK, workers=2)
    backup(repo, LocalBlockSource(image), request)
    best = float("inf")
    for run in range(runs):
        with open(image, "r+b") as handle:
            handle.seek((run % 8) * BLOCK)
            handle.write(random.Random(run + 1000).randbytes(BLOCK))
        started = time.perf_counter()
        backup(repo, LocalBlockSource(image), request)
        best = min(best, time.perf_counter() - started)
    return best


def _listing_seconds(repo: Repository) -> float:
    started = time.perf_counter()
    repo.chunk_ids()
    return time.perf_counter() - started


def local(sizes: list[int], disk_mib: int, runs: int, workdir: Path) -> None:
    print(f"local store, {disk_mib} MiB disk, incremental after rewriting one 1 MiB block (best of {runs})")
    print(f"{'stored chunks':>14} {'backup s':>9} {'listing chunks/ s':>18}")
    times = []
    for count in sizes:
        root = workdir / f"local-{count}"
        store = LocalBlobStore(root)
        repo = Repository.open(store, create=True)
        _fill_local(repo, root, count)
        image = workdir / f"disk-{count}.img"
        rng = random.Random(1)
        image.write_bytes(b"".join(rng.randbytes(BLOCK) for _ in range(disk_mib)))
        seconds = _incremental(repo, image, runs)
        times.append(seconds)
        print(f"{count:>14,} {seconds:>9.3f} {_listing_seconds(repo):>18.3f}")
    print(f"largest / smallest: {times[-1] / times[0]:.2f}x")


def azure(sizes: list[int], workdir: Path) -> None:
    from azure.storage.blob import ContainerClient

    from tests.hosts.azurite import ListRequests, start_azurite, stop_process

    process, server = start_azurite(workdir)
    try:
        print("Azurite: list requests of one incremental backup (one block rewritten)")
        print(f"{'stored chunks':>14} {'list requests':>14} {'of them chunks/':>16} {'listing chunks/ alone':>22}")
        for count in sizes:
            calls = ListRequests()
            container = ContainerClient.from_connection_string(server.connection_string, f"bench-{count}",
                                                               raw_request_hook=calls)
            container.create_container()
            store: BlobStore = AzureBlobStore(container)
            repo = Repository.open(store, create=True)
            _fill_store(repo, count)
            image = workdir / f"azure-{count}.img"
            image.write_bytes(random.Random(1).randbytes(8 * BLOCK))
            _incremental(repo, image, 0)
            with open(image, "r+b") as handle:
                handle.write(random.Random(7).randbytes(BLOCK))
            calls.prefixes.clear()
            backup(repo, LocalBlockSource(image), BackupRequest(host="bench", disk="data", block_size=BLOCK, workers=2))
            during = list(calls.prefixes)
            calls.prefixes.clear()
            repo.chunk_ids()
            print(f"{count:>14,} {len(during):>14} {sum(p.startswith('chunks/') for p in during):>16} "
                  f"{len(calls.prefixes):>22}")
            container.delete_container()
    finally:
        stop_process(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, nargs="+", default=[1000, 100_000])
    parser.add_argument("--azure-chunks", type=int, nargs="*", default=[1000, 10_000])
    parser.add_argument("--disk-mib", type=int, default=64)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    with tempfile.TemporaryDirectory(prefix="patchdrill-bench-index-", dir=args.workdir) as tmp:
        local(args.chunks, args.disk_mib, args.runs, Path(tmp))
        if args.azure_chunks:
            azure(args.azure_chunks, Path(tmp))


if __name__ == "__main__":
    main()
