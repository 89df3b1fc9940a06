"""Prefect's filesystem lease storage, with a directory per database: what every server patchdrill
starts keeps its concurrency leases in (PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=cli.lease_storage,
cli/server_leases.py).

Prefect's own keeps every lease of a PREFECT_HOME in <PREFECT_HOME>/concurrency_leases, whatever
database the server uses; but one home serves several databases here (the temporary API's
SQLite, `make server DB=postgres`, the demo's database in .lab/). A server revokes every expired
lease it finds, decrementing the limits it names in its own database, so a lease of another
database's limit would be removed there without its slot ever coming back. Leases here go to
<PREFECT_HOME>/concurrency_leases/<database key>/ instead: each server sees its database's leases
only, and every server on the same database (the temporary APIs of commands run together, a
restarted server) sees the same ones.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

from prefect.server.concurrency.lease_storage.filesystem import ConcurrencyLeaseStorage as _FileLeases
from prefect.settings import get_current_settings


@functools.lru_cache(maxsize=8)
def _key(url: str) -> str:
    return hashlib.sha256(url.encode()).hexdigest()[:16]


def database_key() -> str:
    """A short name for the server's database: a hash of its URL, which may hold a password."""
    from prefect.server.database import provide_database_interface

    return _key(str(provide_database_interface().database_config.connection_url))


class ConcurrencyLeaseStorage(_FileLeases):
    """Prefect's filesystem lease storage in the database's own directory."""

    def __init__(self, storage_path: Path | None = None) -> None:
        home = Path(get_current_settings().home).expanduser()
        super().__init__(storage_path or home / "concurrency_leases" / database_key())
