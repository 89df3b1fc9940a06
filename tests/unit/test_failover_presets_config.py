"""A plan's app for failover with presets: what differs on the primary (`app.primary`) and a
preset the target's operating system cannot run, each rejected by `patchdrill config check` at
its file and line (typer's CliRunner, the YAML as a user writes it)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_drill_plans import check


def test_a_systemd_unit_named_differently_on_each_side_passes(tmp_path: Path) -> None:
    code, problems = check(tmp_path, """\
          - host: db-01
            target: {host: dr-01, path: /srv/dr/db}
            app:
              preset: systemd
              name: db-dr.service
              command: "db --data {disk:data}"
              primary: {name: db.service}
""")
    assert (code, problems) == (0, [])


@pytest.mark.parametrize("member, expected", [
    ("""\
          - host: db-01
            target: {host: dr-01, path: /srv/dr/db}
            app:
              preset: process
              command: "db --data {disk:data}"
              primary:
                name: db.service
""", "F:29: recovery_plans.shop.groups[0].members[0].app.primary.name: preset 'process' does not read 'name'; "
     "on the primary it takes command, pidfile"),
    ("""\
          - host: db-01
            target: {host: dr-01, path: /srv/dr/db}
            app:
              preset: systemd
              name: db-dr.service
              primary: {unit: db.service}
""", "F:28: recovery_plans.shop.groups[0].members[0].app.primary.unit: Extra inputs are not permitted"),
    ("""\
          - host: db-01
            target: {host: win-01, path: 'D:\\dr'}
            isolation: none
            app:
              preset: process
              command: "db --data {disk:data}"
""", "F:27: recovery_plans.shop.groups[0].members[0].app.preset: preset 'process' runs on Linux hosts; the target "
     "'win-01' runs Windows: use the command preset or a Windows preset"),
])
def test_a_bad_primary_override_or_preset_is_rejected_at_its_line(tmp_path: Path, member: str, expected: str) -> None:
    code, problems = check(tmp_path, member)
    assert code == 1
    assert problems == [expected]
