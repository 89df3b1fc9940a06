"""The demo's drill when the restored application is not what the plan expects.

Real parts only: notes-app installed and seeded by its own seed.py, backed up by the real backup
engine into a local store, drilled by the demo's own code on a real Prefect test server, the copy
started in a real network namespace and probed there over HTTP and with sqlite3.
"""

from __future__ import annotations

import io
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console

import cli.demo as demo
from cli.demo_screen import WIDTH, Step, block
from configs.loader import load_config
from configs.policies import BackupPolicy
from tasks.backup.disk import back_up_disk

pytestmark = pytest.mark.e2e


def lab_notes_config(root: Path, home: Path) -> Path:
    """lab.yaml's host and plan lab-notes as shipped, with the notes disk, store and copy in root."""
    lab: dict[str, Any] = yaml.safe_load(demo.LAB_CONFIG.read_text())
    host = lab["hosts"][0] | {"disks": [{"name": "notes", "path": str(home), "kind": "directory"}]}
    plan = lab["recovery_plans"][demo.DRILL_PLAN]
    member = plan["groups"][0]["members"][0]
    member["target"]["path"] = str(root / "drill")
    # The probes here fail for good once the copy listens (wrong data, not a slow start): a
    # short retry window instead of the default 30 s; the wait for the port uses it too, so it
    # keeps room for a slow start on a busy machine.
    member["app"]["ready_wait_seconds"] = 10
    cfg = root / "lab.yaml"
    cfg.write_text(yaml.safe_dump({"version": 1, "storage": {"kind": "local", "path": str(root / "store")},
                                   "hosts": [host], "recovery_plans": {demo.DRILL_PLAN: plan}}, sort_keys=False))
    return cfg


def test_a_copy_with_other_data_fails_the_demo_drill_and_is_still_cleaned_up(
        prefect_server: None, tmp_path: Path) -> None:
    # Seeded with fewer notes than plan lab-notes expects: the app starts, but /health and the
    # SQL count disagree with the plan, as after a restore of the wrong data.
    home = tmp_path / "notes-app"
    demo.install_notes_app(home, notes=7)
    cfg = lab_notes_config(tmp_path, home)
    loaded = load_config(cfg)
    host = loaded.config.hosts[0]
    back_up_disk(loaded.config.storage, loaded.base_dir, host, host.disks[0],
                 BackupPolicy(block_size=65536, snapshot_method="none"))
    step = Step("drill")

    report = demo.drill_step(step, cfg, reports=tmp_path / "reports")

    assert step.ok is False
    console = Console(width=WIDTH, record=True, file=io.StringIO())
    console.print(block(step, 1.0))
    out = console.export_text()
    assert "probes inside it: http ✗  sql ✗  checksum ✓" in out, out
    assert re.search(r"sql: returned '7'", out), out
    assert "cleanup: process, path, copy-root, namespace: each checked gone" in out, out
    assert "drill failed" in out, out
    assert max(len(line) for line in out.splitlines()) <= WIDTH
    namespace = re.search(r"started in namespace (\S+):", out)
    assert namespace, out
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert namespace.group(1) not in listed
    assert not (tmp_path / "drill").exists()
    assert report is not None and report.exists()
    assert len(list((tmp_path / "reports").glob("drill-lab-notes-*.html"))) == 1
