"""The DR drill end to end, as an operator runs it: `patchdrill drill run PLAN`.

Everything is real: the primary and the DR target are real OpenSSH servers (this machine as
root, each on its own loopback address), the primary's disk is backed up by the real backup
engine into a local store, the copy is restored over SSH, runs in a real network namespace,
and a real HTTP server (Python's http.server, started by the `process` preset) serves the
restored files there; the probes reach it only from inside the namespace. A Prefect test
server runs the flows. Interrupted runs are real subprocesses sent real signals (SIGTERM, and
SIGKILL for a crashed controller). No test measures time: each waits for an observable state
with a deadline that only guards against a hang.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from cli.app import app
from configs.loader import load_config
from configs.policies import BackupPolicy
from connectors.stores import LocalBlobStore, open_store
from tasks.backup.disk import back_up_disk
from tasks.drill.copies import MARKER
from tasks.drill.evidence import DrillEvidence
from tasks.drill.ledger import Ledger, NamespaceEntry
from tasks.drill.members import CONTROLLER_HOST
from tasks.drill.slot import drill_slot
from tasks.drill.steps import find_evidence
from tests.alert_checks import alerts_section, events
from tests.hosts.sshd import SshdFleet
from tests.hosts.sshd_server import SshdHost
from tests.hosts.webhook import WebhookReceiver

pytestmark = pytest.mark.e2e
PATCHDRILL = Path(sys.executable).with_name("patchdrill")
HANG_GUARD = 240.0
PAGE = "hello from the primary\n"
PORT = 8080


@dataclass
class DrillLab:
    root: Path
    primary: SshdHost
    target: SshdHost
    disk: Path

    def config(self, name: str, plan: dict[str, Any], alerts: dict[str, Any] | None = None) -> Path:
        """A config holding both hosts, the lab's store and one plan `name` (and `alerts:`, if given)."""
        path = self.root / f"{name}.yaml"
        hosts = [self.primary.host_config().model_dump(exclude_none=True) | {
                     "disks": [{"name": "www", "path": str(self.disk), "kind": "directory"}]},
                 self.target.host_config().model_dump(exclude_none=True)]
        path.write_text(yaml.safe_dump({
            "storage": {"kind": "local", "path": str(self.root / "store")},
            "hosts": hosts,
            "backup_policies": {"default": {"block_size": 65536, "snapshot_method": "none"}},
            "recovery_plans": {name: plan},
            **({"alerts": alerts} if alerts else {}),
        }, sort_keys=False))
        return path

    def copy_root(self, name: str) -> Path:
        return self.root / "dr" / name


def plan(lab: DrillLab, name: str, *, probes: list[dict[str, Any]] | None = None, ready_wait: float = 30,
         rpo: str = "P1D") -> dict[str, Any]:
    """A one-member plan: the primary's www disk onto the target, served by http.server in netns."""
    return {
        "rto_target": "PT10M", "rpo_target": rpo,
        "groups": [{"name": "web", "members": [{
            "host": lab.primary.name,
            "target": {"host": lab.target.name, "path": str(lab.copy_root(name))},
            "app": {"preset": "process", "port": PORT, "ready_wait_seconds": ready_wait,
                    "command": f"python3 -m http.server {PORT} --bind 127.0.0.1 --directory {{disk:www}}"},
            "probes": probes if probes is not None else [
                {"kind": "tcp", "port": PORT, "address": "127.0.0.1"},
                {"kind": "http", "url": f"http://127.0.0.1:{PORT}/index.html", "expect_body": "hello from the primary"},
                {"kind": "checksum", "paths": ["index.html", "data/rows.csv"]},
            ],
            "steady_state": [{"kind": "tcp", "port": lab.primary.port}],
        }]}],
    }


@pytest.fixture(scope="module")
def drill_lab(sshd_fleet: SshdFleet, tmp_path_factory: pytest.TempPathFactory) -> DrillLab:
    """Two sshd hosts, a primary directory disk backed up once into the lab's store."""
    root = tmp_path_factory.mktemp("drill")
    disk = root / "primary" / "www"
    (disk / "data").mkdir(parents=True)
    (disk / "index.html").write_text(PAGE)
    (disk / "data" / "rows.csv").write_text("".join(f"{i},row {i}\n" for i in range(2000)))
    lab = DrillLab(root, sshd_fleet.create("drill-primary"), sshd_fleet.create("drill-target"), disk)
    loaded = load_config(lab.config("backup", plan(lab, "backup")))
    host = loaded.config.hosts[0]
    back_up_disk(loaded.config.storage, loaded.base_dir, host, host.disks[0], BackupPolicy(block_size=65536,
                                                                                  snapshot_method="none"))
    return lab


def namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def evidence_of(cfg: Path, run_id: str) -> DrillEvidence:
    loaded = load_config(cfg)
    with open_store(loaded.config.storage, loaded.base_dir) as store:
        found = find_evidence(store, run_id)
    assert found is not None, f"no evidence record for {run_id}"
    return found


def latest_evidence(cfg: Path, plan_name: str) -> DrillEvidence:
    loaded = load_config(cfg)
    with open_store(loaded.config.storage, loaded.base_dir) as store:
        keys = [i.key for i in store.list(f"evidence/drills/{plan_name}/")]
        records = [DrillEvidence.model_validate_json(store.get(k)) for k in keys]
    assert records, f"no evidence for plan {plan_name}"
    return max(records, key=lambda e: e.started)


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def primary_state(lab: DrillLab) -> dict[str, tuple[int, str]]:
    return {str(p.relative_to(lab.disk)): (p.stat().st_mtime_ns, p.read_text()) for p in lab.disk.rglob("*") if p.is_file()}


def drill(cfg: Path, name: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["drill", "run", name, "--config", str(cfg), "--yes"])
    return result.exit_code, result.output


def ledger_namespaces(cfg: Path, run_id: str) -> set[str]:
    """The namespaces a run's ledger names (other test sessions on this machine make their own)."""
    loaded = load_config(cfg)
    with open_store(loaded.config.storage, loaded.base_dir) as store:
        return {e.name for e in Ledger(store, run_id).read() if isinstance(e, NamespaceEntry)}


def assert_cleaned(evidence: DrillEvidence, lab: DrillLab, name: str, cfg: Path) -> None:
    """Cleanup verified in the record, and independently here: every item gone for real."""
    assert evidence.cleanup_verified is True, evidence.cleanup
    kinds = {item.kind for item in evidence.cleanup}
    assert {"copy-root", "path", "namespace", "process"} <= kinds, kinds
    assert all(item.verified for item in evidence.cleanup)
    assert not lab.copy_root(name).exists()
    ours = ledger_namespaces(cfg, evidence.run_id)
    assert ours and not ours & namespaces()
    # A process recorded before the controller heard its pid back is named by its pidfile.
    pids = [int(item.identifier.removeprefix("pid ")) for item in evidence.cleanup
            if item.kind == "process" and item.identifier.startswith("pid ")]
    assert not any(alive(pid) for pid in pids)


def test_a_passing_drill_restores_isolates_probes_and_cleans_up_with_proof(prefect_server: None,
                                                                           drill_lab: DrillLab) -> None:
    name = "pass"
    spec = plan(drill_lab, name)
    spec["groups"][0]["members"][0]["pre_actions"] = [{"kind": "manual", "instructions": "Warn the web team"}]
    cfg = drill_lab.config(name, spec)
    before_primary = primary_state(drill_lab)
    code, output = drill(cfg, name)
    assert code == 0, output
    evidence = latest_evidence(cfg, name)
    assert evidence.outcome == "passed" and evidence.finished is not None
    assert evidence.rto_seconds is not None and evidence.rto_ok is True
    assert evidence.rpo_seconds is not None and evidence.rpo_ok is True
    [point] = evidence.points
    assert point.host == drill_lab.primary.name and point.disk == "www" and point.bytes_written
    copy = [p for p in evidence.probes if p.phase == "copy"]
    assert len(copy) == 3 and all(p.ok for p in copy), copy
    assert [p.ok for p in evidence.probes if p.phase == "primary-before"] == [True]
    isolate = next(s for s in evidence.steps if s.name == "isolate")
    # From inside the namespace the primary's sshd is refused; from the target itself it answers.
    assert f"inside -> production {drill_lab.primary.address}:{drill_lab.primary.port}: ECONNREFUSED" in isolate.detail
    assert f"outside -> production {drill_lab.primary.address}:{drill_lab.primary.port}: connected" in isolate.detail
    # The test network is the drill's own apparatus (a real failover has none): made and proven
    # before the RTO clock starts; the restore, the copy's start and its probes are on the clock.
    restored = next(s for s in evidence.steps if s.name == "restore www")
    assert isolate.ok and isolate.finished is not None, evidence.steps
    assert isolate.finished <= evidence.started <= restored.started, evidence.steps
    [checksum] = evidence.primary_checksums
    assert checksum.unchanged is True
    # --yes confirmed the manual action in advance: recorded, no pause.
    [manual] = [s for s in evidence.steps if s.name == "manual pre web"]
    assert manual.ok and "Warn the web team" in manual.detail and "confirmed in advance" in manual.detail
    assert primary_state(drill_lab) == before_primary
    assert_cleaned(evidence, drill_lab, name, cfg)
    # The report and history read the same record back.
    report = CliRunner().invoke(app, ["drill", "report", evidence.run_id, "--config", str(cfg),
                                      "--html", str(drill_lab.root / "reports")])
    assert report.exit_code == 0 and "Cleanup proof" in report.output
    [page] = (drill_lab.root / "reports").glob("*.html")
    assert evidence.run_id in page.read_text()
    history = CliRunner().invoke(app, ["drill", "history", name, "--config", str(cfg), "--json"])
    assert history.exit_code == 0 and evidence.run_id in history.output


def test_a_failing_probe_fails_the_drill_and_cleanup_still_runs_verified(prefect_server: None,
                                                                        drill_lab: DrillLab) -> None:
    name = "probe-fails"
    probes = [{"kind": "http", "url": f"http://127.0.0.1:{PORT}/index.html", "expect_body": "not what it serves"}]
    cfg = drill_lab.config(name, plan(drill_lab, name, probes=probes, ready_wait=1))
    code, output = drill(cfg, name)
    assert code == 1, output
    evidence = latest_evidence(cfg, name)
    assert evidence.outcome == "failed"
    assert evidence.rto_seconds is None  # the group never passed its probes
    assert [p.ok for p in evidence.probes if p.phase == "copy"] == [False]
    assert "probes failed" in evidence.groups[0].detail
    assert_cleaned(evidence, drill_lab, name, cfg)


def test_a_drill_that_misses_its_rto_target_alerts_the_webhook_and_emits_an_event(
        prefect_server: None, drill_lab: DrillLab, webhook: WebhookReceiver) -> None:
    name = "rto-missed"
    spec = plan(drill_lab, name) | {"rto_target": 0.001}  # no restore and start is this quick
    cfg = drill_lab.config(name, spec, alerts=alerts_section())
    code, output = drill(cfg, name)
    assert code == 0, output  # probes passed and cleanup was verified: the drill itself passed
    evidence = latest_evidence(cfg, name)
    assert evidence.rto_ok is False and evidence.rpo_ok is True
    [post] = webhook.wait_for("patchdrill.drill.rto-missed")
    assert post["payload"] == {"plan": name, "run_id": evidence.run_id, "outcome": "passed", "objective": "rto",
                               "measured_seconds": round(evidence.rto_seconds or 0, 3), "target_seconds": 0.001,
                               "evidence": f"evidence/drills/{name}/{evidence.run_id}.json"}
    assert post["text"].startswith(f"patchdrill: drill of plan {name} missed its RTO target: ")
    # Only what was missed is alerted: not the RPO, and not a failure of the run.
    assert [p["event"] for p in webhook.received()] == ["patchdrill.drill.rto-missed"]
    [event] = events("patchdrill.drill.rto-missed", f"patchdrill.plan.{name}")
    assert event.payload["run_id"] == evidence.run_id and event.payload["measured_seconds"] > 0.001
    assert_cleaned(evidence, drill_lab, name, cfg)


def test_readiness_stops_a_drill_before_anything_is_created(prefect_server: None, drill_lab: DrillLab,
                                                            webhook: WebhookReceiver) -> None:
    name = "too-old"
    cfg = drill_lab.config(name, plan(drill_lab, name, rpo="PT1S"), alerts=alerts_section())
    code, output = drill(cfg, name)
    assert code == 1, output
    evidence = latest_evidence(cfg, name)
    assert evidence.outcome == "failed"
    assert "beyond the RPO target" in evidence.notes[-1] and drill_lab.primary.name in evidence.notes[-1]
    assert not evidence.cleanup and not evidence.points
    assert not drill_lab.copy_root(name).exists()
    loaded = load_config(cfg)
    with open_store(loaded.config.storage, loaded.base_dir) as store:
        assert not list(store.list(f"drills/{evidence.run_id}/"))  # no ledger: nothing was created
    # Two alerts: the RPO the point would have given, beyond its target, and the failed run.
    [missed] = webhook.received("patchdrill.drill.rpo-missed")
    assert missed["payload"]["run_id"] == evidence.run_id and missed["payload"]["outcome"] == "failed"
    assert missed["payload"]["target_seconds"] == 1 and missed["payload"]["measured_seconds"] > 1
    [failed] = webhook.received("patchdrill.run.failed")
    assert failed["payload"]["run_id"] == evidence.run_id and "beyond the RPO target" in failed["payload"]["message"]


# --------------------------------------------------------------------------- interrupted runs


_launched: list[subprocess.Popen[bytes]] = []


@pytest.fixture(autouse=True)
def _no_leftovers() -> Iterator[None]:
    yield
    for process in _launched:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    _launched.clear()


def start(cfg: Path, name: str, stderr: Path, *, confirmed: bool = True) -> subprocess.Popen[bytes]:
    """`patchdrill drill run` in a subprocess against the test's Prefect server (confirmed:
    with --yes, so it never pauses for a plan's manual actions)."""
    from prefect.settings import get_current_settings

    env = {**os.environ, "PREFECT_API_URL": str(get_current_settings().api.url),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    with open(stderr, "wb") as sink:
        process = subprocess.Popen([str(PATCHDRILL), "drill", "run", name, "--config", str(cfg),
                                    *(["--yes"] if confirmed else [])],
                                   env=env, stdout=subprocess.DEVNULL, stderr=sink, start_new_session=True)
    _launched.append(process)
    return process


def wait_for(what: str, condition: Callable[[], bool], process: subprocess.Popen[bytes], stderr: Path) -> None:
    deadline = time.monotonic() + HANG_GUARD
    while not condition():
        if process.poll() is not None:
            pytest.fail(f"exited ({process.returncode}) before {what}: {stderr.read_text(errors='replace')[-3000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"never saw {what}")
        time.sleep(0.05)


def serving(lab: DrillLab, name: str) -> bool:
    """The copy's process is up: its pidfile holds a pid (written by the process preset)."""
    return any(p.read_text().strip() for p in (lab.copy_root(name) / ".patchdrill").glob("*.pid")) \
        if (lab.copy_root(name) / ".patchdrill").is_dir() else False


def never_passing(lab: DrillLab, name: str) -> dict[str, Any]:
    """A plan whose copy starts and serves, but whose probe waits (up to 10 min) for a file
    nobody makes: the run sits in its probe step until it is interrupted."""
    return plan(lab, name, probes=[{"kind": "command", "command": "test -e {root}/never"}], ready_wait=600)


def test_a_cancelled_drill_cleans_up_and_exits_3(prefect_server: None, drill_lab: DrillLab, tmp_path: Path) -> None:
    name = "cancelled"
    cfg = drill_lab.config(name, never_passing(drill_lab, name))
    stderr = tmp_path / "stderr"
    process = start(cfg, name, stderr)
    wait_for("the copy serving", lambda: serving(drill_lab, name), process, stderr)
    ours = ledger_namespaces(cfg, latest_evidence(cfg, name).run_id)
    assert ours and ours <= namespaces()  # the copy's namespace exists now
    process.send_signal(signal.SIGTERM)  # as `kill PID`, or a Prefect cancellation, sends it
    assert process.wait(timeout=HANG_GUARD) == 3, stderr.read_text()
    evidence = latest_evidence(cfg, name)
    assert evidence.outcome == "cancelled"
    assert_cleaned(evidence, drill_lab, name, cfg)


def test_sigterm_while_a_drill_waits_for_a_person_stops_it_at_once_and_cleans_up(
        prefect_server: None, drill_lab: DrillLab, tmp_path: Path) -> None:
    """`kill PID` (or a worker's cancellation) while the drill is paused for a manual action,
    its copy up: the wait ends at the signal, not at the pause's 4-hour deadline; cleanup runs,
    verified; exit 3 and the run Cancelled on the server."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    name = "sigterm-paused"
    spec = plan(drill_lab, name)
    spec["groups"][0]["members"][0]["post_actions"] = [{"kind": "manual", "instructions": "Check the copy by hand"}]
    cfg = drill_lab.config(name, spec)
    stderr = tmp_path / "stderr"
    process = start(cfg, name, stderr, confirmed=False)
    states = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))

    def paused() -> bool:
        with get_client(sync_client=True) as client:
            return any(r.name.startswith(f"drill {name} ") for r in client.read_flow_runs(flow_run_filter=states))

    wait_for("the drill paused for its manual action", paused, process, stderr)
    assert serving(drill_lab, name)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=HANG_GUARD) == 3, stderr.read_text()
    evidence = latest_evidence(cfg, name)
    assert evidence.outcome == "cancelled"
    [manual] = [s for s in evidence.steps if s.name.startswith("manual post")]
    assert "stopped while waiting: interrupted by SIGTERM" in manual.detail, manual.detail
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(evidence.run_id).state.is_cancelled()
    assert_cleaned(evidence, drill_lab, name, cfg)


def test_after_a_controller_crash_drill_cleanup_removes_exactly_what_the_ledger_names(
        prefect_server: None, drill_lab: DrillLab, tmp_path: Path) -> None:
    name = "crashed"
    cfg = drill_lab.config(name, never_passing(drill_lab, name))
    bystander = drill_lab.root / "dr" / "bystander"  # beside the copy, named by no ledger
    bystander.mkdir(parents=True)
    (bystander / "keep").write_text("not the drill's")
    stderr = tmp_path / "stderr"
    process = start(cfg, name, stderr)
    wait_for("the copy serving", lambda: serving(drill_lab, name), process, stderr)
    os.killpg(process.pid, signal.SIGKILL)  # the controller dies: no cleanup of its own
    process.wait()
    evidence = latest_evidence(cfg, name)
    assert evidence.outcome == "running"
    left = ledger_namespaces(cfg, evidence.run_id)
    [pidfile] = (drill_lab.copy_root(name) / ".patchdrill").glob("*.pid")
    pid = int(pidfile.read_text().split()[0])
    # The crash left the copy running: its namespace, its process, its files.
    assert left and left <= namespaces() and alive(pid) and drill_lab.copy_root(name).exists()

    # Another drill is running (it holds its slot lease) and has recorded a file under its copy
    # root: --orphans must leave it alone.
    running_root = drill_lab.root / "dr" / "running"
    (running_root / "www").mkdir(parents=True)
    (running_root / MARKER).write_text("running\n")
    store = LocalBlobStore(drill_lab.root / "store")
    with drill_slot(store, "another-plan", "still-running", timeout_seconds=60):
        Ledger(store, "still-running").record("path", host=CONTROLLER_HOST.name, copy_root=str(running_root),
                                              path=str(running_root / "www"))
        result = CliRunner().invoke(app, ["drill", "cleanup", "--orphans", "--config", str(cfg)])
        Ledger(store, "still-running").close(1)  # as that drill's own cleanup does before it gives up its slot
    assert result.exit_code == 0, result.output
    assert f"cleanup of drill {evidence.run_id}" in result.output and "still-running" not in result.output
    assert (running_root / "www").is_dir()
    after = evidence_of(cfg, evidence.run_id)
    assert after.outcome == "crashed"
    assert_cleaned(after, drill_lab, name, cfg)
    assert not alive(pid)
    assert (bystander / "keep").read_text() == "not the drill's"
    again = CliRunner().invoke(app, ["drill", "cleanup", evidence.run_id, "--config", str(cfg)])
    assert again.exit_code == 0, again.output  # idempotent: everything proven gone again
    none_left = CliRunner().invoke(app, ["drill", "cleanup", "--orphans", "--config", str(cfg)])
    assert none_left.exit_code == 0 and "no orphaned drill" in none_left.output, none_left.output


def test_a_second_drill_of_the_same_plan_waits_for_the_first(prefect_server: None, drill_lab: DrillLab,
                                                            tmp_path: Path) -> None:
    name = "one-at-a-time"
    first_cfg = drill_lab.config(name, never_passing(drill_lab, name))
    second_cfg = tmp_path / "second.yaml"
    second_cfg.write_text(first_cfg.read_text().replace(str(drill_lab.copy_root(name)),
                                                        str(drill_lab.copy_root(name + "-2"))))
    second_cfg.write_text(second_cfg.read_text().replace("test -e {root}/never", "test -s {disk:www}/index.html"))
    first_err, second_err = tmp_path / "first", tmp_path / "second"
    first = start(first_cfg, name, first_err)
    wait_for("the first drill serving", lambda: serving(drill_lab, name), first, first_err)
    second = start(second_cfg, name, second_err)
    wait_for("the second drill saying it waits", lambda: "waiting for a concurrency slot" in second_err.read_text(),
             second, second_err)
    assert not drill_lab.copy_root(name + "-2").exists()  # it waits before creating anything
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=HANG_GUARD) == 3
    assert second.wait(timeout=HANG_GUARD) == 0, second_err.read_text()[-3000:]


# --------------------------------------------------------------------------- manual actions


def test_manual_actions_pause_the_drill_and_are_answered_through_the_prefect_api(
        prefect_server: None, drill_lab: DrillLab, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pre action approved (the group then starts), a post action rejected (the drill stops
    Cancelled, cleanup runs and is verified), both answered as the UI's Resume form does."""
    import flows.drill as drill_flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType
    from prefect.flow_runs import resume_flow_run

    monkeypatch.setattr(drill_flow, "MANUAL_POLL_SECONDS", 1)
    name = "manual"
    spec = plan(drill_lab, name)
    member = spec["groups"][0]["members"][0]
    member["pre_actions"] = [{"kind": "manual", "instructions": "Tell the on-call DBA the drill starts"}]
    member["post_actions"] = [{"kind": "manual", "instructions": "Check the copy by hand"}]
    cfg = drill_lab.config(name, spec)
    outcome: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: outcome.update(
        state=drill_flow.drill_run(config_path=str(cfg), plan=name, return_state=True)), name="paused-drill")
    worker.start()

    def paused() -> Any:
        states = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
        deadline = time.monotonic() + HANG_GUARD
        while worker.is_alive() and time.monotonic() < deadline:
            with get_client(sync_client=True) as client:
                found = [r for r in client.read_flow_runs(flow_run_filter=states) if r.name.startswith(f"drill {name} ")]
            if found:
                return found[0].id
            time.sleep(0.2)
        pytest.fail(f"the drill never paused: {outcome}")

    run_id = paused()
    assert not drill_lab.copy_root(name).exists()  # nothing of the group starts before the person answers
    resume_flow_run(run_id, run_input={"done": True, "comment": "DBA told"})
    # Resumed runs go back to Running before they pause again for the post action.
    deadline = time.monotonic() + HANG_GUARD
    while not serving(drill_lab, name) and time.monotonic() < deadline:
        time.sleep(0.2)
    run_id = paused()
    assert drill_lab.copy_root(name).exists()  # the copy is up while the person checks it
    resume_flow_run(run_id, run_input={"done": False, "comment": "the copy looks wrong"})
    worker.join(HANG_GUARD)
    state = outcome["state"]
    assert state.is_cancelled(), state
    assert "rejected: the copy looks wrong" in state.message
    evidence = evidence_of(cfg, str(run_id))
    assert evidence.outcome == "cancelled"
    answers = [s.detail for s in evidence.steps if s.name.startswith("manual ")]
    assert "answered done=True: DBA told" in answers[0] and "answered done=False" in answers[1]
    assert_cleaned(evidence, drill_lab, name, cfg)


def test_a_drill_cancelled_in_prefect_while_it_waits_for_a_person_stops_at_once_and_cleans_up(
        prefect_server: None, drill_lab: DrillLab, monkeypatch: pytest.MonkeyPatch) -> None:
    """The UI's Cancel on a drill paused for a manual action (the copy is up meanwhile): the
    run is Cancelling on the server, the drill notices at its next poll instead of at the
    pause's deadline (4 h by default), cleans up with proof and ends Cancelled, the one state
    Prefect lets a cancelling run reach."""
    import flows.drill as drill_flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.client.schemas.objects import StateType

    from tests.e2e.test_patch_run import cancel_as_the_ui_does

    monkeypatch.setattr(drill_flow, "MANUAL_POLL_SECONDS", 1)
    name = "cancel-paused"
    spec = plan(drill_lab, name)
    spec["groups"][0]["members"][0]["post_actions"] = [{"kind": "manual", "instructions": "Check the copy by hand"}]
    cfg = drill_lab.config(name, spec)
    outcome: dict[str, Any] = {}
    worker = threading.Thread(target=lambda: outcome.update(
        state=drill_flow.drill_run(config_path=str(cfg), plan=name, return_state=True)), name="paused-drill")
    worker.start()
    states = FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=[StateType.PAUSED])))
    deadline = time.monotonic() + HANG_GUARD
    found: list[Any] = []
    while worker.is_alive() and time.monotonic() < deadline and not found:
        with get_client(sync_client=True) as client:
            found = [r for r in client.read_flow_runs(flow_run_filter=states) if r.name.startswith(f"drill {name} ")]
        time.sleep(0.2)
    assert found, f"the drill never paused: {outcome}"
    run_id = found[0].id
    assert serving(drill_lab, name)  # the copy is up while the person would check it
    cancel_as_the_ui_does(run_id)
    worker.join(HANG_GUARD)
    assert not worker.is_alive(), "the drill kept waiting for its manual action after the cancellation"
    state = outcome["state"]
    assert state.is_cancelled(), state
    assert "cancelled in Prefect while it waited for an answer" in state.message, state.message
    with get_client(sync_client=True) as client:
        assert client.read_flow_run(run_id).state.is_cancelled()
    evidence = evidence_of(cfg, str(run_id))
    assert evidence.outcome == "cancelled"
    [manual] = [s for s in evidence.steps if s.name.startswith("manual post")]
    assert manual.ok is False and "stopped while waiting" in manual.detail
    assert_cleaned(evidence, drill_lab, name, cfg)


def test_readiness_refuses_a_copy_root_that_holds_someone_elses_data(prefect_server: None,
                                                                     drill_lab: DrillLab) -> None:
    """Cleanup removes a copy root whole: a target path with other data in it is never used."""
    name = "occupied"
    cfg = drill_lab.config(name, plan(drill_lab, name))
    drill_lab.copy_root(name).mkdir(parents=True)
    (drill_lab.copy_root(name) / "precious").write_text("someone's data")
    code, output = drill(cfg, name)
    assert code == 1, output
    evidence = latest_evidence(cfg, name)
    assert "holds data that is not a drill's copy" in evidence.notes[-1]
    assert (drill_lab.copy_root(name) / "precious").read_text() == "someone's data"


def test_a_manual_action_nobody_answers_fails_the_drill_and_cleanup_still_runs(
        prefect_server: None, drill_lab: DrillLab, monkeypatch: pytest.MonkeyPatch) -> None:
    """The drill keeps the manual action's deadline itself (flows/pause.py): past it the run is
    Running again, fails with its own reason and still cleans up, verified."""
    import flows.drill as drill_flow

    monkeypatch.setattr(drill_flow, "MANUAL_POLL_SECONDS", 1)
    name = "unanswered"
    spec = plan(drill_lab, name)
    spec["groups"][0]["members"][0]["post_actions"] = [{"kind": "manual", "instructions": "Check the copy by hand"}]
    cfg = drill_lab.config(name, spec)
    state = drill_flow.drill_run(config_path=str(cfg), plan=name, manual_timeout_minutes=0.05, return_state=True)
    assert state.is_failed(), state
    assert "not confirmed within 0.05 min" in (state.message or "")
    evidence = evidence_of(cfg, str(state.state_details.flow_run_id))
    assert evidence.outcome == "failed"
    [manual] = [s for s in evidence.steps if s.name.startswith("manual ")]
    assert not manual.ok and "nobody answered within 0.05 min" in manual.detail
    assert_cleaned(evidence, drill_lab, name, cfg)


def test_a_member_that_cannot_be_isolated_fails_alone_and_what_the_others_made_is_cleaned(
        drill_lab: DrillLab, tmp_path: Path) -> None:
    """Isolation runs before the failover's clock, every member side by side: one whose target
    stopped answering after readiness (here: a port nothing listens on) comes back as that
    member's failure naming its host, never as an exception that would leave the others'
    namespaces unrecorded; the one isolated is in the ledger and cleanup removes it, verified.
    No Prefect server: `isolate_members` is called as the flow calls it."""
    from tasks.drill.cleanup import cleanup_run
    from tasks.drill.steps import isolate_members, open_drill
    from tests.hosts.sshd_server import free_port

    name = "unisolated"
    spec = plan(drill_lab, name)
    gone = drill_lab.target.host_config(name="dr-gone", port=free_port(drill_lab.target.address))
    second = dict(spec["groups"][0]["members"][0], target={"host": "dr-gone", "path": str(drill_lab.copy_root(name))})
    spec["groups"].append({"name": "later", "members": [second]})
    cfg = drill_lab.config(name, spec)
    raw = yaml.safe_load(cfg.read_text())
    raw["hosts"].append(gone.model_dump(exclude_none=True))
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    run_id = f"isolate-{os.getpid()}-{time.time_ns()}"
    ctx = open_drill(str(cfg), name, run_id)
    [first, later] = ctx.members
    isolated, failed = isolate_members(ctx)
    try:
        assert set(isolated) == {first.id}
        [outcome] = failed
        assert outcome.member == later.id and not outcome.cancelled
        assert outcome.error and "dr-gone" in outcome.error, outcome.error
        [step] = outcome.steps
        assert step.name == "isolate" and step.ok is False
        assert isolated[first.id].namespace in namespaces()
    finally:
        for each in isolated.values():
            each.close()
    report = cleanup_run(ctx.store, run_id, ctx.connect_name)
    assert report.ok, report.summary()
    ours = ledger_namespaces(cfg, run_id)
    assert isolated[first.id].namespace in ours and not ours & namespaces()
