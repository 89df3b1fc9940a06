"""The instant-restore tier through the real `patchdrill` app on the Prefect test server: image
files on a real loop-mounted XFS (tests/hosts/loopfs.py), their clones kept beside them by the
backups, restored by cloning, and from the repository when the clone is gone."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import pytest
import yaml

from tests.e2e.test_backup_cli import cli  # noqa: F401 - a fixture
from tests.hosts.loopfs import xfs  # noqa: F401 - a fixture

pytestmark = pytest.mark.e2e
BLOCK = 64 * 1024
Cli = Callable[..., tuple[int, str, str]]


@pytest.fixture
def lab(tmp_path: Path, xfs: Path) -> Path:  # noqa: F811
    (xfs / "vm.img").write_bytes(random.Random(7).randbytes(32 * BLOCK))
    cfg = tmp_path / "lab.yaml"
    cfg.write_text(yaml.safe_dump({
        "storage": {"kind": "local", "path": "store"},
        "hosts": [{"name": "lab-1", "transport": "local", "disks": [{"name": "vm", "path": str(xfs / "vm.img")}]}],
        "backup_policies": {"default": {"block_size": BLOCK, "keep_last": 2,
                                        "kept_clones": {"points": 2, "days": 5, "space_limit": "64MiB"}}},
    }))
    return cfg


def backup(cli: Cli, lab: Path) -> dict:  # noqa: F811
    code, out, err = cli("backup", "-c", str(lab), "--json")
    assert code == 0, err
    [row] = json.loads(out)
    return row


def points(cli: Cli, lab: Path) -> list[dict]:  # noqa: F811
    code, out, err = cli("points", "-c", str(lab), "--json")
    assert code == 0, err
    return json.loads(out)


def restore(cli: Cli, lab: Path, target: Path, *extra: str) -> tuple[int, dict | str]:  # noqa: F811
    code, out, err = cli("restore", "lab-1", "vm", str(target), "-c", str(lab), "--json", *extra)
    return code, (json.loads(out) if code == 0 else err)


def test_restores_clone_kept_points_and_fall_back_to_the_repository(
        prefect_server: None, lab: Path, xfs: Path, tmp_path: Path, cli: Cli) -> None:  # noqa: F811
    image = xfs / "vm.img"
    states = []
    for round_ in range(3):
        with image.open("r+b") as handle:
            handle.seek(round_ * 5 * BLOCK + 100)
            handle.write(random.Random(round_).randbytes(BLOCK))
        states.append(image.read_bytes())
        row = backup(cli, lab)
        assert row["status"] == "ok" and row["warning"] is None
        if round_:
            assert row["scanned_bytes"] <= 2 * BLOCK, "the incremental read more than the changed blocks"

    # keep_last 2 forgot the first point, and its clone went with it.
    listed = points(cli, lab)
    assert len(listed) == 2 and [p["instant_copy"] for p in listed] == [True, True]
    kept = sorted(p.name for p in (xfs / ".patchdrill-kept" / "lab-1" / "vm").iterdir())
    assert {k.removesuffix(".img") for k in kept} == {p["kept_clone"]["path"].rsplit("/", 1)[1].removesuffix(".img")
                                                      for p in listed}
    older, newer = listed

    # An instant restore of the older point to a new file on the same file system.
    target = xfs / "restored" / "vm.img"
    code, result = restore(cli, lab, target, "--point", _stamp(older))
    assert code == 0, result
    assert result["source"] == "instant copy" and result["notes"] == [] and result["blocks_written"] == 0
    assert target.read_bytes() == states[1]
    assert not [p for p in target.parent.iterdir() if p.name != "vm.img"], "a temporary file was left"

    # An existing target is refused without --force, and left as it was.
    target.write_bytes(b"something else")
    code, err = restore(cli, lab, target, "--point", _stamp(older))
    assert code == 1 and "exists" in str(err) and "Traceback" not in str(err)
    assert target.read_bytes() == b"something else"

    # Forced over the live image itself, changed since: the image is the point again.
    with image.open("r+b") as handle:
        handle.seek(3 * BLOCK)
        handle.write(b"live writes after the last backup")
        handle.truncate(40 * BLOCK)
    code, result = restore(cli, lab, image, "--force")
    assert code == 0 and result["source"] == "instant copy", result
    assert image.read_bytes() == states[2]

    # A kept clone deleted by hand: the restore comes from the repository, and says why.
    Path(older["kept_clone"]["path"]).unlink()
    assert [p["instant_copy"] for p in points(cli, lab)] == [False, True]
    fallback = tmp_path / "from-repo.img"
    code, result = restore(cli, lab, fallback, "--point", _stamp(older))
    assert code == 0 and result["source"] == "repository", result
    assert any("is missing" in note for note in result["notes"]), result["notes"]
    assert fallback.read_bytes() == states[1]

    # A target on another file system cannot be cloned to: the repository serves it.
    other_fs = tmp_path / "other.img"
    code, result = restore(cli, lab, other_fs)
    assert code == 0 and result["source"] == "repository" and other_fs.read_bytes() == states[2], result

    # The table says the same as the JSON.
    code, out, err = cli("points", "-c", str(lab))
    assert code == 0 and "instant" in out and "yes" in out, out


def test_forgetting_a_point_removes_its_clone(prefect_server: None, lab: Path, xfs: Path, cli: Cli) -> None:  # noqa: F811
    image = xfs / "vm.img"
    for round_ in range(2):
        with image.open("r+b") as handle:
            handle.write(random.Random(round_).randbytes(BLOCK))
        backup(cli, lab)
    config = yaml.safe_load(lab.read_text())
    config["backup_policies"]["default"]["keep_last"] = 1
    lab.write_text(yaml.safe_dump(config))
    code, out, err = cli("prune", "-c", str(lab), "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert len(summary["forgotten"]) == 1 and len(summary["kept_clones_dropped"]) == 1, summary
    [left] = points(cli, lab)
    assert left["instant_copy"] is True
    assert [p.name for p in (xfs / ".patchdrill-kept" / "lab-1" / "vm").iterdir()] == [
        Path(left["kept_clone"]["path"]).name]


def _stamp(point: dict) -> str:
    return point["kept_clone"]["path"].rsplit("/", 1)[1].removesuffix(".img")
