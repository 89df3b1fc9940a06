"""A patch run's inputs: the selected hosts of a config and the policy they follow."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from configs.loader import LoadedConfig, load_config
from configs.models import AzureStorage, HostConfig, LocalStorage
from configs.policies import PatchPolicy
from connectors.stores import BlobStore, open_store

DEFAULT_POLICY = "default"


class RunSetupError(ValueError):
    """The run cannot start: the message names the config file, field or host at fault."""


@dataclass(frozen=True)
class RecordStore:
    """Where a run writes enrollments and history: the storage of the config the flow loaded
    at its start. Tasks receive this, never a config path, so a run reads its config once and
    every task of it sees the same storage even if the file changes meanwhile."""

    storage: LocalStorage | AzureStorage
    base_dir: Path

    def open(self) -> BlobStore:
        return open_store(self.storage, self.base_dir)


@dataclass(frozen=True)
class PatchFleet:
    """The selected hosts, the policy they follow and where records go."""

    loaded: LoadedConfig
    hosts: list[HostConfig]
    policy: PatchPolicy
    policy_name: str

    @property
    def base_dir(self) -> Path:
        return self.loaded.base_dir

    @property
    def records(self) -> RecordStore:
        return RecordStore(self.loaded.config.storage, self.base_dir)


def resolve_policy(loaded: LoadedConfig, name: str | None, groups: list[str] | None) -> tuple[str, PatchPolicy]:
    """The named policy, else the one named after the single selected group, else 'default',
    else the built-in defaults (the config loader has already validated every policy)."""
    policies = loaded.config.patch_policies
    if name is not None and name not in policies:
        known = ", ".join(sorted(policies)) or "none"
        raise RunSetupError(f"{loaded.path}: patch_policies: no policy named {name!r} (defined: {known})")
    if name is None:
        candidates = [*(groups if groups and len(groups) == 1 else []), DEFAULT_POLICY]
        name = next((c for c in candidates if c in policies), None)
    if name is None:
        return "built-in defaults", PatchPolicy()
    return name, policies[name]


def load_fleet(config_path: str, groups: list[str] | None, hosts: list[str] | None, policy: str | None) -> PatchFleet:
    return select_fleet(load_config(Path(config_path)), groups, hosts, policy)


def select_fleet(loaded: LoadedConfig, groups: list[str] | None, hosts: list[str] | None,
                 policy: str | None) -> PatchFleet:
    """The run's hosts and policy from a config already loaded (RunSetupError names the fault)."""
    try:
        selected = loaded.config.select(groups, hosts)
    except KeyError as exc:
        raise RunSetupError(f"{loaded.path}: {exc.args[0]}") from None
    if not selected:
        raise RunSetupError(f"{loaded.path}: no host matches groups={groups or 'any'} hosts={hosts or 'any'}")
    name, resolved = resolve_policy(loaded, policy, groups)
    return PatchFleet(loaded=loaded, hosts=selected, policy=resolved, policy_name=name)
