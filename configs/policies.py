"""The policies of the pipelines: patching (with its rollout quotas and health probes, whose
models live in configs.probes), backup, snapshots and retention.

Plain pydantic and the standard library: `configs.models` validates a whole config file with
these, and every pipeline reads them from here, so importing a policy never loads Prefect, a
transport or a storage SDK.
"""

from __future__ import annotations

import math
import re
from datetime import timedelta
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

from configs.patch_safety import ClockCheck, NoticeHook, UnavailabilityProbing
from configs.probes import ChecksumProbe, Probe
from configs.recovery_point import RecoveryPointGate
from configs.secrets import check_reference

class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------- quotas

_PERCENT = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*%\s*$")


@dataclass(frozen=True)
class Quota:
    """A count ("3") or a share ("25%") of some population, as rollout limits are written.

    Accepts an int, a digit string or "N%" (0 < N <= 100 for shares). The share is resolved
    against the population only when a run knows it (`of`).
    """

    count: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, value: object) -> "Quota":
        if isinstance(value, Quota):
            return value
        if isinstance(value, bool):
            raise ValueError(f"expected a count or a percentage such as '25%', got {value!r}")
        if isinstance(value, int):
            if value < 0:
                raise ValueError(f"a count cannot be negative, got {value}")
            return cls(count=value)
        if isinstance(value, str):
            text = value.strip()
            if text.isdigit():
                return cls(count=int(text))
            match = _PERCENT.match(text)
            if match:
                percent = float(match.group(1))
                if not 0 < percent <= 100:
                    raise ValueError(f"a percentage must be above 0% and at most 100%, got {value!r}")
                return cls(percent=percent)
        raise ValueError(f"expected a count such as 3 or a percentage such as '25%', got {value!r}")

    def of(self, population: int, *, at_least: int = 0) -> int:
        """The absolute number for a population: shares round down (as AWS and Ansible do)."""
        if self.count is not None:
            resolved = self.count
        else:
            assert self.percent is not None
            # The epsilon keeps 3 × 33.333…% from flooring to 0.99999 when the share is exact.
            resolved = math.floor(population * self.percent / 100 + 1e-9)
        return max(at_least, resolved)

    def __str__(self) -> str:
        if self.count is not None:
            return str(self.count)
        assert self.percent is not None
        return f"{self.percent:g}%"

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.no_info_plain_validator_function(
            cls.parse,
            serialization=core_schema.plain_serializer_function_ser_schema(
                lambda quota: quota.count if quota.count is not None else str(quota)
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        return {"anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": r"^\d+(\.\d+)?%$"}]}


# --------------------------------------------------------------------------- classifications


class Classification(str, Enum):
    CRITICAL = "Critical"
    SECURITY = "Security"
    DEFINITION = "Definition"
    UPDATE_ROLLUP = "UpdateRollup"
    FEATURE_PACK = "FeaturePack"
    SERVICE_PACK = "ServicePack"
    TOOLS = "Tools"
    UPDATES = "Updates"
    OTHER = "Other"


class Severity(str, Enum):
    CRITICAL = "Critical"
    IMPORTANT = "Important"
    MODERATE = "Moderate"
    LOW = "Low"
    UNSPECIFIED = "Unspecified"


# --------------------------------------------------------------------------- patch policy


_YEAR_MONTH = re.compile(r"^(\d{4})-(\d{2})$")


class PatchPolicy(_Frozen):
    """What to install, when, how fast and how to tell it worked."""

    classifications: list[Classification] = Field(
        default_factory=lambda: [Classification.CRITICAL, Classification.SECURITY],
        description="Classifications to install.",
    )
    include: list[str] = Field(
        default_factory=list,
        description="KB numbers or package-name masks (fnmatch, e.g. 'openssl*') installed whatever their classification.",
    )
    exclude: list[str] = Field(
        default_factory=list,
        description="KB numbers or package-name masks never installed; wins over include.",
    )
    approve_after_days: int = Field(default=0, ge=0, description="Install an update only once it is this many days old.")
    max_duration_minutes: int = Field(default=120, gt=0, le=24 * 60, description="Stop starting installs on a host after this long.")
    reboot: Literal["IfRequired", "Never", "Always"] = Field(default="IfRequired", description="Reboot policy, decided apart from install success.")
    baseline_months: list[int] = Field(
        default_factory=lambda: [1, 4, 7, 10], description="Months (1-12) of the baseline (rebooting) cumulative updates."
    )
    unplanned_baselines: list[str] = Field(
        default_factory=list, description="'YYYY-MM' months whose hotpatch release is replaced by a baseline."
    )
    hotpatch: bool = Field(default=True, description="Use hotpatch months on hotpatch-eligible hosts "
                           "(Windows Server Azure Edition enrolled for hotpatch).")
    # The hotpatch calendar is a Windows Server Azure Edition feature: every other host gets its
    # updates monthly from its vendor, so holding them for a quarterly baseline must be a choice.
    between_baselines: Literal["all", "security", "wait"] = Field(
        default="all",
        description="What hosts that do not hotpatch (Linux, ordinary Windows, Azure Edition with hotpatch off) "
        "install in a hotpatch month: 'all' (default) every update the policy selects, as in any month; "
        "'security' only Security and Critical ones; 'wait' nothing until the next baseline month.",
    )
    max_concurrency: Quota = Field(default=1, validate_default=True, description="Hosts patched at once within an update domain: a count or 'N%' of the domain.")
    max_errors: Quota = Field(default=0, validate_default=True, description="Failures tolerated before no new batch starts: a count or 'N%' of the run's hosts.")
    pre_hooks: list[str] = Field(default_factory=list, description="Commands run on each host before installing; a failure skips the host.")
    post_hooks: list[str] = Field(default_factory=list, description="Commands run on each host after install and reboot.")
    hook_timeout_seconds: float = Field(default=300.0, gt=0)
    health_probes: list[Probe] = Field(default_factory=list, description="Checks after install/reboot (the probes of configs/probes.py); a failure counts against max_errors.")
    reboot_timeout_minutes: int = Field(default=15, gt=0, description="How long a host may take to go down and come back.")
    approval_required: bool = Field(default=False, description="Pause the run for approval of the assessment before installing.")
    recovery_point: RecoveryPointGate | None = Field(
        default=None, description="No patch without a fresh recovery point of every protected disk (checked, or "
        "taken right before the install), and what a failed health check does: report, or restore that point.")
    unavailability: UnavailabilityProbing = Field(
        default_factory=UnavailabilityProbing,
        description="How each patched host's unavailability is measured: probe interval (the resolution), timeout, settle time.")
    clock: ClockCheck | None = Field(default=None, description="Check each host's clock against the controller's after its "
                                     "install and reboot; unset: not checked.")
    notice: NoticeHook | None = Field(default=None, description="Tell each host (a command on it, a command on the controller "
                                      "or a webhook) before its batch starts and after it ends; it may ask to defer.")

    @field_validator("health_probes")
    @classmethod
    def _no_checksum(cls, value: list[Probe]) -> list[Probe]:
        if any(isinstance(probe, ChecksumProbe) for probe in value):
            raise ValueError("a checksum probe compares a restored copy with its recovery point: it belongs in a recovery plan, not a patch policy")
        return value

    @field_validator("baseline_months")
    @classmethod
    def _months(cls, value: list[int]) -> list[int]:
        bad = [m for m in value if not 1 <= m <= 12]
        if bad:
            raise ValueError(f"baseline months must be 1-12, got {bad}")
        return sorted(set(value))

    @field_validator("unplanned_baselines")
    @classmethod
    def _year_months(cls, value: list[str]) -> list[str]:
        for item in value:
            match = _YEAR_MONTH.match(item)
            if not match or not 1 <= int(match.group(2)) <= 12:
                raise ValueError(f"unplanned baseline {item!r} is not a month written 'YYYY-MM'")
        return sorted(set(value))


# --------------------------------------------------------------------------- backup policy


@dataclass(frozen=True)
class KeepRules:
    last: int | None = None
    daily: int | None = None
    weekly: int | None = None
    monthly: int | None = None

    @property
    def keeps_everything(self) -> bool:
        return not any((self.last, self.daily, self.weekly, self.monthly))



MIB = 1024 * 1024
SnapshotMethod = Literal["auto", "vss", "lvm", "fsfreeze", "none"]


class SnapshotPolicy(BaseModel):
    """How a disk's consistent view is taken. Plain data: a UI form and a CLI option set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: SnapshotMethod = Field(
        default="auto", description="auto: VSS on Windows; LVM, else a reflink clone, else none on Linux.")
    pre_script: str | None = Field(
        default=None, description="Command run on the host before the snapshot (e.g. flush and lock a database). "
        "Exit 0 within script_timeout makes the point application-consistent.")
    post_script: str | None = Field(
        default=None, description="Command run on the host after the snapshot; always runs once the pre-script ran.")
    script_timeout: float = Field(default=300, gt=0, le=86400, description="Seconds each of pre_script and post_script may run.")
    lvm_snapshot_size: str = Field(
        default="10%ORIGIN", pattern=r"^(\d+(\.\d+)?[bBsSkKmMgGtTpPeE]?|\d+%(ORIGIN|VG|FREE|PVS))$",
        description="Copy-on-write space for an LVM snapshot: a size (lvcreate -L, e.g. 2G) or extents (-l, e.g. 10%ORIGIN).")
    fallback: bool = Field(
        default=True, description="When a step fails, continue at the next lower consistency level (recorded in the "
        "point's notes) instead of failing the backup.")
    freeze_limit: float = Field(
        default=3600, gt=0, le=86400, description="fsfreeze only: the host thaws the file system on its own after this "
        "many seconds, so a lost controller cannot hang its writers for ever.")

    @classmethod
    def of(cls, policy: "SnapshotPolicy | BackupPolicy") -> "SnapshotPolicy":
        """A SnapshotPolicy as is, or a backup policy's (its `snapshot:` block with the flat
        shorthands applied)."""
        if isinstance(policy, cls):
            return policy
        if not isinstance(policy, BackupPolicy):
            raise TypeError(f"expected a SnapshotPolicy or a backup policy, not {type(policy).__name__}")
        return policy.snapshot_settings


class KeptClones(BaseModel):
    """Reflink clones of image files kept on their host after a backup: the next backup compares
    extent maps with the newest one instead of reading the disk (changed-block tracking), and a
    restore of a point whose clone is still there clones it back (the instant-restore tier)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    points: int = Field(default=1, ge=1, le=30, description="Keep the clones of each disk's newest N points "
                        "(1: only what changed-block tracking needs; more: an instant-restore tier of N points).")
    days: float = Field(default=2, gt=0, le=30, description="...and none older than this many days "
                        "(Azure Backup's instant restore keeps 1-5).")
    space_limit: ByteSize = Field(description="Bytes the kept clones of one host may hold of their own (blocks "
                                  "no live image shares any more), e.g. '20GiB'; the oldest go first when it is "
                                  "exceeded, and no clone is kept where the file system has not this much free.")


#: BackupPolicy's flat shorthands -> the SnapshotPolicy field each stands for.
_SHORTHANDS = {"snapshot_method": "method", "pre_script": "pre_script", "post_script": "post_script"}


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
    pre_script: str | None = Field(default=None, description="Shorthand for snapshot.pre_script.")
    post_script: str | None = Field(default=None, description="Shorthand for snapshot.post_script.")
    max_point_age: timedelta | None = Field(
        default=None, description="Oldest a disk's newest point may be (ISO 8601 duration such as PT26H, or seconds): "
        "the freshness check raises a patchdrill.backup.stale alert for every disk this policy backs up whose newest "
        "point is older, or that has none. Unset: not checked.")
    kept_clones: KeptClones | None = Field(
        default=None, description="Keep the reflink clone a backup read an image file from (XFS, Btrfs) on the "
        "host: changed-block tracking for the next backup and instant restores. Unset: clones are removed and "
        "every backup reads and hashes the whole image.")
    rehash: bool = Field(default=False, description="Read and hash every file and block instead of skipping files whose size, mtime, ctime and inode match the previous point (and blocks whose host-side hash does): slower, for a periodic full check (e.g. a weekly policy).")
    snapshot_method: SnapshotMethod = Field(default="auto", description="Shorthand for snapshot.method.")
    snapshot: SnapshotPolicy | None = Field(
        default=None, description="How each disk's consistent view is taken: method, pre/post scripts and their "
        "timeout, LVM snapshot size, fallback, fsfreeze limit. The flat snapshot_method, pre_script and post_script "
        "are shorthands for three of its fields; giving one both ways with different values is an error.")

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, value: int) -> int:
        if value & (value - 1):
            raise ValueError(f"block_size {value} is not a power of two (e.g. 4194304 for 4 MiB)")
        return value

    @field_validator("max_point_age")
    @classmethod
    def _positive_age(cls, value: timedelta | None) -> timedelta | None:
        if value is not None and value <= timedelta(0):
            raise ValueError("max_point_age must be longer than zero")
        return value

    @field_validator("encryption_key")
    @classmethod
    def _reference_only(cls, value: str | None) -> str | None:
        return check_reference(value, "encryption_key")

    @model_validator(mode="after")
    def _one_way_each(self) -> "BackupPolicy":
        nested = self.snapshot
        if nested is not None:
            # Both ways, each away from its default and different: which one was meant is unknown.
            for flat, value in self._shorthands_given().items():
                field = _SHORTHANDS[flat]
                there = getattr(nested, field)
                if there != SnapshotPolicy.model_fields[field].default and there != value:
                    raise ValueError(f"{flat} {value!r} conflicts with snapshot.{field} {getattr(nested, field)!r}: "
                                     f"set it in one place (snapshot.{field})")
        return self

    @property
    def snapshot_settings(self) -> SnapshotPolicy:
        """The snapshot block with the flat shorthands applied: what take_snapshot receives."""
        given = {_SHORTHANDS[flat]: value for flat, value in self._shorthands_given().items()}
        return (self.snapshot or SnapshotPolicy()).model_copy(update=given)

    def _shorthands_given(self) -> dict[str, Any]:
        # A shorthand at its default says nothing (a policy dumped and read back has them all).
        fields = type(self).model_fields
        return {flat: getattr(self, flat) for flat in _SHORTHANDS if getattr(self, flat) != fields[flat].default}

    @property
    def keep(self) -> KeepRules:
        return KeepRules(last=self.keep_last, daily=self.keep_daily, weekly=self.keep_weekly, monthly=self.keep_monthly)
