"""Recovery plans in the config: typed, checked against the inventory, each fault at its line.

`patchdrill config check` runs for real (typer's CliRunner); the YAML is written out as a user
would write it, so each expected line number is where the fault stands in that text.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.app import app
from configs.loader import ConfigError, parse_config
from configs.plans import PointSelector, RecoveryPlan

HEAD = """\
version: 1
storage: {kind: local, path: /tmp/store}
hosts:
  - name: db-01
    transport: local
    disks: [{name: data, path: /srv/db}]
  - name: dr-01
    address: 10.0.0.9
    transport: ssh
    user: root
  - name: win-01
    transport: winrm
    os_family: windows
    user: admin
    password: env:WIN_PW
recovery_plans:
  shop:
    rto_target: PT30M
    rpo_target: PT24H
    groups:
      - name: db
        members:
"""  # members start at line 23


def check(tmp_path: Path, members: str) -> tuple[int, list[str]]:
    path = tmp_path / "fleet.yaml"
    path.write_text(HEAD + members)
    result = CliRunner().invoke(app, ["config", "check", str(path)])
    lines = [line.removeprefix("error: ").replace(str(path), "F") for line in result.output.splitlines()
             if line.startswith("error:")]
    return result.exit_code, lines


def test_a_good_plan_passes_config_check(tmp_path: Path) -> None:
    code, problems = check(tmp_path, """\
          - host: db-01
            point: latest-application-consistent
            target: {host: dr-01, path: /srv/dr/db}
            app: {preset: process, command: "postgres -D {disk:data}", port: 5432}
            probes: [{kind: tcp, port: 5432, address: 127.0.0.1}]
""")
    assert (code, problems) == (0, [])


@pytest.mark.parametrize("member, expected", [
    ("""\
          - host: nope
            target: {host: dr-01, path: /srv/dr/x}
""", "F:23: recovery_plans.shop.groups[0].members[0].host: no host 'nope' in the inventory"),
    ("""\
          - host: db-01
            disks: [data, logs]
            target: {host: dr-01, path: /srv/dr/x}
""", "F:24: recovery_plans.shop.groups[0].members[0].disks[1]: host 'db-01' has no disk 'logs' (known: data)"),
    ("""\
          - host: db-01
            target:
              host: db-01
              path: /srv/dr/x
""", "F:25: recovery_plans.shop.groups[0].members[0].target.host: the DR target of 'db-01' is the primary itself: "
     "a drill must never touch the primary"),
    ("""\
          - host: db-01
            target:
              host: controller
              path: /srv/db/copy
""", "F:26: recovery_plans.shop.groups[0].members[0].target.path: target path '/srv/db/copy' overlaps disk 'data' "
     "of 'db-01' (/srv/db) on the same machine: the restore would write over the primary"),
    ("""\
          - host: db-01
            target: {host: win-01, path: 'D:\\dr'}
            isolation: netns
""", "F:25: recovery_plans.shop.groups[0].members[0].isolation: target 'win-01' runs Windows, which has no network "
     "namespaces: use isolation: none (and an isolated network of your own)"),
    ("""\
          - host: db-01
            target: {host: dr-01, path: /srv/dr/a}
            isolation: none
            ports: [8080]
          - host: db-01
            target: {host: dr-01, path: /srv/dr/b}
            isolation: none
            probes: [{kind: http, url: "http://127.0.0.1:8080/"}]
""", "F:29: recovery_plans.shop.groups[0].members[1].isolation: port 8080 is used by db/db-01#0 too, on the same "
     "network of 'dr-01' (isolation none): give one of them netns or another port"),
    ("""\
          - host: db-01
            target: {host: dr-01, path: relative/dir}
""", "F:24: recovery_plans.shop.groups[0].members[0].target.path: target path 'relative/dir' must be absolute on "
     "host 'dr-01'"),
])
def test_a_bad_member_is_rejected_with_its_file_and_line(tmp_path: Path, member: str, expected: str) -> None:
    code, problems = check(tmp_path, member)
    assert code == 1
    assert problems == [expected]


def test_two_members_on_one_target_with_their_own_namespaces_may_share_a_port(tmp_path: Path) -> None:
    code, problems = check(tmp_path, """\
          - host: db-01
            target: {host: dr-01, path: /srv/dr/a}
            ports: [8080]
          - host: db-01
            target: {host: dr-01, path: /srv/dr/b}
            ports: [8080]
""")
    assert (code, problems) == (0, [])


def test_a_windows_target_needs_isolation_none_written_out() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(HEAD + "          - host: db-01\n            target: {host: win-01, path: 'D:\\dr'}\n")
    [problem] = caught.value.problems
    assert problem.field.endswith("members[0].isolation") and "say isolation: none explicitly" in problem.message


def test_point_selectors_read_as_written() -> None:
    assert PointSelector.model_validate("latest").select == "latest"
    before = PointSelector.model_validate({"before": "2026-12-01T00:00:00"})
    assert before.select == "before" and before.cutoff == datetime(2026, 12, 1, tzinfo=timezone.utc)
    with pytest.raises(ValueError):
        PointSelector.model_validate("before")  # a time is needed


def test_targets_are_durations_and_groups_unique() -> None:
    plan = RecoveryPlan.model_validate({"rto_target": 1800, "rpo_target": "PT24H", "groups": [
        {"name": "g", "members": [{"host": "h", "target": {"host": "controller", "path": "/srv/dr"}}]}]})
    assert plan.rto_target == timedelta(minutes=30) and plan.rpo_target == timedelta(hours=24)
    with pytest.raises(ValueError, match="group names must be unique"):
        RecoveryPlan.model_validate({"rto_target": 1, "rpo_target": 1, "groups": [
            {"name": "g", "members": [{"host": "h", "target": {"host": "controller", "path": "/srv/dr"}}]}] * 2})
