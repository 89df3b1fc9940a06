"""Transports to hosts and stores. `connect` picks the connector a host's config names."""

from __future__ import annotations

from pathlib import Path

from configs.models import HostConfig
from connectors.base import Connector, RetryPolicy


def connect(host: HostConfig, *, base_dir: Path | None = None, retry: RetryPolicy | None = None) -> Connector:
    """A connector for `host`; nothing is opened until the first call."""
    if host.transport == "local":
        from connectors.local import LocalConnector

        return LocalConnector(host)
    if host.transport == "ssh":
        from connectors.ssh import SshConnector

        return SshConnector(host, retry=retry, base_dir=base_dir)
    from connectors.winrm import WinRmConnector

    return WinRmConnector(host, retry=retry, base_dir=base_dir)
