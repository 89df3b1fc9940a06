"""Reaching the inventory: which hosts answer, who they are since boot, how far away."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydantic import BaseModel

from configs.models import HostConfig
from configs.secrets import SecretError, redact
from connectors import connect
from connectors.base import ConnectorError, RetryPolicy


class PingResult(BaseModel):
    host: str
    address: str
    transport: str
    reachable: bool
    os: str = ""
    boot_id: str = ""
    rtt_ms: float | None = None
    error: str = ""


def ping_host(host: HostConfig, base_dir: Path | None = None, retry: RetryPolicy | None = None) -> PingResult:
    """One host's answer; an unreachable host is a row with its error, never an exception."""
    row = PingResult(host=host.name, address=host.address, transport=host.transport, reachable=False)
    try:
        with connect(host, base_dir=base_dir, retry=retry) as conn:
            identity = conn.boot_identity()
    except (ConnectorError, SecretError, OSError) as exc:
        return row.model_copy(update={"error": redact(str(exc))})
    return row.model_copy(update={
        "reachable": True, "os": identity.os_name, "boot_id": identity.boot_id,
        "rtt_ms": round(identity.rtt_seconds * 1000, 1),
    })


def ping_hosts(hosts: list[HostConfig], base_dir: Path | None = None, *, parallel: int = 32,
               retry: RetryPolicy | None = None) -> list[PingResult]:
    if not hosts:
        return []
    with ThreadPoolExecutor(max_workers=min(parallel, len(hosts))) as pool:
        return list(pool.map(lambda h: ping_host(h, base_dir, retry), hosts))
