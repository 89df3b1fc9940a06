"""What a failover reads before it changes anything: the plan against the config, the point
selector, command templates, and the command line's refusals (one line, exit 1, no traceback)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from configs.loader import load_config
from connectors.stores import LocalBlobStore
from tasks.backup.engine import BackupRequest, backup
from tasks.backup.repo.repository import Repository
from tasks.backup.sources.local import LocalBlockSource
from tasks.drill.evidence import DrillEvidence, utcnow
from tasks.drill.control import Rendered, TemplateError, control_spec, fill, render_service
from tasks.drill.failover import (
    FailoverError, Side, commit_failover, copy_side, data_loss_seconds, load_plan, parse_selector, primary_side,
    store_evidence, unplanned_points,
)
from tests.e2e.test_backup_cli import cli  # noqa: F401 - the in-process CLI fixture

Cli = Callable[..., tuple[int, str, str]]
PROBE = {"kind": "command", "name": "ready", "command": "ready {address} {disk:data}"}
MEMBER = {"host": "db-1", "disks": ["data"], "target": {"host": "dr-1", "path": "/srv/dr"},
          "app": {"preset": "command", "start": "start-db {disk:data} --log {root}/db.log", "stop": "stop-db {disk:data}"},
          "probes": [PROBE], "steady_state": [PROBE]}


def _config(tmp_path: Path, member: dict[str, Any] | None = None) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({
        "storage": {"kind": "local", "path": "store"},
        "hosts": [{"name": "db-1", "transport": "ssh", "user": "root", "address": "10.0.0.1",
                   "disks": [{"name": "data", "path": "/var/lib/db/data", "kind": "directory"}]},
                  {"name": "dr-1", "transport": "ssh", "user": "root", "address": "10.9.0.1"}],
        "recovery_plans": {"db": {"rto_target": 900, "rpo_target": 3600,
                                  "groups": [{"name": "database", "members": [member or MEMBER]}]}},
    }))
    return path


def _commands(side: Side) -> Rendered:
    assert side.app is not None
    return render_service(side.host.name, side.host.os_family, control_spec(side.app), side.context())


def test_one_template_fills_for_the_primary_and_for_the_copy(tmp_path: Path) -> None:
    loaded = load_config(_config(tmp_path))
    _, [[member]] = load_plan(loaded.config, loaded.base_dir, "db")
    primary, copy = primary_side(member, loaded.base_dir), copy_side(member)
    assert _commands(primary).start == "start-db /var/lib/db/data --log /var/lib/db/db.log"
    assert _commands(copy).start == "start-db /srv/dr/data --log /srv/dr/db.log"
    assert primary.values()["address"] == "10.0.0.1" and copy.values()["address"] == "10.9.0.1"
    with pytest.raises(TemplateError, match=r"unknown placeholder \{address\}"):
        fill("serve --bind {address}", copy.context())


def test_hostile_paths_are_quoted_in_the_commands(tmp_path: Path) -> None:
    member = {**MEMBER, "target": {"host": "dr-1", "path": "/srv/dr; rm -rf /"}}
    loaded = load_config(_config(tmp_path, member))
    _, [[resolved]] = load_plan(loaded.config, loaded.base_dir, "db")
    assert _commands(copy_side(resolved)).stop == "stop-db '/srv/dr; rm -rf /data'"


def test_the_primary_side_takes_its_own_unit_name_and_the_copy_the_plans(tmp_path: Path) -> None:
    member = {**MEMBER, "app": {"preset": "systemd", "name": "db-dr.service", "command": "db --data {disk:data}",
                                "primary": {"name": "db-prod.service"}}}
    loaded = load_config(_config(tmp_path, member))
    _, [[resolved]] = load_plan(loaded.config, loaded.base_dir, "db")
    primary, copy = _commands(primary_side(resolved, loaded.base_dir)), _commands(copy_side(resolved))
    assert (primary.start, primary.stop) == ("systemctl start db-prod.service", "systemctl stop db-prod.service")
    assert (copy.start, copy.stop) == ("systemctl start db-dr.service", "systemctl stop db-dr.service")
    assert primary.verify is not None and "ActiveState" in primary.verify and "db-prod.service" in primary.verify


def test_a_preset_the_primary_cannot_run_is_refused_naming_the_member(tmp_path: Path) -> None:
    """config check proves the target suits the preset; the primary is checked when a failover starts."""
    path = _config(tmp_path, {**MEMBER, "app": {"preset": "process", "command": "db --data {disk:data}"}})
    text = path.read_text().replace("address: 10.0.0.1", "address: 10.0.0.1\n  os_family: windows", 1)
    path.write_text(text.replace("transport: ssh", "transport: winrm", 1))
    loaded = load_config(path)
    with pytest.raises(FailoverError) as caught:
        load_plan(loaded.config, loaded.base_dir, "db", source="fleet.yaml")
    assert "fleet.yaml: recovery_plans.db: member 'database/db-1#0': start/stop preset 'process' needs a Linux " \
           "target; db-1 is a Windows host" in str(caught.value)


def test_an_unknown_plan_names_the_known_ones(tmp_path: Path) -> None:
    loaded = load_config(_config(tmp_path))
    with pytest.raises(FailoverError, match=r"no recovery plan 'web' \(known: db\)"):
        load_plan(loaded.config, loaded.base_dir, "web")


def test_unplanned_points_follow_the_plan_unless_the_command_overrides_them(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    repo = Repository.open(LocalBlobStore(tmp_path / "repo"), create=True)
    made = []
    for number, consistency in enumerate(("application-consistent", "crash-consistent")):
        image.write_bytes(bytes([number]) * 8192)
        made.append(backup(repo, LocalBlockSource(image), BackupRequest(host="db-1", disk="data", block_size=4096,
                                                                        consistency=consistency, workers=1)))
    loaded = load_config(_config(tmp_path, {**MEMBER, "point": "latest-application-consistent"}))
    _, groups = load_plan(loaded.config, loaded.base_dir, "db")
    key = ("database/db-1#0", "data")
    assert unplanned_points(repo, groups, None)[key] == made[0]  # the plan's own selector
    assert unplanned_points(repo, groups, "latest")[key] == made[1]
    between = made[0].time + (made[1].time - made[0].time) / 2
    assert unplanned_points(repo, groups, f"before:{between.isoformat()}")[key] == made[0]
    with pytest.raises(FailoverError, match="member database/db-1#0: no point taken before 2000"):
        unplanned_points(repo, groups, "before:2000-01-01T00:00:00+00:00")
    # The data lost is counted from the oldest point; a point after the start loses nothing.
    start = made[1].time + timedelta(seconds=30)
    assert data_loss_seconds(start, made) == pytest.approx((start - made[0].time).total_seconds())
    assert data_loss_seconds(made[0].time - timedelta(seconds=5), made) == 0.0


@pytest.mark.parametrize("selector", ["yesterday", "before:noon", "before:"])
def test_a_bad_point_selector_says_what_is_accepted(selector: str) -> None:
    with pytest.raises(FailoverError, match="latest|ISO time"):
        parse_selector(selector)
    assert parse_selector("before:2026-12-01T10:00:00Z").cutoff == datetime(2026, 12, 1, 10, tzinfo=timezone.utc)


def _evidence(kind: str, outcome: str) -> DrillEvidence:
    return DrillEvidence(run_id="0123abcd-run", kind=kind, plan="db", plan_version="v", operator="ops",  # type: ignore[arg-type]
                         started=utcnow(), outcome=outcome, rto_target_seconds=1, rpo_target_seconds=1)  # type: ignore[arg-type]


def test_only_a_passed_failover_commits_and_only_once(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "store")
    store_evidence(store, _evidence("planned-failover", "failed"))
    with pytest.raises(FailoverError, match="ended failed: only a failover whose probes passed"):
        commit_failover(store, "0123", "ops")
    store_evidence(store, _evidence("failback", "passed"))
    with pytest.raises(FailoverError, match="is a failback, not a failover"):
        commit_failover(store, "0123abcd", "ops")
    store_evidence(store, _evidence("unplanned-failover", "passed"))
    done = commit_failover(store, "0123", "ops", "change 9")
    assert [s.detail for s in done.steps] == ["committed by ops: change 9"]
    with pytest.raises(FailoverError, match="already committed"):
        commit_failover(store, "0123", "ops")
    with pytest.raises(FailoverError, match="no failover or drill run 'ffff'"):
        commit_failover(store, "ffff", "ops")


@pytest.mark.parametrize(("args", "message"), [
    (["failover", "db"], "choose exactly one of --planned"),
    (["failover", "db", "--planned", "--unplanned"], "choose exactly one of --planned"),
    (["failover", "db", "--planned", "--point", "latest"], "--point is for --unplanned"),
    (["failover", "db", "--unplanned", "--point", "before:noon", "--yes"], "is not an ISO time"),
    (["failover", "web", "--planned", "--yes"], "no recovery plan 'web' (known: db)"),
    (["failover", "db", "--planned", "--yes", "--wait-for-approval"], "contradict each other"),
    (["failover", "commit", "0123"], "no failover or drill run '0123' in the store"),
    (["failback", "db", "--yes"], "plan db has no failover in effect: nothing to fail back"),
])
def test_the_command_refuses_bad_input_in_one_line_before_any_flow_starts(
        tmp_path: Path, cli: Cli, args: list[str], message: str) -> None:  # noqa: F811
    code, out, err = cli(*args, "-c", str(_config(tmp_path)))
    assert code == 1, out + err
    assert message in " ".join(err.split()) and "Traceback" not in err
    assert len(err.strip().splitlines()) <= 2  # one line (rich may wrap it once)
