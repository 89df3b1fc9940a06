"""What a person reads in the Prefect UI, read back from a real Prefect server: sizes in units,
markdown that shows text literally, artifact keys per group and run names that say what ran."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
import yaml
from markdown_it import MarkdownIt

from flows.backup import backup_run
from flows.patch import patch_run
from tasks.rendering import artifact_key, human_size, markdown_text
from tests.hosts.aptlab import AptLab
from tests.hosts.sshd import SshdMaker

pytestmark = pytest.mark.e2e
SIZE = r"\d+(\.\d)? (Bytes|KiB|MiB|GiB)"


def run_artifacts(run_id: UUID) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        found = client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
    return {a.key: a for a in found if a.key}


def test_helpers() -> None:
    assert human_size(33554432) == "32.0 MiB"
    assert human_size(1536) == "1.5 KiB"
    assert markdown_text("a|b ~x~ *y* web-01") == r"a\|b \~x\~ \*y\* web-01"
    assert artifact_key("patch", "web+db", "summary") == "patch-web-db-summary"


def test_backup_artifact_shows_sizes_in_units_under_a_key_per_selection(prefect_server: None, tmp_path: Path) -> None:
    (tmp_path / "vm.img").write_bytes(random.Random(1).randbytes(3 * 1024 * 1024))
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(yaml.safe_dump({
        "storage": {"kind": "local", "path": "store"},
        "hosts": [{"name": "lab-1", "transport": "local", "groups": ["web"],
                   "disks": [{"name": "vm", "path": "vm.img", "kind": "block"}]}],
        "backup_policies": {"nightly": {"block_size": 1024 * 1024, "keep_last": 2}},
    }))

    state = backup_run(str(cfg), groups=["web"], policy="nightly", return_state=True)

    run_id = state.state_details.flow_run_id
    artifact = run_artifacts(run_id)["backup-web-nightly"]
    [row] = json.loads(artifact.data)
    assert row["scanned"] == "3.0 MiB"
    assert all(re.fullmatch(SIZE, row[c]) for c in ("changed", "uploaded", "stored")), row
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        name = client.read_flow_run(run_id).name
    assert name.startswith("backup web nightly "), name
    assert artifact.description.startswith(f"{name}: 1/1 disks backed up")


def test_a_debian_version_shows_literally_in_the_patch_plan(
        prefect_server: None, sshd_factory: SshdMaker, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> None:
    """A pair of single `~` is strikethrough in GitHub-flavoured markdown (as the Prefect UI
    renders it; markdown-it-py only knows `~~`, so every `~` is checked to be escaped)."""
    lab = AptLab(tmp_path_factory.mktemp("lab-tilde")).create()
    lab.install_base("demo-web", "20250101~deb12u1")
    lab.publish("security", "demo-web", "20250419~deb12u2")
    lab.install_base("demo-db", "1.0~rc1")
    lab.publish("security", "demo-db", "1.0~rc2")
    lab.apt_get("update")
    sshd = sshd_factory("tilde", namespace=True,
                        extra_config={"SetEnv": {**lab.env, "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}})
    always = [{"days": ["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "start": "00:00", "duration_minutes": 1440}]
    host = sshd.host_config(groups=["web"], maintenance_windows=always, connect_timeout=60)
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(yaml.safe_dump({"storage": {"kind": "local", "path": "store"},
                                   "hosts": [host.model_dump(mode="json", exclude_none=True)],
                                   "patch_policies": {"web": {"baseline_months": list(range(1, 13))}}}))

    state = patch_run(config_path=str(cfg), groups=["web"], dry_run=True, return_state=True)

    artifact = run_artifacts(state.state_details.flow_run_id)["patch-web-plan"]
    html = MarkdownIt("commonmark").enable(["table", "strikethrough"]).render(artifact.data)
    assert "<s>" not in html and "<del>" not in html, html
    assert re.search(r"(?<!\\)~", artifact.data) is None, artifact.data
    assert "demo-web=20250419~deb12u2" in html and "demo-db=1.0~rc2" in html, html
    assert "policy web (dry run)" in artifact.description
