"""The drill ledger on Azure Blob Storage (Azurite): concurrent writers still never overwrite
one another, because each entry is its own blob put with no-overwrite (If-None-Match: *)."""

from __future__ import annotations

import pytest

from connectors.stores.azure import AzureBlobStore
from tasks.drill.ledger import ClosedEntry, Ledger
from tests.unit.test_drill_ledger import race_writers

pytestmark = pytest.mark.integration


def test_racing_writers_on_azure_keep_every_entry_in_order(azure_store: AzureBlobStore) -> None:
    race_writers(azure_store, "azure-run", writers=4, each=3)
    Ledger(azure_store, "azure-run").close(12)
    entries = Ledger(azure_store, "azure-run").read()
    assert isinstance(entries[-1], ClosedEntry) and entries[-1].seq == 12
