"""The backup commands through the real `patchdrill` typer app, flows on the Prefect test server."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import yaml

from cli.app import app
from tests.e2e.test_backup_flows import _artifact
from tests.trees import assert_same_tree, rich_tree

pytestmark = pytest.mark.e2e
BLOCK = 64 * 1024


@pytest.fixture
def lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PD_CLI_REPO_KEY", "cli test passphrase")
    (tmp_path / "disk.img").write_bytes(random.Random(5).randbytes(24 * BLOCK))
    cfg = tmp_path / "lab.yaml"
    cfg.write_text(yaml.safe_dump({
        "storage": {"kind": "local", "path": "store"},
        "hosts": [{"name": "lab-1", "transport": "local", "disks": [{"name": "os", "path": "disk.img"}]}],
        "backup_policies": {"default": {"block_size": BLOCK, "keep_last": 1, "encryption_key": "env:PD_CLI_REPO_KEY"}},
    }))
    return cfg


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """Run the app in-process. Not typer's CliRunner: it closes its streams after each call,
    and the logging Prefect set up during one flow run would write to them in the next."""

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = app(list(args), standalone_mode=False) or 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_backup_points_verify_restore_prune(prefect_server: None, lab: Path, tmp_path: Path,
                                           cli: Callable[..., tuple[int, str, str]]) -> None:
    code, out, err = cli("backup", "-c", str(lab), "--json")
    assert code == 0, err
    [row] = json.loads(out)
    assert (row["host"], row["disk"], row["uploaded_bytes"]) == ("lab-1", "os", 24 * BLOCK)

    code, out, err = cli("points", "-c", str(lab), "--json")
    assert code == 0, err
    [point] = json.loads(out)
    assert point["consistency"] == "crash-consistent" and point["totals"]["size"] == 24 * BLOCK

    target = tmp_path / "restored.img"
    code, out, err = cli("restore", "lab-1", "os", str(target), "-c", str(lab), "--json")
    assert code == 0, err
    assert target.read_bytes() == (tmp_path / "disk.img").read_bytes()

    code, out, err = cli("restore", "lab-1", "os", str(target), "-c", str(lab))
    assert code == 1
    assert "exists" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1

    with open(tmp_path / "disk.img", "r+b") as handle:
        handle.write(b"\x00" * BLOCK)
    assert cli("backup", "-c", str(lab), "--json")[0] == 0
    # The run applied keep_last: 1 and pruned the replaced block's chunk; nothing is left to prune.
    code, out, err = cli("points", "-c", str(lab), "--json")
    assert [p["totals"]["changed_bytes"] for p in json.loads(out)] == [BLOCK]
    code, out, err = cli("prune", "-c", str(lab), "--json")
    assert code == 0, err
    summary = json.loads(out)
    # 23: the block written with zeros is a hole, which no chunk stores.
    assert (summary["forgotten"], summary["chunks_deleted"], summary["chunks_kept"]) == ([], 0, 23)

    assert cli("verify", "-c", str(lab))[0] == 0
    chunks = sorted((tmp_path / "store" / "chunks").rglob("*"))
    victim = next(p for p in chunks if p.is_file())
    victim.write_bytes(b"garbage")
    code, out, err = cli("verify", "-c", str(lab), "--json")
    assert code == 1
    report = json.loads(out)
    assert list(report["corrupt"]) == [victim.name] and not report["ok"]


def test_errors_are_one_line(lab: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             cli: Callable[..., tuple[int, str, str]]) -> None:
    code, _, err = cli("points", "-c", str(tmp_path / "missing.yaml"))
    assert code == 1 and "missing.yaml" in err and "Traceback" not in err

    monkeypatch.delenv("PD_CLI_REPO_KEY")
    code, _, err = cli("verify", "-c", str(lab))
    assert code == 1 and "PD_CLI_REPO_KEY" in err and "Traceback" not in err

    code, _, err = cli("backup", "-c", str(lab), "--policy", "weekly")
    assert code == 1 and "no backup policy 'weekly'" in err and "default" in err


@pytest.fixture
def tree_lab(tmp_path: Path) -> Path:
    """A directory disk with a socket in it (which no backup can keep) and a config for it."""
    src = rich_tree(tmp_path / "primary")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(src / "app.sock"))
    listener.close()
    cfg = tmp_path / "lab.yaml"
    cfg.write_text(yaml.safe_dump({
        "storage": {"kind": "local", "path": "store"},
        "hosts": [{"name": "lab-1", "transport": "local",
                   "disks": [{"name": "srv", "path": "primary", "kind": "directory"}]}],
        "backup_policies": {"default": {"block_size": BLOCK}},
    }))
    return cfg


def test_failback_through_the_cli(prefect_server: None, tree_lab: Path, tmp_path: Path,
                                  cli: Callable[..., tuple[int, str, str]]) -> None:
    src = tmp_path / "primary"
    assert cli("backup", "-c", str(tree_lab), "--json")[0] == 0
    target = tmp_path / "dr"
    code, out, err = cli("restore", "lab-1", "srv", str(target), "-c", str(tree_lab))
    assert code == 0, err
    # Said per entry, on the terminal and in the run's artifact: what the point could not keep.
    assert "not restored app.sock: socket: not backed up" in err
    rows = [row for data in _artifact("restore-lab-1-srv-skipped") for row in (json.loads(data) if isinstance(data, str) else data)]
    assert {"entry": "app.sock", "why": "socket: not backed up (a program recreates it)"} in rows
    kept = os.stat(src).st_mtime_ns
    (src / "app.sock").unlink()
    os.utime(src, ns=(kept, kept))
    assert_same_tree(src, target)

    # The DR side drifts while it serves; failback restores the primary's latest point onto it.
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (target / "etc" / "app").rename(target / "etc" / "app-moved")
    (target / "etc" / "app").symlink_to(outside)
    (target / "orphan.log").write_text("written on the DR side")
    code, out, err = cli("restore", "lab-1", "srv", str(target), "-c", str(tree_lab), "--force")
    assert code == 0, err
    assert "3 entries the point lacks removed" in out  # app-moved, the app.conf in it, orphan.log
    assert list(outside.iterdir()) == []
    assert_same_tree(src, target)


def test_restore_mistakes_are_one_line(prefect_server: None, lab: Path, tmp_path: Path,
                                       cli: Callable[..., tuple[int, str, str]]) -> None:
    config = yaml.safe_load(lab.read_text())
    config["backup_policies"]["default"]["keep_last"] = 5
    lab.write_text(yaml.safe_dump(config))
    for _ in range(2):
        assert cli("backup", "-c", str(lab), "--json")[0] == 0
    code, out, _ = cli("points", "-c", str(lab), "--json")
    stamps = [p["time"] for p in json.loads(out)]
    day = stamps[0][:10].replace("-", "")
    code, _, err = cli("restore", "lab-1", "os", str(tmp_path / "x.img"), "-c", str(lab), "--point", day)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"'{day}' matches 2 points" in err and "give more of the time stamp" in err

    if os.geteuid() != 0:
        return
    media = tmp_path / "media"
    media.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(media)], check=True)
    try:
        # --json: no progress bar on stderr beside the error line
        code, _, err = cli("restore", "lab-1", "os", str(media / "disk.img"), "-c", str(lab), "--json")
    finally:
        subprocess.run(["umount", str(media)], check=True)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert f"cannot restore into '{media / 'disk.img'}': Read-only file system" in err


@pytest.fixture
def lab_with_a_missing_disk(lab: Path) -> Path:
    config = yaml.safe_load(lab.read_text())
    config["hosts"][0]["disks"].append({"name": "lost", "path": "lost.img"})
    lab.write_text(yaml.safe_dump(config))
    return lab


def test_backup_json_reports_every_disk_when_one_fails(prefect_server: None, lab_with_a_missing_disk: Path,
                                                       cli: Callable[..., tuple[int, str, str]]) -> None:
    code, out, err = cli("backup", "-c", str(lab_with_a_missing_disk), "--json")
    assert code == 1
    rows = {row["disk"]: row for row in json.loads(out)}
    assert rows["os"]["status"] == "ok" and rows["os"]["point"].startswith("points/lab-1/os/")
    assert rows["lost"]["status"] == "failed" and "lost.img" in rows["lost"]["error"]
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith("error: lab-1/lost:") and "Traceback" not in err

    code, out, err = cli("backup", "-c", str(lab_with_a_missing_disk))
    assert code == 1 and "Traceback" not in err
    table = {line.split()[3]: line.split()[5] for line in out.splitlines() if "lab-1" in line}
    assert table == {"lost": "failed", "os": "crash"}, out
    [line] = [line for line in err.splitlines() if line.startswith("error:")]
    assert line.startswith("error: lab-1/lost:")


def test_log_json_makes_every_console_line_json_on_a_real_run(lab_with_a_missing_disk: Path, tmp_path: Path) -> None:
    """A real process on Prefect's temporary API server (PATCHDRILL_SERVER=temporary, whose start
    Prefect logs itself): every line on stderr parses as JSON, Prefect's own included, and stdout
    holds the report. The background server's start line: test_background_server.py."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180", PATCHDRILL_SERVER="temporary")
    proc = subprocess.run(
        [sys.executable, "-c", "from cli.app import app; app()",
         "--log-json", "backup", "-c", str(lab_with_a_missing_disk), "--json"],
        cwd=Path(__file__).resolve().parents[2], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr
    assert {row["disk"]: row["status"] for row in json.loads(proc.stdout)} == {"lost": "failed", "os": "ok"}
    events = [json.loads(line) for line in proc.stderr.splitlines()]
    loggers = {e["logger"] for e in events}
    assert "patchdrill.backup" in loggers and any(name.startswith("prefect") for name in loggers), loggers
    assert [e["event"] for e in events if e["level"] == "error"][-1] == "cli.error"
    assert "Traceback" not in proc.stderr


def _flow_runs(flow_name: str) -> list[str]:
    """States of the runs of one flow on the test server, oldest first."""
    import anyio
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    async def fetch() -> list[str]:
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                                               sort=FlowRunSort.EXPECTED_START_TIME_ASC)
        return [run.state_name or "" for run in runs]
    return anyio.run(fetch)


def test_prune_and_verify_run_their_flows_for_the_selected_hosts(prefect_server: None, tmp_path: Path,
                                                                 cli: Callable[..., tuple[int, str, str]]) -> None:
    """`prune` forgets by the policy's rules only among the hosts it selects (every host of the
    config by default), as the retention step after a backup does, and both commands are runs of
    the same flows a deployment starts."""
    earlier = {flow: _flow_runs(flow) for flow in ("prune-run", "verify-run")}  # the server is the session's
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.img").write_bytes(random.Random(name).randbytes(4 * BLOCK))
    policies = {"keepall": {"block_size": BLOCK}, "trim": {"block_size": BLOCK, "keep_last": 1}}
    hosts = [{"name": f"lab-{n}", "transport": "local", "disks": [{"name": "os", "path": f"{n}.img"}]} for n in "abc"]
    everything = tmp_path / "all.yaml"
    everything.write_text(yaml.safe_dump({"storage": {"kind": "local", "path": "store"}, "hosts": hosts,
                                          "backup_policies": policies}))
    for _ in range(2):
        assert cli("backup", "-c", str(everything), "--policy", "keepall")[0] == 0
    # lab-c is gone from this config: its points belong to whoever still backs it up.
    without_c = tmp_path / "ab.yaml"
    without_c.write_text(yaml.safe_dump({"storage": {"kind": "local", "path": "store"}, "hosts": hosts[:2],
                                         "backup_policies": policies}))

    code, out, err = cli("prune", "-c", str(without_c), "--policy", "trim", "--host", "lab-a", "--json")
    assert code == 0, err
    assert [key.split("/")[1] for key in json.loads(out)["forgotten"]] == ["lab-a"]
    code, out, err = cli("prune", "-c", str(without_c), "--policy", "trim", "--json")
    assert code == 0, err
    assert [key.split("/")[1] for key in json.loads(out)["forgotten"]] == ["lab-b"]
    code, out, err = cli("points", "-c", str(everything), "--json")
    assert sorted(p["host"] for p in json.loads(out)) == ["lab-a", "lab-b", "lab-c", "lab-c"]

    assert cli("verify", "-c", str(without_c), "--policy", "trim")[0] == 0
    assert _flow_runs("prune-run")[len(earlier["prune-run"]):] == ["Completed", "Completed"]
    assert _flow_runs("verify-run")[len(earlier["verify-run"]):] == ["Completed"]
