"""The pydantic schema of a patchdrill configuration: inventory, storage, policies, plans.

One declaration gives validation, the JSON Schema (`patchdrill config schema`) and the field
documentation (each Field's description). Credentials are references, never literals.
"""

from __future__ import annotations

import re
from datetime import time
from typing import Annotated, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from configs.alerts import AlertsConfig
from configs.errors import field_error
from configs.plans import RecoveryPlan, plan_problems
from configs.policies import BackupPolicy, PatchPolicy
from configs.recovery_point import gate_problems
from configs.secrets import REFERENCES_FROM, SecretError, check_reference, is_loopback, parse_reference, resolve

_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


CredentialRef = Annotated[
    str,
    Field(description="A secret reference: env:NAME, file:PATH or prefect-secret:BLOCK. Never the secret itself."),
]


class MaintenanceWindow(Strict):
    """A weekly window in the host's own time zone. A window may cross midnight."""

    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = Field(
        default_factory=lambda: list(_DAYS), description="Days the window opens on (host time zone)."
    )
    start: time = Field(description="Opening time, HH:MM, host local time.")
    duration_minutes: int = Field(gt=0, le=7 * 24 * 60, description="How long the window stays open.")


class HostConfig(Strict):
    name: str = Field(pattern=_NAME, description="Unique host name used in logs, points and reports.")
    address: str = Field(default="localhost", description="DNS name or IP the transport connects to.")
    transport: Literal["local", "ssh", "winrm"] = Field(description="How patchdrill reaches the host.")
    port: int | None = Field(default=None, ge=1, le=65535, description="Default: 22 (ssh), 5986 (winrm https), 5985 (winrm http).")
    user: str | None = Field(default=None, description="Login user (ssh, winrm).")
    password: CredentialRef | None = Field(default=None, description="Password reference (ssh password auth, winrm).")
    ssh_key: str | None = Field(default=None, description="Path to a private key file (ssh).")
    ssh_key_passphrase: CredentialRef | None = Field(default=None, description="Reference to the key's passphrase.")
    ssh_agent: bool = Field(default=True, description="Try keys from the SSH agent (ssh).")
    known_hosts: str | None = Field(default=None, description="known_hosts file to verify the host key against (default ~/.ssh/known_hosts).")
    accept_unknown_host_key: bool = Field(default=False, description="Accept and record an unknown host key (never a changed one). Off by default.")
    ssh_config: str | None = Field(
        default=None,
        description="OpenSSH client config to read HostName, Port, User, IdentityFile and ProxyJump from (default ~/.ssh/config); the host's own fields win.",
    )
    winrm_scheme: Literal["https", "http"] = Field(default="https", description="WinRM endpoint scheme.")
    winrm_auth: Literal["ntlm", "kerberos", "credssp", "basic"] = Field(default="ntlm", description="WinRM authentication.")
    winrm_ca_bundle: str | None = Field(default=None, description="CA bundle to validate the WinRM HTTPS certificate.")
    winrm_verify_tls: bool = Field(default=True, description="Validate the WinRM server certificate (https).")
    allow_insecure_transport: bool = Field(
        default=False,
        description="Permit basic or NTLM without message encryption over plain HTTP. Off by default: credentials and data would cross the network readable.",
    )
    connect_timeout: float = Field(default=15.0, gt=0, description="Seconds to wait for a connection.")
    os_family: Literal["linux", "windows"] = Field(default="linux", description="Operating system family.")
    timezone: str = Field(default="UTC", description="IANA time zone of the host (maintenance windows are in it).")
    update_domain: int = Field(default=0, ge=0, description="Hosts in one update domain may be patched together; never two domains at once.")
    groups: list[str] = Field(default_factory=list, description="Groups the host belongs to (select with --group).")
    tags: dict[str, str] = Field(default_factory=dict, description="Free-form labels.")
    maintenance_windows: list[MaintenanceWindow] = Field(default_factory=list, description="When installs and reboots may happen. Empty: never, unless the run overrides.")
    disks: list["DiskConfig"] = Field(default_factory=list, description="What a backup run protects on this host.")

    @field_validator("password", "ssh_key_passphrase")
    @classmethod
    def _reference_only(cls, value: str | None, info) -> str | None:  # type: ignore[no-untyped-def]
        return check_reference(value, info.field_name)

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}: use an IANA name such as 'Europe/Paris'") from None
        return value

    @model_validator(mode="after")
    def _transport_rules(self) -> "HostConfig":
        if self.transport == "winrm":
            if self.os_family != "windows":
                raise ValueError("transport 'winrm' needs os_family: windows")
            insecure = self.winrm_scheme == "http" and self.winrm_auth == "basic"
            if insecure and not self.allow_insecure_transport:
                raise ValueError(
                    "winrm basic authentication over plain http sends the password readable: use "
                    "winrm_scheme: https, or set allow_insecure_transport: true for a lab"
                )
        if self.transport in ("ssh", "winrm") and not self.user:
            raise ValueError(f"transport {self.transport!r} needs a user")
        return self

    @property
    def effective_port(self) -> int:
        if self.port:
            return self.port
        if self.transport == "winrm":
            return 5986 if self.winrm_scheme == "https" else 5985
        return 22


class DiskConfig(Strict):
    name: str = Field(pattern=_NAME, description="Disk name in recovery points (e.g. 'os', 'data').")
    path: str = Field(description="Block device, image file or directory on the host.")
    kind: Literal["auto", "block", "directory"] = Field(default="auto", description="block: device or image file; directory: a file tree.")


class LocalStorage(Strict):
    kind: Literal["local"] = "local"
    path: str = Field(description="Directory of the repository (relative paths are relative to the config file).")


class AzureStorage(Strict):
    kind: Literal["azure"] = "azure"
    container: str = Field(pattern=r"^[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])$", description="Blob container (created when missing).")
    connection_string: CredentialRef | None = Field(default=None, description="Reference to a storage connection string.")
    account_url: str | None = Field(default=None, description="https://ACCOUNT.blob.core.windows.net (with account_key or DefaultAzureCredential).")
    account_key: CredentialRef | None = Field(default=None, description="Reference to the account key (with account_url).")
    prefix: str = Field(default="", description="Key prefix inside the container, to share one container.")
    allow_insecure_transport: bool = Field(
        default=False,
        description="Permit a plain http:// blob endpoint (account_url, or a connection string's BlobEndpoint or "
                    "DefaultEndpointsProtocol) on another machine, such as a lab's Azurite emulator (labs only). "
                    "Off by default: backups and signed requests would cross the network readable. A loopback "
                    "endpoint (127.0.0.1, ::1, localhost) never crosses a network and needs no flag.",
    )

    @field_validator("connection_string", "account_key")
    @classmethod
    def _reference_only(cls, value: str | None, info) -> str | None:  # type: ignore[no-untyped-def]
        return check_reference(value, info.field_name)

    @model_validator(mode="after")
    def _one_way_in(self, info: ValidationInfo) -> "AzureStorage":
        if bool(self.connection_string) == bool(self.account_url):
            raise ValueError("set exactly one of connection_string or account_url")
        if self.account_url is not None:
            url = urlsplit(self.account_url)
            if url.scheme not in ("https", "http") or not url.hostname:
                raise field_error("account_url", "invalid_url", "must be a URL such as https://ACCOUNT.blob.core.windows.net")
            if self._readable_on_the_wire(url.scheme, url.hostname):
                raise field_error("account_url", "insecure_transport", f"plain http {_INSECURE}")
        elif isinstance(info.context, dict) and REFERENCES_FROM in info.context:
            # The string is behind a reference, looked at when the loader passes the config's
            # directory. A Prefect Secret needs the API: the store checks that one as it opens.
            assert self.connection_string is not None
            text = None
            if parse_reference(self.connection_string)[0] != "prefect-secret":
                try:
                    text = resolve(self.connection_string, base_dir=info.context[REFERENCES_FROM])
                except SecretError:
                    pass  # not this check's fault: opening the store names the missing secret
            problem = self.connection_string_problem(text) if text else None
            if problem:
                raise field_error("connection_string", "insecure_transport", problem)
        return self

    def connection_string_problem(self, text: str) -> str | None:
        """Why a resolved connection string must not be used (a plain http blob endpoint on
        another machine, without the lab flag), or None. Never repeats the string: it holds a key."""
        fields = {name.strip().lower(): value.strip() for name, _, value in
                  (part.partition("=") for part in text.split(";") if part.strip())}
        if fields.get("usedevelopmentstorage", "").lower() == "true":
            return None  # the SDK's shorthand for Azurite on 127.0.0.1
        endpoint = fields.get("blobendpoint")
        if endpoint:
            url = urlsplit(endpoint)
            scheme, host = url.scheme.lower(), url.hostname or ""
        else:
            scheme, host = fields.get("defaultendpointsprotocol", "https").lower(), "blob.core.windows.net"
        if self._readable_on_the_wire(scheme, host):
            return f"its blob endpoint is plain http, which {_INSECURE}"
        return None

    def _readable_on_the_wire(self, scheme: str, host: str) -> bool:
        return scheme == "http" and not self.allow_insecure_transport and not is_loopback(host)


_INSECURE = ("would send backups and signed requests readable: use https, or set allow_insecure_transport: true "
             "for a lab emulator such as Azurite")


StorageConfig = Annotated[LocalStorage | AzureStorage, Field(discriminator="kind")]


class PatchdrillConfig(Strict):
    version: Literal[1] = Field(default=1, description="Config format version.")
    storage: StorageConfig
    hosts: list[HostConfig] = Field(default_factory=list)
    patch_policies: dict[str, PatchPolicy] = Field(default_factory=dict)
    backup_policies: dict[str, BackupPolicy] = Field(default_factory=dict)
    recovery_plans: dict[str, RecoveryPlan] = Field(
        default_factory=dict, description="DR drills: named recovery plans (`patchdrill drill run NAME`).")
    alerts: AlertsConfig | None = Field(
        default=None, description="Where failed runs, missed RTO/RPO targets and stale recovery points are announced "
                                  "besides Prefect events: a Slack- or Teams-compatible webhook.")

    @field_validator("hosts")
    @classmethod
    def _unique_hosts(cls, hosts: list[HostConfig]) -> list[HostConfig]:
        # Raised as a ValidationError so each problem carries its own path (hosts[3].name), and
        # so its own line: pydantic prefixes the path and keeps it, where a plain ValueError
        # would point at the whole list.
        first: dict[str, int] = {}
        problems: list[InitErrorDetails] = []
        for index, host in enumerate(hosts):
            if host.name in first:
                problems.append(InitErrorDetails(
                    type=PydanticCustomError("duplicate_host", "host name '{name}' appears twice; first at hosts[{first}]",
                                             {"name": host.name, "first": first[host.name]}),
                    loc=(index, "name"), input=host.name))
            else:
                first[host.name] = index
        if problems:
            raise ValidationError.from_exception_data("hosts", problems)
        return hosts

    @field_validator("recovery_plans")
    @classmethod
    def _plans_match_inventory(cls, plans: dict[str, RecoveryPlan], info: ValidationInfo) -> dict[str, RecoveryPlan]:
        problems = [InitErrorDetails(type=PydanticCustomError("plan_name", "plan name {name!r} must be letters, digits, "
                                                              "'.', '_' or '-' (it names limits and keys)", {"name": name}),
                                     loc=(name,), input=name)
                    for name in plans if not re.match(_NAME, name)]
        if "hosts" in info.data:  # else the hosts failed validation and are reported already
            base_dir = info.context.get(REFERENCES_FROM) if isinstance(info.context, dict) else None
            problems += plan_problems(plans, info.data["hosts"], base_dir)
        if problems:
            raise ValidationError.from_exception_data("recovery_plans", problems)
        return plans

    @model_validator(mode="after")
    def _recovery_points_can_work(self) -> "PatchdrillConfig":
        problems = gate_problems(self.patch_policies, self.hosts, set(self.backup_policies))
        if problems:
            raise ValidationError.from_exception_data("patch_policies", problems)
        return self

    def select(self, groups: list[str] | None = None, names: list[str] | None = None) -> list[HostConfig]:
        chosen = [h for h in self.hosts if (not groups or set(groups) & set(h.groups)) and (not names or h.name in names)]
        if names:
            missing = sorted(set(names) - {h.name for h in self.hosts})
            if missing:
                raise KeyError(f"no such host: {', '.join(missing)}")
        return chosen


HostConfig.model_rebuild()

__all__ = [
    "AlertsConfig", "AzureStorage", "BackupPolicy", "CredentialRef", "DiskConfig", "HostConfig", "LocalStorage",
    "MaintenanceWindow", "PatchPolicy", "PatchdrillConfig", "RecoveryPlan", "StorageConfig",
]
