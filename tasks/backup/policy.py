"""Which backup policy a run uses: the named one from a config's backup_policies.

The policy model itself is `configs.policies.BackupPolicy`, validated with the rest of the file.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError

from configs.policies import BackupPolicy
from tasks.backup.errors import BackupError


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
