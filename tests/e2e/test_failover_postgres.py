"""Failover and failback of a real PostgreSQL cluster (Debian's) between two real sshd hosts,
through the `patchdrill` command, the flows on the Prefect test server, a local store.

The primary's cluster lives on the primary host's disk (a directory), its DR copy on the DR
host; each listens on its own host's address. Both sshd hosts run on this machine, so the test
reads the copies' files directly where it checks them; the product reaches them only over SSH.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from connectors.stores import LocalBlobStore
from tasks.drill.evidence import DrillEvidence, evidence_key
from tests.e2e.test_backup_cli import cli  # noqa: F401 - the in-process CLI fixture
from tests.hosts.postgres import as_postgres, bin_dir, scratch_directory
from tests.hosts.sshd import SshdMaker
from tests.hosts.sshd_server import SshdHost, free_port

pytestmark = pytest.mark.e2e
BLOCK = 64 * 1024
Cli = Callable[..., tuple[int, str, str]]


@dataclass
class Cluster:
    """One PostgreSQL cluster of the test: its data directory and the address it listens on."""

    bin: Path
    data: Path
    address: str
    port: int

    def psql(self, sql: str) -> subprocess.CompletedProcess[str]:
        return as_postgres(self.bin / "psql", "-h", self.address, "-p", str(self.port), "-d", "postgres", "-Atc", sql)

    def rows(self) -> list[str]:
        return self.psql("select note from events order by id").stdout.split()

    def up(self) -> bool:
        return subprocess.run([str(self.bin / "pg_isready"), "-h", self.address, "-p", str(self.port)],
                              capture_output=True, check=False).returncode == 0

    def ctl(self, *args: str) -> None:
        as_postgres(self.bin / "pg_ctl", "-D", self.data, *args)


@dataclass
class PgLab:
    config: Path
    store: Path
    primary: Cluster
    copy: Cluster

    def evidence(self, run_id: str) -> DrillEvidence:
        return DrillEvidence.model_validate_json(LocalBlobStore(self.store).get(evidence_key("pg", run_id)))


@pytest.fixture
def pg_lab(sshd_factory: SshdMaker) -> Iterator[PgLab]:
    """A running primary cluster with a table, on the primary sshd host; the DR host empty; a
    config with the recovery plan `pg` that fails the cluster over to the DR host."""
    binaries = bin_dir()
    primary_host: SshdHost = sshd_factory("pg-primary")
    dr_host: SshdHost = sshd_factory("pg-dr")
    work = scratch_directory("pd-failover-")
    for side in ("primary", "dr"):
        (work / side).mkdir()
        shutil.chown(work / side, "postgres")
    port = free_port(primary_host.address)
    primary = Cluster(binaries, work / "primary" / "pgdata", primary_host.address, port)
    copy = Cluster(binaries, work / "dr" / "pgdata", dr_host.address, port)
    as_postgres(binaries / "initdb", "-A", "trust", "-D", primary.data)
    pg_ctl = binaries / "pg_ctl"
    # One template for both sides: each side's root holds its own listen address (host
    # configuration kept beside the disk, not on it) and the server's log.
    for side, host in (("primary", primary_host), ("dr", dr_host)):
        (work / side / "address").write_text(host.address)
    start = (f"runuser -u postgres -- {pg_ctl} -D {{disk:pgdata}} -l {{root}}/pg.log -w -t 60 -o "
             f"\"-c listen_addresses=$(cat {{root}}/address) -p {port} -c unix_socket_directories=''\" start")
    stop = f"runuser -u postgres -- {pg_ctl} -D {{disk:pgdata}} -m fast -w -t 60 stop"
    probe = {"kind": "command", "name": "events-readable",
             "command": f"runuser -u postgres -- {binaries / 'psql'} -h {{address}} -p {port} -d postgres -Atc "
                        "'select count(*) from events'"}
    config = work / "fleet.yaml"
    hosts = []
    for host, disks in ((primary_host, [{"name": "pgdata", "path": str(primary.data), "kind": "directory"}]),
                        (dr_host, [])):
        hosts.append({**host.config.model_dump(mode="json", exclude_none=True, exclude_defaults=True),
                      "transport": "ssh", "disks": disks})
    config.write_text(yaml.safe_dump({
        "storage": {"kind": "local", "path": "store"},
        "hosts": hosts,
        "backup_policies": {"default": {"block_size": BLOCK, "snapshot_method": "none"}},
        "recovery_plans": {"pg": {
            "rto_target": 600, "rpo_target": 3600,
            "groups": [{"name": "database", "members": [{
                "host": primary_host.name, "disks": ["pgdata"], "target": {"host": dr_host.name, "path": str(work / "dr")},
                "app": {"preset": "command", "start": start, "stop": stop, "port": port},
                "probes": [probe], "steady_state": [dict(probe)]}]}]}},
    }))
    primary.ctl("-l", str(work / "primary" / "pg.log"), "-w", "-o",
                f"-c listen_addresses={primary.address} -p {port} -c unix_socket_directories=''", "start")
    primary.psql("create table events (id serial primary key, note text not null)")
    primary.psql("insert into events (note) values ('first'), ('second')")
    try:
        yield PgLab(config=config, store=work / "store", primary=primary, copy=copy)
    finally:
        for cluster in (primary, copy):
            if (cluster.data / "postmaster.pid").exists():
                as_postgres(pg_ctl, "-D", cluster.data, "-m", "immediate", "-w", "stop", check=False)
        shutil.rmtree(work, ignore_errors=True)


def _tree_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file() and not f.is_symlink())


def test_planned_failover_loses_nothing_then_failback_brings_the_dr_writes_home(
        prefect_server: None, pg_lab: PgLab, cli: Cli) -> None:  # noqa: F811
    code, out, err = cli("backup", "-c", str(pg_lab.config), "--json")
    assert code == 0, err
    # Written after the last scheduled backup, just before the failover: only the final
    # incremental, taken after the primary stopped, can carry it across.
    pg_lab.primary.psql("insert into events (note) values ('just-before-failover')")

    code, out, err = cli("failover", "pg", "--planned", "--yes", "-c", str(pg_lab.config), "--json")
    assert code == 0, out + err
    summary = json.loads(out)
    assert summary["state"] == "failed over, not committed"
    assert pg_lab.copy.rows() == ["first", "second", "just-before-failover"]
    assert not pg_lab.primary.up()  # a planned failover leaves the primary stopped

    evidence = pg_lab.evidence(summary["run_id"])
    assert evidence.kind == "planned-failover" and evidence.outcome == "passed"
    order = [s.name for s in evidence.steps]
    assert order == ["stop-primary", "final-backup", "restore", "start", "probe"], order
    stopped = evidence.steps[0].finished
    assert stopped is not None and evidence.points[0].taken_at >= stopped  # the point is from after the stop
    assert [(p.phase, p.ok) for p in evidence.probes] == [("copy", True)]
    # RTO: from the failover's start to its last group's probes passing (measured, not bounded here).
    [group] = evidence.groups
    assert evidence.rto_seconds == (group.probes_passed_at - evidence.started).total_seconds() > 0
    assert summary["rpo_seconds"] == 0.0

    # Failback refuses an uncommitted failover: commit (or cancel) comes first.
    code, _, err = cli("failback", "pg", "--yes", "-c", str(pg_lab.config))
    assert code == 1 and "not committed" in err and "Traceback" not in err
    code, out, err = cli("failover", "commit", summary["run_id"][:8], "-c", str(pg_lab.config), "--json")
    assert code == 0, err
    assert json.loads(out)["state"] == "committed"
    code, _, err = cli("failover", "commit", summary["run_id"], "-c", str(pg_lab.config))
    assert code == 1 and "already committed" in err

    # The copy serves production: what it takes must come home.
    pg_lab.copy.psql("insert into events (note) values ('written-on-dr')")
    pg_lab.copy.psql("delete from events where note = 'first'")
    data_size = _tree_bytes(pg_lab.copy.data)
    code, out, err = cli("failback", "pg", "--yes", "-c", str(pg_lab.config), "--json")
    assert code == 0, out + err
    back = json.loads(out)
    assert pg_lab.primary.rows() == ["second", "just-before-failover", "written-on-dr"]
    assert not pg_lab.copy.up()
    evidence = pg_lab.evidence(back["run_id"])
    assert [s.name for s in evidence.steps] == ["re-protect", "stop-copy", "final-backup", "restore", "start", "probe"]
    assert [(p.phase, p.ok) for p in evidence.probes] == [("primary-after", True)]
    # Only what changed since the failover travels back: a few heap, WAL and control blocks, far
    # from the whole cluster.
    moved = back["bytes_moved"]
    assert 0 < moved < data_size // 4, (moved, data_size)
    print(f"failback moved {moved} bytes of a {data_size}-byte cluster")


def test_unplanned_failover_states_the_data_loss_before_approval_and_reports_the_rpo(
        prefect_server: None, pg_lab: PgLab, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    code, _, err = cli("backup", "-c", str(pg_lab.config))
    assert code == 0, err
    pg_lab.primary.psql("insert into events (note) values ('after-the-last-point')")
    # The disaster: the primary's postmaster dies at once, no clean shutdown.
    pid = int((pg_lab.primary.data / "postmaster.pid").read_text().split()[0])
    os.kill(pid, 9)
    # Both "hosts" share this machine's process table, and the restored postmaster.pid names the
    # killed postmaster: PostgreSQL refuses to start while that pid exists, and a killed process
    # stays a zombie until init reaps it, which under load takes seconds. On two machines the pid
    # means nothing on the DR side, so the test waits for the reap rather than racing it.
    deadline = time.monotonic() + 60
    while Path(f"/proc/{pid}").exists():
        assert time.monotonic() < deadline, f"the killed postmaster {pid} was never reaped"
        time.sleep(0.1)

    # Asked first, with the loss stated; "no" changes nothing and exits 3.
    monkeypatch.setattr(sys, "stdin", io.StringIO("n\n"))
    code, out, err = cli("failover", "pg", "--unplanned", "-c", str(pg_lab.config))
    assert code == 3, out + err
    assert "DATA LOSS" in out and "RPO =" in out and "pg-primary/pgdata" in out
    assert not pg_lab.copy.data.exists()

    code, out, err = cli("failover", "pg", "--unplanned", "--point", "latest", "--yes", "-c", str(pg_lab.config),
                         "--json")
    copy_log = pg_lab.copy.data.parent / "pg.log"
    assert code == 0, out + err + (copy_log.read_text() if copy_log.exists() else "")
    summary = json.loads(out)
    assert pg_lab.copy.rows() == ["first", "second"]  # the write after the point is the loss
    evidence = pg_lab.evidence(summary["run_id"])
    assert evidence.kind == "unplanned-failover"
    assert "stop-primary" not in [s.name for s in evidence.steps]  # the primary is never touched
    [used] = evidence.points
    assert evidence.rpo_seconds is not None and evidence.rpo_seconds > 0
    assert summary["rpo_seconds"] == pytest.approx((evidence.started - used.taken_at).total_seconds())

    # A second failover of a plan that already serves from its copy is refused.
    code, _, err = cli("failover", "pg", "--unplanned", "--yes", "-c", str(pg_lab.config))
    assert code == 1 and "already serves from its copies" in err

    # Cancelled before commit: the copy stops; after an unplanned failover the primary stays down.
    code, out, err = cli("failover", "cancel", summary["run_id"], "--yes", "-c", str(pg_lab.config), "--json")
    assert code == 0, out + err
    assert not pg_lab.copy.up() and not pg_lab.primary.up()
    assert pg_lab.evidence(summary["run_id"]).outcome == "cancelled"
