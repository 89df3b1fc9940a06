"""The snapshot's host side: the helper scripts, the user's pre- and post-scripts, and carrying
out a snapshot's removal steps and checks over a connector.

The helpers are host_scripts/linux_snapshot.sh (one action per call, `key=value` lines out) and
vss_snapshot.ps1 / vss_remove.ps1 (one JSON line out).
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any, Literal

import structlog

from configs.models import DiskConfig, HostConfig
from configs.policies import SnapshotPolicy
from configs.secrets import redact
from connectors.base import CommandResult, Connector, HostTimeout, last_lines
from tasks.backup.snapshot.view import HostCheck, RemovalStep, Snapshot, SnapshotError, SnapshotRecord

log = structlog.stdlib.get_logger("patchdrill.backup")

_HOST_SCRIPTS = Path(__file__).parents[1] / "host_scripts"
LINUX_SCRIPT = _HOST_SCRIPTS / "linux_snapshot.sh"
VSS_SCRIPT = _HOST_SCRIPTS / "vss_snapshot.ps1"
VSS_REMOVE_SCRIPT = _HOST_SCRIPTS / "vss_remove.ps1"
#: Seconds for the snapshot helpers themselves (lvcreate, mount, VSS with its writers).
HELPER_TIMEOUT = 900.0
#: Grace after SIGTERM before `timeout` kills a user script that ignores it.
_KILL_GRACE = 10
#: Exit codes of linux_snapshot.sh.
_EXIT_INVALID, _EXIT_NOT_APPLICABLE = 3, 4


class NotApplicable(Exception):
    """The method cannot work for this disk (not on an LV, no reflink): not a transport fault."""


class SnapshotHost:
    """One snapshot's calls to its host."""

    def __init__(self, connector: Connector, host: HostConfig, disk: DiskConfig, policy: SnapshotPolicy,
                 snapshot_id: str) -> None:
        self.connector = connector
        self.host = host
        self.disk = disk
        self.policy = policy
        self.snapshot_id = snapshot_id
        self.log = log.bind(host=host.name, disk=disk.name, snapshot_id=snapshot_id)

    def error(self, message: str) -> SnapshotError:
        return SnapshotError(self.host.name, self.disk.name, message)

    # -- removal steps and checks, as the snapshot's record names them -----------------------

    def run_step(self, step: RemovalStep) -> None:
        if step.action == "linux":
            self.linux_must(step.args[0], list(step.args[1:]))
        elif step.action == "thaw":
            self.thaw(step.args[0])
        elif step.action == "vss-remove":
            self.vss_remove(step.args[0])
        else:
            self.user_script_or_raise("post")

    def check(self, check: HostCheck) -> None:
        if check.action == "linux":
            self.linux_must(check.args[0], list(check.args[1:]))
        else:
            self.vss_check(check.args[0])

    def thaw(self, mount: str) -> None:
        out = self.linux_must("thaw", [self.snapshot_id, mount])
        if out.get("thawed_early"):
            self.log.error("snapshot.thawed_early", mount=mount, at=out["thawed_early"],
                           freeze_limit=self.policy.freeze_limit)

    def vss_remove(self, shadow_id: str) -> None:
        result = self.connector.run_script(VSS_REMOVE_SCRIPT, ["-ShadowId", shadow_id, "-SnapshotId", self.snapshot_id],
                                           timeout=HELPER_TIMEOUT)
        if not result.ok:
            raise self.error(f"{VSS_REMOVE_SCRIPT.name} exited {result.exit_code}: {_said(result) or 'no error text'}")
        self.json_line(result, VSS_REMOVE_SCRIPT.name)

    def vss_check(self, shadow_id: str) -> None:
        result = self.connector.run_script(VSS_REMOVE_SCRIPT, ["-ShadowId", shadow_id, "-CheckOnly"], timeout=HELPER_TIMEOUT)
        if not result.ok:
            raise self.error(f"cannot check shadow copy {shadow_id}: {_said(result) or f'exit {result.exit_code}'}")
        if self.json_line(result, VSS_REMOVE_SCRIPT.name).get("shadow") != "present":
            raise self.error(f"shadow copy {shadow_id} is gone (VSS deletes copies whose diff area fills up): "
                             "the data read from it cannot be trusted")

    def linux(self, action: str, args: list[str]) -> dict[str, str]:
        """Run one linux_snapshot.sh action; its key=value lines as a dict."""
        result = self.connector.run_script(LINUX_SCRIPT, [action, *args], timeout=HELPER_TIMEOUT)
        if result.exit_code == _EXIT_NOT_APPLICABLE:
            raise NotApplicable(_said(result))
        if not result.ok:
            what = "no longer holds" if result.exit_code == _EXIT_INVALID else f"{action} failed (exit {result.exit_code})"
            raise self.error(f"snapshot {self.snapshot_id} {what}: {_said(result) or 'no error text'}")
        pairs = (line.partition("=") for line in result.stdout.splitlines() if "=" in line)
        return {key: value for key, _, value in pairs}

    def linux_must(self, action: str, args: list[str]) -> dict[str, str]:
        try:
            return self.linux(action, args)
        except NotApplicable as exc:
            raise self.error(f"{action}: {exc}") from None

    def json_line(self, result: CommandResult, script: str) -> dict[str, Any]:
        lines = [line for line in result.stdout.splitlines() if line.strip()]
        try:
            report = json.loads(lines[-1]) if lines else None
        except json.JSONDecodeError:
            report = None
        if not isinstance(report, dict):
            raise self.error(f"{script} printed no JSON report: {redact(last_lines(result.stdout, 5)) or 'nothing'}")
        return report

    def user_script(self, phase: Literal["pre", "post"], command: str) -> str | None:
        """Run the pre- or post-script; None when it succeeded, else why not (secret-free)."""
        timeout = self.policy.script_timeout
        env = {"PATCHDRILL_PHASE": phase, "PATCHDRILL_HOST": self.host.name, "PATCHDRILL_DISK": self.disk.name,
               "PATCHDRILL_DISK_PATH": self.disk.path, "PATCHDRILL_SNAPSHOT_ID": self.snapshot_id}
        if self.host.os_family == "linux":
            # `timeout` on the host stops the script itself; the connector's own limit, a little
            # longer, only guards against a host that stops answering.
            wire = f"timeout -k {_KILL_GRACE} {timeout:g} sh -c {shlex.quote(command)}"
            limit = timeout + _KILL_GRACE + 30
        else:
            wire, limit = command, timeout
        self.log.info("snapshot.script", phase=phase, timeout=timeout)
        try:
            result = self.connector.run(wire, timeout=limit, env=env)
        except HostTimeout:
            return f"{phase}-script timed out after {timeout:g}s"
        if result.ok:
            return None
        if self.host.os_family == "linux" and result.exit_code in (124, 137):
            return f"{phase}-script timed out after {timeout:g}s and was stopped"
        return f"{phase}-script exited {result.exit_code}" + (f": {_said(result)}" if result.stderr.strip() else "")

    def user_script_or_raise(self, phase: Literal["pre", "post"]) -> None:
        command = self.policy.post_script if phase == "post" else self.policy.pre_script
        if command:
            failure = self.user_script(phase, command)
            if failure:
                raise self.error(failure)



def attach(record: SnapshotRecord, connector: Connector, host: HostConfig, disk: DiskConfig,
           policy: SnapshotPolicy) -> Snapshot:
    """A live handle on a snapshot taken earlier (by another task, over another connection):
    `remove()` and `verify()` work on it as on the one take_snapshot returned."""
    return Snapshot(host=record.host, disk=record.disk, read_path=record.read_path, consistency=record.consistency,
                    method=record.method, notes=list(record.notes), snapshot_id=record.snapshot_id,
                    details=dict(record.details), taken_at=record.taken_at, _steps=list(record.removal),
                    _check=record.check, _runner=SnapshotHost(connector, host, disk, policy, record.snapshot_id))


def _said(result: CommandResult) -> str:
    """The tail of what a failed helper printed, with any secret it echoed redacted."""
    return redact(result.tail())
