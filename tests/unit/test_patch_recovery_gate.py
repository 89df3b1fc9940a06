"""The recovery-point gate without a patch run: `config check` names every field and host at
fault at its line (typer's CliRunner, the YAML as a user writes it), and the gate's verdict on
existing points of a real repository (made by the backup pipeline from a local directory disk;
points taken during a run are tested end to end in tests/e2e/test_patch_safety.py)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from configs.models import DiskConfig, HostConfig, LocalStorage
from configs.policies import BackupPolicy, SnapshotPolicy
from configs.recovery_point import RecoveryPointGate
from tasks.backup.disk import back_up_disk
from tasks.patching.safety.recovery_gate import PointPolicy, check_recovery_points, window_closed_meanwhile
from tasks.patching.safety.records import PointUsed, RecoveryRecord
from tasks.patching.safety.rollback import needed_seconds, seconds_to_spare, too_late

HEAD = """\
storage: {kind: local, path: store}
hosts:
  - name: web-01
    transport: local
    groups: [web]
    disks:
      - {name: data, path: /srv/data, kind: directory}
      - {name: image, path: /srv/vm.img, kind: block}
  - name: db-01
    transport: local
    groups: [db]
    disks:
      - {name: pg, path: /srv/pg}
      - {name: raw, path: /dev/sdb, kind: block}
  - name: win-01
    transport: local
    os_family: windows
    groups: [win]
    disks:
      - {name: files, path: 'D:\\files', kind: directory}
backup_policies:
  default: {}
  nightly: {}
patch_policies:
"""


def check(tmp_path: Path, policies: str) -> tuple[int, list[str]]:
    path = tmp_path / "fleet.yaml"
    path.write_text(HEAD + policies)
    result = CliRunner().invoke(app, ["config", "check", str(path)])
    assert "Traceback" not in result.output
    return result.exit_code, [line.removeprefix("error: ").replace(str(path), "F")
                              for line in result.output.splitlines() if line.startswith("error:")]


def test_a_gate_with_restorable_disks_passes(tmp_path: Path) -> None:
    code, problems = check(tmp_path, """\
  web:
    recovery_point:
      take_before_install: true
      max_age_hours: 24
      backup_policy: nightly
      rollback: restore
      workload_stop: systemctl stop web
      workload_start: systemctl start web
""")
    assert (code, problems) == (0, [])


@pytest.mark.parametrize("policy, expected", [
    ("""\
  web:
    recovery_point: {app_consistent: true}
""", ["F:26: patch_policies.web.recovery_point.max_age_hours: set max_age_hours (a point no older than N hours), "
      "take_before_install: true, or both"]),
    ("""\
  web:
    recovery_point:
      max_age_hours: 24
      rollback: restore
""", ["F:28: patch_policies.web.recovery_point.rollback: rollback: restore needs take_before_install: true; an older "
      "point would throw away everything written since it was taken"]),
    # An approved rollback restores the same points: the same rules, checked up front.
    ("""\
  web:
    recovery_point: {max_age_hours: 24, rollback: ask}
""", ["F:26: patch_policies.web.recovery_point.rollback: rollback: ask needs take_before_install: true; an older "
      "point would throw away everything written since it was taken"]),
    ("""\
  win:
    recovery_point: {take_before_install: true, rollback: ask, rollback_approval_minutes: 0}
""", ["F:26: patch_policies.win.recovery_point.rollback_approval_minutes: Input should be greater than 0"]),
    ("""\
  win:
    recovery_point: {take_before_install: true, rollback: ask}
""", ["F:26: patch_policies.win.recovery_point.rollback: host win-01 disk files: a Windows host takes image points "
      "only, so its directory disks cannot be rolled back"]),
    ("""\
  web:
    recovery_point:
      max_age_hours: 0
""", ["F:27: patch_policies.web.recovery_point.max_age_hours: Input should be greater than 0"]),
    ("""\
  web:
    recovery_point: {max_age_hours: 24, backup_policy: weekly, disks: [data, logs]}
""", ["F:26: patch_policies.web.recovery_point.backup_policy: no backup policy named 'weekly' (defined: default, nightly)",
      "F:26: patch_policies.web.recovery_point.disks: host web-01 has no disk logs"]),
    # Image disks need the workload stopped; the rollback is refused at check time, not at 3 a.m.
    ("""\
  web:
    recovery_point:
      take_before_install: true
      rollback: restore
""", ["F:28: patch_policies.web.recovery_point.rollback: host web-01 disk image is an image disk: a rollback "
      "rewrites it only with the workload stopped; set workload_stop and workload_start"]),
    ("""\
  db:
    recovery_point:
      take_before_install: true
      rollback: restore
      workload_stop: pg_ctl stop
      workload_start: pg_ctl start
""", ["F:28: patch_policies.db.recovery_point.rollback: host db-01 disk pg has kind auto: set kind: directory or "
      "block, so a rollback knows what it overwrites",
      "F:28: patch_policies.db.recovery_point.rollback: host db-01 disk raw is a raw device (/dev/sdb): the running "
      "host keeps it open, so a rollback restores image files and directories only"]),
    ("""\
  win:
    recovery_point: {take_before_install: true, rollback: restore}
""", ["F:26: patch_policies.win.recovery_point.rollback: host win-01 disk files: a Windows host takes image points "
      "only, so its directory disks cannot be rolled back"]),
    ("""\
  web:
    recovery_point: {max_age_hours: 24, workload_stop: systemctl stop web}
""", ["F:26: patch_policies.web.recovery_point.workload_start: give workload_stop and workload_start together"]),
])
def test_config_check_names_each_gate_problem_at_its_line(tmp_path: Path, policy: str, expected: list[str]) -> None:
    code, problems = check(tmp_path, policy)
    assert (code, problems) == (1, expected)


def test_a_policy_named_after_no_group_covers_every_host(tmp_path: Path) -> None:
    code, problems = check(tmp_path, """\
  default:
    recovery_point: {max_age_hours: 24, disks: [data]}
""")
    assert code == 1
    assert problems == [f"F:26: patch_policies.default.recovery_point.disks: host {name} has no disk data"
                        for name in ("db-01", "win-01")]


@pytest.fixture
def backed_up(tmp_path: Path) -> tuple[HostConfig, LocalStorage, Path]:
    """A local host whose directory disk has one crash-consistent point (no snapshot, no script)."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "file").write_text("payload\n")
    host = HostConfig(name="h1", transport="local",
                      disks=[DiskConfig(name="data", path=str(tmp_path / "data"), kind="directory")])
    storage = LocalStorage(path=str(tmp_path / "store"))
    back_up_disk(storage, tmp_path, host, host.disks[0], BackupPolicy(snapshot=SnapshotPolicy(method="none")))
    return host, storage, tmp_path


def test_the_gate_accepts_a_fresh_point_and_names_it(backed_up: tuple[HostConfig, LocalStorage, Path]) -> None:
    host, storage, base = backed_up
    verdict = check_recovery_points(host, storage, base, RecoveryPointGate(max_age_hours=24),
                                    PointPolicy(BackupPolicy(), None))
    assert verdict.refused is None
    [used] = verdict.recovery.points
    assert used.disk == "data" and used.point.startswith("points/h1/data/") and not used.taken
    assert used.consistency == "crash-consistent"


def test_the_gate_refuses_an_old_point_or_one_of_too_low_a_level(
        backed_up: tuple[HostConfig, LocalStorage, Path]) -> None:
    host, storage, base = backed_up
    source = PointPolicy(BackupPolicy(), None)
    later = datetime.now(timezone.utc) + timedelta(hours=30)
    old = check_recovery_points(host, storage, base, RecoveryPointGate(max_age_hours=24), source, now=later)
    assert old.refused is not None and old.refused.startswith("disk data: no recovery point newer than 24 h "
                                                              "(its newest point is 30.")
    assert old.recovery.points == []
    level = check_recovery_points(host, storage, base, RecoveryPointGate(max_age_hours=24, app_consistent=True), source)
    assert level.refused is not None and level.refused.startswith(
        "disk data: no application-consistent recovery point newer than 24 h (its newest point is 0.")


def test_the_gate_refuses_a_host_whose_store_has_no_repository(tmp_path: Path) -> None:
    host = HostConfig(name="h1", transport="local", disks=[DiskConfig(name="data", path=str(tmp_path), kind="directory")])
    verdict = check_recovery_points(host, LocalStorage(path=str(tmp_path / "empty")), tmp_path,
                                    RecoveryPointGate(max_age_hours=12), PointPolicy(BackupPolicy(), None))
    assert verdict.refused == "disk data: no recovery point newer than 12 h (it has none)"


def test_a_window_that_closed_while_the_points_were_taken_stops_the_install() -> None:
    host = HostConfig(name="h1", transport="local",
                      maintenance_windows=[{"start": "02:00", "duration_minutes": 60}])  # type: ignore[list-item]
    day = datetime(2026, 12, 2, tzinfo=timezone.utc)
    started, inside, after = day.replace(hour=2, minute=30), day.replace(hour=2, minute=50), day.replace(hour=3, minute=5)
    assert window_closed_meanwhile(host, started, inside) is None
    assert window_closed_meanwhile(host, started, after) == (
        "the maintenance window closed while the recovery points were taken (closed; opens 2026-12-03T02:00+00:00 "
        "UTC); the install would run outside it")
    # A host started outside its window was started by a run that overrides windows: no check.
    assert window_closed_meanwhile(host, day.replace(hour=5), day.replace(hour=6)) is None


def test_a_rollback_starts_only_while_the_window_has_the_time_it_may_need() -> None:
    host = HostConfig(name="h1", transport="local",
                      maintenance_windows=[{"start": "02:00", "duration_minutes": 60}])  # type: ignore[list-item]
    day = datetime(2026, 12, 2, tzinfo=timezone.utc)
    started = day.replace(hour=2, minute=5)
    taken = PointUsed(disk="data", point="points/h1/data/20261202T020500Z.json", time=started,
                      consistency="crash-consistent", taken=True, seconds=240.0)
    recovery = RecoveryRecord(points=[taken])
    measured, stated = RecoveryPointGate(take_before_install=True), RecoveryPointGate(take_before_install=True,
                                                                                      rollback_minutes=20)
    # Unset, twice what taking the point took (8 min); else what the policy says.
    assert (needed_seconds(measured, recovery), needed_seconds(stated, recovery)) == (480.0, 1200.0)
    at = day.replace(hour=2, minute=45)  # 15 min left
    assert seconds_to_spare(host, measured, recovery, started, at) == 420.0
    assert too_late(host, measured, recovery, started, at) is None
    assert too_late(host, stated, recovery, started, at) == (
        "the maintenance window closes in 15.0 min and a rollback may need 20.0 min, so none was started: the host is "
        "left as patched for a person to restore (data from points/h1/data/20261202T020500Z.json)")
    closed = too_late(host, measured, recovery, started, day.replace(hour=3, minute=1))
    assert closed is not None and closed.startswith("the maintenance window has closed and a rollback may need 8.0 min")
    # A host the run patched outside its window (windows overridden) is not held to one.
    outside = day.replace(hour=5)
    assert seconds_to_spare(host, stated, recovery, outside, outside) is None
    assert too_late(host, stated, recovery, outside, outside.replace(hour=6)) is None
