"""The drill ledger on Azure Blob Storage (Azurite): concurrent writers still never overwrite
one another, because each entry is its own blob put with no-overwrite (If-None-Match: *)."""

from __future__ import annotations

import threading

import pytest

from connectors.stores.azure import AzureBlobStore
from tasks.drill.ledger import ClosedEntry, Ledger, NamespaceEntry

pytestmark = pytest.mark.integration


def test_racing_writers_on_azure_keep_every_entry_in_order(azure_store: AzureBlobStore) -> None:
    writers = [Ledger(azure_store, "azure-run") for _ in range(4)]
    barrier = threading.Barrier(len(writers))

    def write(index: int) -> None:
        barrier.wait()
        for n in range(3):
            writers[index].record("namespace", host="dr-1", member=f"m{index}{n}", name=f"pd-m{index}{n}")

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(writers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    Ledger(azure_store, "azure-run").close(12)
    entries = Ledger(azure_store, "azure-run").read()
    assert [entry.seq for entry in entries] == list(range(13))
    assert sorted(e.member for e in entries if isinstance(e, NamespaceEntry)) == sorted(
        f"m{i}{n}" for i in range(4) for n in range(3))
    assert isinstance(entries[-1], ClosedEntry)
