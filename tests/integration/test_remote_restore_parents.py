"""A restore onto a host whose target directory's parents do not exist yet (a fresh DR volume):
the restore makes them, for image and directory points, over a real sshd host."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from configs.models import HostConfig
from connectors import connect
from connectors.stores import LocalBlobStore
from tasks.backup.engine import BackupRequest, backup
from tasks.backup.remote_restore import restore_to_host
from tasks.backup.repo.repository import Repository
from tasks.backup.sources.local import LocalBlockSource, LocalTreeSource

pytestmark = pytest.mark.integration
BLOCK = 64 * 1024


def test_a_restore_onto_a_host_creates_the_targets_missing_parents(ssh_host_config: HostConfig, tmp_path: Path) -> None:
    image = tmp_path / "vm.img"
    image.write_bytes(random.Random(40).randbytes(5 * BLOCK + 17))
    tree = tmp_path / "www"
    (tree / "css").mkdir(parents=True)
    (tree / "index.html").write_text("hello\n")
    (tree / "css" / "site.css").write_text("body {}\n")
    repo = Repository.open(LocalBlobStore(tmp_path / "repo"), create=True)
    block_point = backup(repo, LocalBlockSource(str(image)), BackupRequest(host="src", disk="vm", block_size=BLOCK, workers=2))
    tree_point = backup(repo, LocalTreeSource(tree), BackupRequest(host="src", disk="www", block_size=BLOCK, workers=2))

    fresh = tmp_path / "new-volume" / "dr" / "deeper"
    assert not fresh.parent.parent.exists()
    with connect(ssh_host_config) as connector:
        restore_to_host(repo, block_point, connector, str(fresh / "vm.img"))
        restore_to_host(repo, tree_point, connector, str(fresh / "site" / "www"))
    assert (fresh / "vm.img").read_bytes() == image.read_bytes()
    assert (fresh / "site" / "www" / "css" / "site.css").read_text() == "body {}\n"
    # Nothing but the targets was left in the directories the restore made.
    assert sorted(p.name for p in fresh.iterdir()) == ["site", "vm.img"]
    assert [p.name for p in (fresh / "site").iterdir()] == ["www"]
