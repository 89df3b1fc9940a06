"""The backup policy: how often, how, and how long recovery points live.

`configs.models.PatchdrillConfig.backup_policies` maps names to this model, so `config check`
validates policies with the rest of the file. This module imports nothing heavier than pydantic
at import time, so the config schema can reference it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from configs.secrets import check_reference
from tasks.backup.errors import BackupError

if TYPE_CHECKING:
    from tasks.backup.retention import KeepRules

MIB = 1024 * 1024
SnapshotMethod = Literal["auto", "vss", "lvm", "fsfreeze", "none"]


class BackupPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    block_size: int = Field(default=4 * MIB, ge=4096, le=64 * MIB,
                            description="Bytes per block (a power of two). Smaller finds smaller changes; larger keeps maps small.")
    compression_level: int = Field(default=3, ge=1, le=19, description="zstd level; 1-3 keep full backups fast.")
    encryption_key: str | None = Field(default=None, description="Credential reference (env:, file:, prefect-secret:) whose value unlocks the repository. Unset: not encrypted.")
    keep_last: int | None = Field(default=None, ge=1, description="Keep the newest N points of each disk.")
    keep_daily: int | None = Field(default=None, ge=1, description="Keep the newest point of each of the last N days that have one.")
    keep_weekly: int | None = Field(default=None, ge=1, description="...of each of the last N ISO weeks.")
    keep_monthly: int | None = Field(default=None, ge=1, description="...of each of the last N months.")
    prune: bool = Field(default=True, description="Delete unreferenced data after retention.")
    stagger_seconds: float = Field(default=0.0, ge=0, le=3600, description="Delay between host starts, so hosts do not all hit storage at once.")
    max_parallel_hosts: int = Field(default=4, ge=1, le=256, description="Hosts backed up at once.")
    max_parallel_disks: int = Field(default=2, ge=1, le=64, description="Disks of one host backed up at once.")
    workers: int | None = Field(default=None, ge=1, le=64, description="Hash/compress/upload threads per disk (default: CPU count, 2-8).")
    pre_script: str | None = Field(default=None, description="Command run on the host before the snapshot (e.g. flush a database).")
    post_script: str | None = Field(default=None, description="Command run on the host after the snapshot (always, also on failure).")
    rehash: bool = Field(default=False, description="Read and hash every file and block instead of skipping files whose size, mtime, ctime and inode match the previous point (and blocks whose host-side hash does): slower, for a periodic full check (e.g. a weekly policy).")
    snapshot_method: SnapshotMethod = Field(default="auto", description="How to get a consistent view: VSS (Windows), LVM or fsfreeze (Linux), none (crash-consistent).")

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"block_size {value} is not a power of two (e.g. 4194304 for 4 MiB)")
        return value

    @field_validator("encryption_key")
    @classmethod
    def _reference_only(cls, value: str | None) -> str | None:
        return check_reference(value, "encryption_key")

    @property
    def keep(self) -> "KeepRules":
        # Imported here so configs.models can import this module without pulling in the
        # repository, the stores and their SDKs.
        from tasks.backup.retention import KeepRules

        return KeepRules(last=self.keep_last, daily=self.keep_daily, weekly=self.keep_weekly, monthly=self.keep_monthly)


def policy_from_config(policies: dict[str, Any], name: str | None, *, source: str = "config") -> BackupPolicy:
    """The named policy from a config's backup_policies (the default policy when none is configured)."""
    if not name:
        if not policies:
            return BackupPolicy()
        if "default" in policies:
            name = "default"
        elif len(policies) == 1:
            name = next(iter(policies))
        else:
            raise BackupError(f"{source}: several backup policies ({', '.join(sorted(policies))}); choose one with --policy")
    if name not in policies:
        known = ", ".join(sorted(policies)) or "none"
        raise BackupError(f"{source}: no backup policy {name!r} (known: {known})")
    raw = policies[name]
    if isinstance(raw, BackupPolicy):
        return raw
    data = raw.model_dump() if isinstance(raw, BaseModel) else dict(raw)
    try:
        return BackupPolicy.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"backup_policies.{name}.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise BackupError(f"{source}: {problems}") from None
