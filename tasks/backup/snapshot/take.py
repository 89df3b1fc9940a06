"""Step 1 and step 5 of a backup run: take a consistent view of a disk, and always remove it.

    with take_snapshot(connector, host, disk, policy) as snap:
        back_up(snap.read_path)          # record snap.consistency, snap.method, snap.notes
    # leaving the block removed the snapshot, also when the backup failed

Consistency levels (DESIGN.md, *Backup consistency levels*), and what earns each one:

* **application-consistent**: everything meant to quiesce the applications succeeded and a
  point-in-time view was taken while they were quiet. On Windows that is VSS with every writer
  stable (and the pre-script, when one is configured). On Linux it is a configured pre-script
  that exited 0 within its timeout; as with Azure Backup's Linux pre/post scripts, patchdrill
  trusts the script to have quiesced the application. With no snapshot method on Linux the
  post-script is held back until removal, so the application stays quiet for the whole read.
* **file-system-consistent**: a point-in-time view of a flushed file system, with nothing (or
  nothing that succeeded) quiescing the applications: VSS without writers, an LVM snapshot (LVM
  suspends the device, which freezes the file system on it), a reflink clone of an image file,
  or a file system held frozen for the whole read.
* **crash-consistent**: what a power cut would leave, at best. The host is off (its disk is at
  rest), or no snapshot could be taken and the disk is read live.

Methods on Linux, and why they work the way they do:

* ``lvm``: ``lvcreate -s`` of the logical volume under the disk; a block disk is read from the
  snapshot device, a file or folder from the snapshot mounted read-only. ``verify()`` fails
  when the snapshot overflowed (LVM invalidates it, and what it held can no longer be trusted).
* reflink (chosen by ``auto`` for an image file on XFS or Btrfs): ``cp --reflink=always``
  clones the file at one instant (FICLONE holds both inodes while it shares the extents). It is
  deliberately *not* wrapped in fsfreeze: the clone writes to the same file system, so cloning
  a frozen one blocks until it is thawed.
* ``fsfreeze`` (never chosen by ``auto``): freezing alone takes no copy, so the file system is
  held frozen from ``take_snapshot`` until removal and read in place. Every writer on it blocks
  for the whole read, so choose it only for a data file system that can pause. The root file
  system is refused. The host thaws on its own after ``freeze_limit`` seconds in case patchdrill
  never returns; ``verify()`` then fails, because the read may have seen changes.
* ``auto``: VSS on Windows; on Linux LVM when the disk is on a logical volume, a reflink clone
  for an image file where the file system can clone, otherwise none (pre/post scripts only).
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

from configs.models import DiskConfig, HostConfig
from configs.policies import SnapshotPolicy
from configs.secrets import redact
from connectors.base import Connector, ConnectorError, last_lines
from tasks.backup.repo.repository import Consistency
from tasks.backup.snapshot.host import HELPER_TIMEOUT, VSS_SCRIPT, NotApplicable, SnapshotHost, _said
from tasks.backup.snapshot.view import (
    APPLICATION, CRASH, FILE_SYSTEM, HostCheck, RemovalStep, Snapshot, SnapshotError,
)

_GUID = re.compile(r"^\{[0-9A-Fa-f-]{36}\}$")


@dataclass
class _View:
    """What a snapshot method produced, before the consistency level is decided."""

    read_path: str
    method: str
    level: Consistency
    details: dict[str, Any] = field(default_factory=dict)
    steps: list[RemovalStep] = field(default_factory=list)
    check: HostCheck | None = None
    #: False for a live read: the post-script then waits until removal.
    point_in_time: bool = True
    #: VSS writers quiesced the applications (application-consistent without a pre-script).
    writers_quiesced: bool = False


def take_snapshot(connector: Connector, host: HostConfig, disk: DiskConfig, policy: SnapshotPolicy, *,
                  host_online: bool = True) -> Snapshot:
    """Take the most consistent view of `disk` the policy and the host allow (see the module doc)."""
    return _Taking(connector, host, disk, SnapshotPolicy.of(policy), host_online).run()


class _Taking(SnapshotHost):
    """One take_snapshot call: the pre-script, the method, the post-script, the level."""

    def __init__(self, connector: Connector, host: HostConfig, disk: DiskConfig, policy: SnapshotPolicy,
                 host_online: bool) -> None:
        super().__init__(connector, host, disk, policy, uuid.uuid4().hex[:12])
        self.online = host_online
        self.notes: list[str] = []

    def note(self, text: str) -> None:
        self.notes.append(redact(text))
        self.log.warning("snapshot.fallback", reason=redact(text))

    # -- the sequence ----------------------------------------------------------------------

    def run(self) -> Snapshot:
        if not self.online:
            return self.snapshot(_View(self.disk.path, "none", CRASH, point_in_time=False),
                                 [f"host {self.host.name} is off: its disk is read at rest, crash-consistent"])
        method = self.choose_method()
        pre_failure: str | None = None
        if self.policy.pre_script:
            try:
                pre_failure = self.user_script("pre", self.policy.pre_script)
            except BaseException:
                self.post_script_now()
                raise
            if pre_failure:
                if not self.policy.fallback:
                    self.post_script_now()
                    raise self.error(f"{pre_failure}; fallback is off, so no backup without an application-consistent point")
                self.note(f"{pre_failure}: the point cannot be application-consistent")
        try:
            view = self.create(method)
        except BaseException as exc:
            # Release the application at once: holding it quiesced for a whole live read is
            # not what anyone who configured a snapshot method asked for.
            self.post_script_now()
            if not isinstance(exc, SnapshotError) or not self.policy.fallback:
                raise
            self.note(f"{exc.message}; reading the disk live instead")
            return self.snapshot(self.live_view("none"), self.notes, CRASH)
        held = bool(self.policy.pre_script) and pre_failure is None and not view.point_in_time
        try:
            if held:
                # No snapshot by choice: the application stays quiesced until the read is over.
                view.steps.append(RemovalStep(label="post-script", action="post-script", retry=False))
            else:
                self.post_script_now()
        except BaseException:
            self.discard(view)
            raise
        return self.snapshot(view, self.notes, self.level(view, pre_failure, held))

    def discard(self, view: _View) -> None:
        """Undo a view nobody will receive (take_snapshot is failing after creating it)."""
        for step in view.steps:
            try:
                self.run_step(step)
            except (SnapshotError, ConnectorError) as exc:
                self.log.error("snapshot.removal_failed", step=step.label, error=redact(str(exc)))

    def level(self, view: _View, pre_failure: str | None, held: bool) -> Consistency:
        quiesced_by_script = bool(self.policy.pre_script) and pre_failure is None and (view.point_in_time or held)
        vss_writers_failed = view.method == "vss" and not view.writers_quiesced
        if (quiesced_by_script or view.writers_quiesced) and not vss_writers_failed:
            return APPLICATION
        return view.level

    def snapshot(self, view: _View, notes: list[str], level: Consistency | None = None) -> Snapshot:
        snap = Snapshot(host=self.host.name, disk=self.disk.name, read_path=view.read_path,
                        consistency=level or view.level, method=view.method, notes=list(notes),
                        snapshot_id=self.snapshot_id, details=view.details, _steps=view.steps, _check=view.check,
                        _runner=SnapshotHost(self.connector, self.host, self.disk, self.policy, self.snapshot_id))
        self.log.info("snapshot.taken", method=snap.method, consistency=snap.consistency, read_path=snap.read_path,
                      notes=snap.notes)
        return snap

    def choose_method(self) -> str:
        method, family = self.policy.method, self.host.os_family
        if method == "vss" and family != "windows" or method in ("lvm", "fsfreeze") and family != "linux":
            raise self.error(f"field method: {method!r} does not exist on {family} hosts "
                             f"(use {'vss' if family == 'windows' else 'lvm or fsfreeze'}, auto or none)")
        if method != "auto":
            if method in ("lvm", "fsfreeze") and not PurePosixPath(self.disk.path).is_absolute():
                raise self.error(f"field path: {self.disk.path!r} must be an absolute path for method {method!r}")
            return method
        if family == "windows":
            return "vss"
        if not PurePosixPath(self.disk.path).is_absolute():
            self.notes.append(f"disk path {self.disk.path!r} is relative: only the controller can place it, "
                              "so no snapshot method is probed")
            return "none"
        probe = self.linux("probe", [self.disk.path])
        if probe.get("lv"):
            return "lvm"
        if probe.get("kind") == "file":
            return "reflink"
        self.notes.append(f"{self.disk.path} is not on an LVM volume nor an image file: no snapshot method applies")
        return "none"

    # -- methods ---------------------------------------------------------------------------

    def create(self, method: str) -> _View:
        try:
            if method == "vss":
                return self.vss()
            if method == "lvm":
                return self.lvm()
            if method == "reflink":
                return self.reflink()
            if method == "fsfreeze":
                return self.fsfreeze()
        except NotApplicable as exc:
            if self.policy.method == "auto":
                self.notes.append(f"{exc}; no snapshot method applies")
                return self.live_view("none")
            raise self.error(f"method {method!r} does not apply: {exc}") from None
        return self.live_view(method)

    def live_view(self, method: str) -> _View:
        return _View(self.disk.path, method, CRASH, point_in_time=False)

    def lvm(self) -> _View:
        out = self.linux("lvm-create", [self.snapshot_id, self.disk.path, self.policy.lvm_snapshot_size])
        lv, mount_dir = out["snapshot_lv"], out.get("mount_dir", "")
        return _View(out["read_path"], "lvm", FILE_SYSTEM, details={"snapshot_lv": lv, "mount_dir": mount_dir},
                     steps=[RemovalStep(label=f"lvm snapshot {lv}", action="linux",
                                        args=("lvm-remove", self.snapshot_id, lv, mount_dir))],
                     check=HostCheck(action="linux", args=("lvm-check", lv)))

    def reflink(self) -> _View:
        out = self.linux("reflink-create", [self.snapshot_id, self.disk.path])
        return _View(out["read_path"], "reflink", FILE_SYSTEM, details={"clone": out["read_path"]},
                     steps=[RemovalStep(label=f"reflink clone {out['read_path']}", action="linux",
                                        args=("reflink-remove", self.snapshot_id, self.disk.path))])

    def fsfreeze(self) -> _View:
        out = self.linux("freeze", [self.snapshot_id, self.disk.path, f"{self.policy.freeze_limit:g}"])
        mount = out["mount"]
        self.notes.append(f"{mount} is held frozen until the snapshot is removed: its writers wait for the read")
        return _View(out["read_path"], "fsfreeze", FILE_SYSTEM, details={"frozen_mount": mount},
                     steps=[RemovalStep(label=f"frozen file system {mount}", action="thaw", args=(mount,))],
                     check=HostCheck(action="linux", args=("freeze-check", self.snapshot_id)))

    def vss(self) -> _View:
        args = ["-Path", self.disk.path, "-SnapshotId", self.snapshot_id]
        if self.policy.fallback:
            args.append("-AllowFallback")
        result = self.connector.run_script(VSS_SCRIPT, args, timeout=HELPER_TIMEOUT)
        if not result.ok:
            raise self.error(f"VSS shadow copy failed (exit {result.exit_code}): {_said(result) or 'no error text'}")
        report = self.json_line(result, VSS_SCRIPT.name)
        shadow_id = str(report.get("id") or "")
        if not _GUID.match(shadow_id) or not report.get("read_path"):
            raise self.error(f"{VSS_SCRIPT.name} reported no shadow copy id or read path: {redact(last_lines(result.stdout, 5))}")
        writers = [{"name": str(w.get("name")), "state": w.get("state"), "state_text": w.get("state_text")}
                   for w in report.get("writers") or []]
        if report.get("fallback_reason"):
            self.note(str(report["fallback_reason"]))
        consistency = report.get("consistency")
        details = {"shadow_id": shadow_id, "device": report.get("device"), "link": report.get("link"),
                   "volume": report.get("volume"), "context": report.get("context"), "writers": writers}
        return _View(str(report["read_path"]), "vss", FILE_SYSTEM, details=details,
                     writers_quiesced=consistency == APPLICATION,
                     steps=[RemovalStep(label=f"shadow copy {shadow_id}", action="vss-remove", args=(shadow_id,))],
                     check=HostCheck(action="vss-check", args=(shadow_id,)))

    # -- host calls ------------------------------------------------------------------------

    def post_script_now(self) -> None:
        """The post-script runs once the pre-script ran, whatever happened since."""
        if not self.policy.post_script:
            return
        try:
            failure = self.user_script("post", self.policy.post_script)
        except ConnectorError as exc:
            failure = f"post-script could not run: {exc.message}"
        if failure:
            self.notes.append(redact(failure))
            self.log.error("snapshot.post_script_failed", reason=redact(failure))

