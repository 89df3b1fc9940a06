"""Failover and failback of a file-serving application (Python's own http.server over a data
directory) between two real sshd hosts, on the Prefect test server: the bytes a failback moves,
measured against the change made on the DR side, and the approval pause answered through the
Prefect API.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml

from connectors.stores import LocalBlobStore
from tasks.drill.evidence import DrillEvidence, evidence_key
from tests.e2e.test_backup_cli import cli  # noqa: F401 - the in-process CLI fixture
from tests.e2e.test_patch_run import cancelled_while_paused, in_thread, joined, paused_run
from tests.hosts.sshd import SshdMaker
from tests.hosts.sshd_server import free_port

pytestmark = pytest.mark.e2e
BLOCK = 64 * 1024
Cli = Callable[..., tuple[int, str, str]]
FILES = {"a.bin": 16 * BLOCK, "b.bin": 9 * BLOCK + 123}
INDEX = b"hello from the primary\n"

# The application: a web server over the disk's directory. Each side's root (beside the disk, not
# on it) holds the address it listens on and its pidfile, so one template serves both sides.
START = ("nohup python3 -m http.server {port} --bind $(cat {{root}}/address) --directory {{disk:www}} >/dev/null 2>&1 & "
         "echo $! > {{root}}/web.pid; for i in $(seq 100); do "
         "python3 -c \"import socket; socket.create_connection(('$(cat {{root}}/address)', {port}), 1)\" 2>/dev/null "
         "&& exit 0; sleep 0.1; done; exit 1")
STOP = ("pid=$(cat {root}/web.pid) && kill $pid && while kill -0 $pid 2>/dev/null; do sleep 0.1; done "
        "&& rm -f {root}/web.pid")


@dataclass
class WebLab:
    config: Path
    store: Path
    primary: Path
    copy: Path
    primary_url: str
    copy_url: str

    def evidence(self, run_id: str) -> DrillEvidence:
        return DrillEvidence.model_validate_json(LocalBlobStore(self.store).get(evidence_key("web", run_id)))


def serves(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as answer:
            return answer.status == 200
    except OSError:
        return False


@pytest.fixture
def web_lab(sshd_factory: SshdMaker) -> Iterator[WebLab]:
    primary_host = sshd_factory("web-primary")
    dr_host = sshd_factory("web-dr")
    work = Path(tempfile.mkdtemp(prefix="pd-failover-web-"))
    data = work / "primary" / "www"
    data.mkdir(parents=True)
    rng = random.Random(10)
    for name, size in FILES.items():
        (data / name).write_bytes(rng.randbytes(size))
    (data / "index.html").write_bytes(INDEX)
    port = free_port(primary_host.address)
    config = work / "fleet.yaml"
    hosts = [{**primary_host.config.model_dump(mode="json", exclude_none=True, exclude_defaults=True),
              "transport": "ssh", "disks": [{"name": "www", "path": str(data), "kind": "directory"}]},
             {**dr_host.config.model_dump(mode="json", exclude_none=True, exclude_defaults=True), "transport": "ssh"}]
    copy = work / "dr" / "www"
    (work / "dr").mkdir()
    for side, host in (("primary", primary_host), ("dr", dr_host)):
        (work / side / "address").write_text(host.address)
    index = {"kind": "http", "name": "index", "url": f"http://{{address}}:{port}/index.html", "expect_body": "hello"}
    config.write_text(yaml.safe_dump({
        "storage": {"kind": "local", "path": "store"},
        "hosts": hosts,
        "backup_policies": {"default": {"block_size": BLOCK, "snapshot_method": "none"}},
        "recovery_plans": {"web": {
            "rto_target": 600, "rpo_target": 3600,
            "groups": [{"name": "web", "members": [{
                "host": primary_host.name, "disks": ["www"], "target": {"host": dr_host.name, "path": str(work / "dr")},
                "app": {"preset": "command", "start": START.format(port=port), "stop": STOP, "port": port},
                "probes": [index], "steady_state": [dict(index)]}]}]}},
    }))
    lab = WebLab(config=config, store=work / "store", primary=data, copy=copy,
                 primary_url=f"http://{primary_host.address}:{port}/index.html",
                 copy_url=f"http://{dr_host.address}:{port}/index.html")
    from connectors import connect

    with connect(primary_host.config) as connector:
        started = START.format(port=port).replace("{root}", str(work / "primary")).replace("{disk:www}", str(data))
        assert connector.run(started, timeout=60).ok
    try:
        yield lab
    finally:
        for host, root in ((primary_host, work / "primary"), (dr_host, work / "dr")):
            with connect(host.config) as connector:
                connector.run(f"test -e {root}/web.pid && kill $(cat {root}/web.pid)", timeout=60)
        shutil.rmtree(work, ignore_errors=True)


def test_failback_moves_only_the_blocks_changed_on_the_dr_side(prefect_server: None, web_lab: WebLab,
                                                               cli: Cli) -> None:  # noqa: F811
    assert serves(web_lab.primary_url)
    code, out, err = cli("failover", "web", "--planned", "--yes", "-c", str(web_lab.config), "--json")
    assert code == 0, out + err
    run_id = json.loads(out)["run_id"]
    assert serves(web_lab.copy_url) and not serves(web_lab.primary_url)
    # A fresh DR target: the whole data crossed once.
    assert json.loads(out)["bytes_moved"] == sum(FILES.values()) + len(INDEX)
    assert cli("failover", "commit", run_id, "-c", str(web_lab.config))[0] == 0

    # Production on the DR side: 10 bytes rewritten inside one block, one small file added.
    offset, patch = 5 * BLOCK + 1000, b"0123456789"
    with open(web_lab.copy / "a.bin", "r+b") as handle:
        handle.seek(offset)
        handle.write(patch)
    (web_lab.copy / "orders.csv").write_text("id,total\n1,42\n")
    added = (web_lab.copy / "orders.csv").stat().st_size

    code, out, err = cli("failback", "web", "--yes", "-c", str(web_lab.config), "--json")
    assert code == 0, out + err
    moved = json.loads(out)["bytes_moved"]
    # Upper bound from the change: every block the rewrite touched, whole, plus the new file.
    touched_blocks = (offset + len(patch) - 1) // BLOCK - offset // BLOCK + 1
    assert 0 < moved <= touched_blocks * BLOCK + added, moved
    print(f"failback moved {moved} bytes for a {len(patch)}-byte rewrite and a {added}-byte file "
          f"(bound {touched_blocks * BLOCK + added}; the data is {sum(FILES.values()) + len(INDEX)} bytes)")
    for name in [*FILES, "index.html", "orders.csv"]:
        assert (web_lab.primary / name).read_bytes() == (web_lab.copy / name).read_bytes(), name
    assert serves(web_lab.primary_url) and not serves(web_lab.copy_url)


def _description(run_id: object) -> str:
    from prefect.client.orchestration import get_client
    from prefect.input.actions import read_flow_run_input
    from prefect.input.run_input import keyset_from_paused_state

    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state  # type: ignore[arg-type]
    assert state is not None
    return str(read_flow_run_input(keyset_from_paused_state(state)["description"], flow_run_id=run_id))  # type: ignore[arg-type]


def test_unplanned_failover_waits_for_approval_states_the_rpo_and_a_rejection_changes_nothing(
        prefect_server: None, web_lab: WebLab, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    import flows.failover as failover_flow
    from prefect.flow_runs import resume_flow_run

    monkeypatch.setattr(failover_flow, "APPROVAL_POLL_SECONDS", 1)
    assert cli("backup", "-c", str(web_lab.config))[0] == 0

    def start() -> object:
        return failover_flow.failover_run(config_path=str(web_lab.config), plan="web", mode="unplanned",
                                          approval_timeout_minutes=5, return_state=True)

    worker, outcome = in_thread(start, "paused-failover")
    paused = paused_run(worker, outcome)
    description = _description(paused)
    assert "DATA LOSS" in description and "RPO =" in description and "web-primary/www" in description
    assert not web_lab.copy.exists()  # nothing restored while the run waits
    resume_flow_run(paused, run_input={"approve": False, "comment": "primary is back, no failover"})
    state = joined(worker, outcome)
    assert state.is_cancelled(), state
    assert not web_lab.copy.exists() and serves(web_lab.primary_url)
    evidence = web_lab.evidence(str(paused))
    assert evidence.outcome == "cancelled" and "primary is back, no failover" in evidence.notes[-1]

    # Approved through the same form, the failover runs to its end.
    worker, outcome = in_thread(start, "approved-failover")
    paused = paused_run(worker, outcome)
    resume_flow_run(paused, run_input={"approve": True, "comment": "change 7"})
    state = joined(worker, outcome)
    assert state.is_completed(), state
    assert serves(web_lab.copy_url)
    assert [s.name for s in web_lab.evidence(str(paused)).steps][:2] == ["choose-points", "approval"]


def test_a_failover_cancelled_in_prefect_while_it_waits_for_approval_ends_cancelled_having_changed_nothing(
        prefect_server: None, web_lab: WebLab, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The UI's Cancel on a failover paused for approval: noticed at the next poll instead of
    at the approval's deadline, nothing restored, the run Cancelled."""
    import flows.failover as failover_flow

    monkeypatch.setattr(failover_flow, "APPROVAL_POLL_SECONDS", 1)
    assert cli("backup", "-c", str(web_lab.config))[0] == 0
    worker, outcome = in_thread(lambda: failover_flow.failover_run(
        config_path=str(web_lab.config), plan="web", mode="unplanned", approval_timeout_minutes=240,
        return_state=True), "cancelled-failover")
    paused, state = cancelled_while_paused(worker, outcome)
    assert state.is_cancelled(), state
    assert "stopped while waiting for approval: cancelled in Prefect" in (state.message or ""), state.message
    assert not web_lab.copy.exists() and serves(web_lab.primary_url)
    assert web_lab.evidence(str(paused)).outcome == "cancelled"


def test_a_failover_nobody_approves_in_time_fails_having_changed_nothing(
        prefect_server: None, web_lab: WebLab, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The flow keeps the approval's deadline itself (flows/pause.py): past it the run ends Failed
    (an alert, unlike a person's no, which is Cancelled) with its own reason, and the evidence
    records the unanswered approval step."""
    import flows.failover as failover_flow

    monkeypatch.setattr(failover_flow, "APPROVAL_POLL_SECONDS", 1)
    assert cli("backup", "-c", str(web_lab.config))[0] == 0
    state = failover_flow.failover_run(config_path=str(web_lab.config), plan="web", mode="unplanned",
                                       approval_timeout_minutes=0.05, return_state=True)
    assert state.is_failed(), state
    assert "no approval within 0.05 min; nothing was changed" in (state.message or "")
    assert not web_lab.copy.exists() and serves(web_lab.primary_url)
    run_id = state.state_details.flow_run_id
    evidence = web_lab.evidence(str(run_id))
    assert evidence.outcome == "failed"
    [approval] = [s for s in evidence.steps if s.name == "approval"]
    assert approval.detail == "no answer"


def test_a_failing_probe_fails_the_failover_and_cancel_restarts_the_primary(
        prefect_server: None, web_lab: WebLab, cli: Cli) -> None:  # noqa: F811
    config = yaml.safe_load(web_lab.config.read_text())
    [member] = config["recovery_plans"]["web"]["groups"][0]["members"]
    member["probes"][0]["expect_body"] = "a page the copy does not serve"
    # The copy answers at once with the wrong page: retrying for the default 30 s proves nothing more.
    member["app"]["ready_wait_seconds"] = 3
    web_lab.config.write_text(yaml.safe_dump(config))

    code, out, err = cli("failover", "web", "--planned", "--yes", "-c", str(web_lab.config), "--json")
    assert code == 1, out + err
    summary = json.loads(out[:out.rindex("}") + 1])
    assert summary["outcome"] == "failed"
    assert "probe failed" in out and "failover cancel" in out
    evidence = web_lab.evidence(summary["run_id"])
    assert [(p.probe, p.ok) for p in evidence.probes] == [("index", False)]
    assert evidence.rto_seconds is None  # the copy never passed its probes
    assert not serves(web_lab.primary_url)  # stopped by the planned failover

    # A failed (so uncommitted) failover cannot be committed, but it can be cancelled.
    code, _, err = cli("failover", "commit", summary["run_id"], "-c", str(web_lab.config))
    assert code == 1 and "only a failover whose probes passed" in err
    code, out, err = cli("failover", "cancel", summary["run_id"], "--yes", "-c", str(web_lab.config))
    assert code == 0, out + err
    assert serves(web_lab.primary_url) and not serves(web_lab.copy_url)
    evidence = web_lab.evidence(summary["run_id"])
    assert evidence.outcome == "cancelled"
    assert [s.name for s in evidence.steps][-4:] == ["cancel-stop-copy", "start", "probe", "cancel"]


@pytest.fixture
def signal_handlers() -> Iterator[Callable[[], None]]:
    """What a new process would start with, for a test that signals itself: pytest's handlers
    back and the stop token cleared (a stopped command keeps its handlers for the rest of its
    process, which here goes on). Called between commands, and after the test."""
    from tasks.backup import cancel

    before = {number: signal.getsignal(number) for number in cancel.STOP_SIGNALS}

    def fresh_process() -> None:
        for number, handler in before.items():
            signal.signal(number, handler)
        cancel.reset()

    yield fresh_process
    fresh_process()


def test_sigterm_mid_failover_ends_it_cancelled_with_the_step_it_reached_in_the_evidence(
        prefect_server: None, web_lab: WebLab, cli: Cli, signal_handlers: Callable[[], None]) -> None:  # noqa: F811
    """SIGTERM is sent to this process (the command runs in it, in the main thread) once the
    evidence shows the restore under way, as `kill PID` would reach the command."""
    store = LocalBlobStore(web_lab.store)
    sent = threading.Event()

    def watch() -> None:
        while not sent.is_set():
            for info in store.list("evidence/drills/web/"):
                steps = [s["name"] for s in json.loads(store.get(info.key))["steps"]]
                if "restore" in steps:
                    os.kill(os.getpid(), signal.SIGTERM)
                    sent.set()
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    code, out, err = cli("failover", "web", "--planned", "--yes", "-c", str(web_lab.config), "--json")
    sent.set()
    watcher.join()
    assert code == 143, out + err
    summary = json.loads(out[:out.rindex("}") + 1])
    evidence = web_lab.evidence(summary["run_id"])
    assert evidence.outcome == "cancelled" and "interrupted by SIGTERM" in evidence.notes[-1]
    steps = [s.name for s in evidence.steps]
    assert steps[:3] == ["stop-primary", "final-backup", "restore"] and "probe" not in steps, steps
    # Stopped part-way and not committed: no new failover until it is cancelled, which undoes it.
    signal_handlers()
    code, _, err = cli("failover", "web", "--planned", "--yes", "-c", str(web_lab.config))
    assert code == 1 and "ended cancelled part-way: cancel it first" in err
    code, out, err = cli("failover", "cancel", summary["run_id"], "--yes", "-c", str(web_lab.config))
    assert code == 0, out + err
    assert serves(web_lab.primary_url)


def test_the_command_waits_for_approval_in_the_prefect_ui_and_exits_by_the_answer(
        prefect_server: None, web_lab: WebLab, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    import flows.failover as failover_flow
    from prefect.flow_runs import resume_flow_run

    monkeypatch.setattr(failover_flow, "APPROVAL_POLL_SECONDS", 1)
    worker, outcome = in_thread(lambda: cli("failover", "web", "--planned", "--wait-for-approval", "-c",
                                            str(web_lab.config), "--json"), "failover-waiting")
    paused = paused_run(worker, outcome)
    assert "no data is lost" in _description(paused)
    assert serves(web_lab.primary_url)  # nothing is stopped while the run waits
    resume_flow_run(paused, run_input={"approve": True, "comment": "maintenance window 12"})
    code, out, err = joined(worker, outcome)
    assert code == 0, out + err
    assert serves(web_lab.copy_url) and not serves(web_lab.primary_url)
    approval = next(s for s in web_lab.evidence(str(paused)).steps if s.name == "approval")
    assert approval.detail == "approved: maintenance window 12"
