"""Signing upload URLs for a large staged backup: does the work stay linear?

A Windows host's backup gets one write-only SAS URL per changed block, signed batch by batch
(tasks/backup/sources/windows_direct_upload.py). Every log line and error message passes through `redact()`, so what
redaction costs per call must not grow with the URLs signed so far. This signs `--urls` URLs in
the upload's batches and, after each batch, times `redact()` on a message carrying one URL; it
prints the first and last batches and the ratio between them (about 1.0 when the work is linear).

Signing is local (HMAC with the account key), so no storage service is needed.

    uv run python bench/sas_signing.py --urls 30000 --block-size 4096
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import statistics
import sys
import time
import timeit
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    # The bench runs as a script; the project lives one level up.
    sys.path.insert(0, str(REPO_ROOT))

import structlog  # noqa: E402
from azure.storage.blob import ContainerClient  # noqa: E402

from configs.secrets import redact, remembered_count  # noqa: E402
from connectors.stores import AzureBlobStore  # noqa: E402
from tasks.backup.sources.windows_direct_upload import UploadPlan, sign_batch  # noqa: E402

# Azurite's published development key: any key signs the same way.
ACCOUNT_KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
REDACTIONS_PER_BATCH = 200


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--urls", type=int, default=30_000)
    parser.add_argument("--block-size", type=int, default=4096,
                        help="bytes per block; batches hold at most 256 blocks and 256 MiB")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    client = ContainerClient("https://benchaccount.blob.core.windows.net", "repo",
                             credential={"account_name": "benchaccount", "account_key": ACCOUNT_KEY})
    store = AzureBlobStore(client, create_container=False)
    fingerprints = [hashlib.sha256(i.to_bytes(4, "big")).digest() for i in range(args.urls)]
    plan = UploadPlan("bench-host", "c", "staging/bench-host/c/run", args.urls * args.block_size, args.block_size,
                      fingerprints, tuple(range(args.urls)))
    remembered = remembered_count()
    rows: list[tuple[int, int, float, float]] = []
    largest = 0
    started = time.perf_counter()
    signed = 0
    for number, batch in enumerate(plan.batches(), 1):
        begin = time.perf_counter()
        urls = sign_batch(store, plan, batch).urls
        signing = time.perf_counter() - begin
        signed += len(urls)
        largest = max(largest, len(urls))
        message = f"PUT {next(iter(urls.values()))} failed: 503"
        # The best of a few rounds: what redact() costs, not what the shared machine adds.
        redacting = min(timeit.repeat(lambda: redact(message), number=REDACTIONS_PER_BATCH, repeat=5))
        redacting /= REDACTIONS_PER_BATCH
        rows.append((number, signed, signing / len(urls), redacting))
    total = time.perf_counter() - started

    print(f"{args.urls} URLs in {len(rows)} batches of up to {largest}: {total:.2f} s")
    print(f"values redact() compares with: {remembered} before, {remembered_count()} after")
    print(f"{'batch':>6} {'signed':>7} {'ms/URL':>8} {'us/redact':>10}")
    for position, (number, count, per_url, per_redact) in enumerate(rows):
        if 3 <= position < len(rows) - 3:
            if position == 3:
                print(f"{'...':>6}")
            continue
        print(f"{number:>6} {count:>7} {per_url * 1e3:>8.3f} {per_redact * 1e6:>10.1f}")
    # Medians over the first and last tenth of the batches: single batches are noisy on a shared machine.
    tenth = max(1, len(rows) // 10)
    first, last = rows[:tenth], rows[-tenth:]
    for column, what in ((2, "signing"), (3, "redact")):
        ratio = statistics.median(r[column] for r in last) / statistics.median(r[column] for r in first)
        print(f"last/first tenth of the batches, median {what} time: {ratio:.2f}x")


if __name__ == "__main__":
    main()
