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
from tasks.backup.errors import PointNotFound
from tasks.backup.repository import Repository
from tasks.backup.source import LocalBlockSource
from tasks.drill.evidence import DrillEvidence, utcnow
from tasks.drill.failover import (
    FailoverError, choose_point, commit_failover, copy_side, data_loss_seconds, load_failover_plan,
    parse_selector, primary_side, store_evidence,
)
from tests.e2e.test_backup_cli import cli  # noqa: F401 - the in-process CLI fixture

Cli = Callable[..., tuple[int, str, str]]
MEMBER = {"host": "db-1", "disks": ["data"], "target_host": "dr-1", "target_paths": {"data": "/srv/dr/data"},
          "start": "start-db {path} {address}", "stop": "stop-db {paths[data]}",
          "probes": [{"name": "ready", "command": "ready {address}"}]}


def _config(tmp_path: Path, member: dict[str, Any] | None = None) -> Path:
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({
        "storage": {"kind": "local", "path": "store"},
        "hosts": [{"name": "db-1", "transport": "local", "address": "10.0.0.1",
                   "disks": [{"name": "data", "path": "data", "kind": "directory"}]},
                  {"name": "dr-1", "transport": "local", "address": "10.9.0.1"}],
        "recovery_plans": {"db": {"rto_seconds": 900, "rpo_seconds": 3600,
                                  "groups": [{"name": "database", "members": [member or MEMBER]}]}},
    }))
    return path


def _plan_error(tmp_path: Path, **change: Any) -> str:
    loaded = load_config(_config(tmp_path, {**MEMBER, **change}))
    with pytest.raises(FailoverError) as caught:
        load_failover_plan(loaded.config, "db", source="fleet.yaml")
    return str(caught.value)


def test_a_plan_reads_into_sides_whose_templates_name_each_sides_paths_and_address(tmp_path: Path) -> None:
    loaded = load_config(_config(tmp_path))
    plan = load_failover_plan(loaded.config, "db")
    [(group, member)] = plan.members()
    primary, copy = primary_side(loaded.config, loaded.base_dir, member), copy_side(loaded.config, member)
    assert primary.render(member.start) == f"start-db {tmp_path / 'data'} 10.0.0.1"
    assert copy.render(member.start) == "start-db /srv/dr/data 10.9.0.1"
    assert copy.render(member.stop) == "stop-db /srv/dr/data"
    with pytest.raises(FailoverError, match=r"unknown or malformed placeholder 'port'"):
        copy.render("serve --port {port}")


@pytest.mark.parametrize(("change", "message"), [
    ({"host": "db-9"}, "member 'db-9': no host 'db-9' in the config"),
    ({"disks": ["logs"]}, "host 'db-1' has no disk 'logs'"),
    ({"target_paths": {}}, "no target path for disk 'data'"),
    ({"target_host": "db-1"}, "the DR target is the primary itself"),
    ({"target_host": "dr-9"}, "no DR host 'dr-9'"),
    ({"start": None}, "recovery_plans.db.groups.0.members.0.start: Input should be a valid string"),
])
def test_a_bad_member_is_one_line_naming_the_plan_and_the_member(tmp_path: Path, change: dict[str, Any],
                                                                 message: str) -> None:
    error = _plan_error(tmp_path, **change)
    assert message in error and error.startswith("fleet.yaml: recovery_plans.db") and "\n" not in error


def test_an_unknown_plan_names_the_known_ones(tmp_path: Path) -> None:
    loaded = load_config(_config(tmp_path))
    with pytest.raises(FailoverError, match=r"no recovery plan 'web' \(known: db\)"):
        load_failover_plan(loaded.config, "web")


def test_points_are_chosen_latest_application_consistent_or_before_a_time(tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    repo = Repository.open(LocalBlobStore(tmp_path / "repo"), create=True)
    made = []
    for number, consistency in enumerate(("application-consistent", "crash-consistent")):
        image.write_bytes(bytes([number]) * 8192)
        made.append(backup(repo, LocalBlockSource(image), BackupRequest(host="db-1", disk="data", block_size=4096,
                                                                        consistency=consistency, workers=1)))
    assert choose_point(repo, "db-1", "data", "latest") == made[1]
    assert choose_point(repo, "db-1", "data", "latest-app-consistent") == made[0]
    between = made[0].time + (made[1].time - made[0].time) / 2
    assert choose_point(repo, "db-1", "data", f"before:{between.isoformat()}") == made[0]
    with pytest.raises(PointNotFound, match="matches 'before:2000-01-01T00:00:00'"):
        choose_point(repo, "db-1", "data", "before:2000-01-01T00:00:00")
    # The data lost is counted from the oldest point; a point after the start loses nothing.
    start = made[1].time + timedelta(seconds=30)
    assert data_loss_seconds(start, made) == pytest.approx((start - made[0].time).total_seconds())
    assert data_loss_seconds(made[0].time - timedelta(seconds=5), made) == 0.0


@pytest.mark.parametrize("selector", ["yesterday", "before:noon", "before:"])
def test_a_bad_point_selector_says_what_is_accepted(selector: str) -> None:
    with pytest.raises(FailoverError, match="latest|ISO time"):
        parse_selector(selector)
    assert parse_selector("before:2026-12-01T10:00:00Z") == ("before", datetime(2026, 12, 1, 10, tzinfo=timezone.utc))


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
    (["failover", "db", "--planned", "--point", "latest-app-consistent"], "--point is for --unplanned"),
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
