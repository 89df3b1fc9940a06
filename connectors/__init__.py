"""Transports to hosts and stores.

Each transport declares the settings it needs (`LocalSettings`, `SshSettings`, `WinRmSettings`,
beside its connector); `settings_for` maps a host's config onto the one its transport names,
and `connect` opens a connector from it. A connector never sees the rest of the host's config
(maintenance windows, update domains, disks).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Union, cast

from configs.models import HostConfig
from connectors.base import Connector, RetryPolicy, SecretReference
from connectors.local import LocalSettings

if TYPE_CHECKING:
    from connectors.ssh import SshSettings
    from connectors.winrm import WinRmSettings

TransportSettings = Union[LocalSettings, "SshSettings", "WinRmSettings"]


def settings_for(host: HostConfig, base_dir: Path | None = None) -> TransportSettings:
    """The settings of the transport `host` names.

    `base_dir` is the config file's directory: relative key, known_hosts, ssh config and CA
    bundle paths, and relative `file:` references, are read from it (the working directory when
    None). Credentials stay references until a connection reads them.
    """

    def path(value: str | None) -> Path | None:
        if value is None:
            return None
        found = Path(value).expanduser()
        return base_dir / found if not found.is_absolute() and base_dir is not None else found

    def secret(reference: str | None) -> SecretReference | None:
        return SecretReference(reference, base_dir) if reference else None

    if host.transport == "local":
        return LocalSettings(name=host.name)
    if host.transport == "ssh":
        from connectors.ssh import SshSettings

        return SshSettings(
            name=host.name, address=host.address, port=host.port, user=host.user,
            password=secret(host.password), key_file=path(host.ssh_key),
            key_passphrase=secret(host.ssh_key_passphrase), agent=host.ssh_agent,
            known_hosts=path(host.known_hosts), accept_unknown_host_key=host.accept_unknown_host_key,
            ssh_config=path(host.ssh_config), connect_timeout=host.connect_timeout,
        )
    from connectors.winrm import WinRmSettings

    return WinRmSettings(
        name=host.name, address=host.address, port=host.effective_port, user=host.user,
        password=secret(host.password), scheme=host.winrm_scheme, auth=host.winrm_auth,
        ca_bundle=path(host.winrm_ca_bundle), verify_tls=host.winrm_verify_tls,
        allow_insecure_transport=host.allow_insecure_transport, connect_timeout=host.connect_timeout,
    )


def open_connector(settings: TransportSettings, *, retry: RetryPolicy | None = None) -> Connector:
    """The connector of these settings' transport; nothing is opened until the first call."""
    # Dispatched on the name, not the class: naming SshSettings or WinRmSettings here would load
    # paramiko or pywinrm for every host. Each connector checks the type it is handed.
    if settings.transport == "local":
        from connectors.local import LocalConnector

        return LocalConnector(cast(LocalSettings, settings))
    if settings.transport == "ssh":
        from connectors.ssh import SshConnector

        return SshConnector(cast("SshSettings", settings), retry=retry)
    from connectors.winrm import WinRmConnector

    return WinRmConnector(cast("WinRmSettings", settings), retry=retry)


def connect(host: HostConfig, *, base_dir: Path | None = None, retry: RetryPolicy | None = None) -> Connector:
    """A connector for `host` (see settings_for for `base_dir`); nothing is opened until the first call."""
    return open_connector(settings_for(host, base_dir), retry=retry)
