"""Restores that never leave their target, equal the point, keep metadata and survive a kill:
real local stores, real file systems, real processes."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import pytest

from connectors.stores import LocalBlobStore
from tasks.backup.sources import remote as remote_source
from tasks.backup.engine import BackupRequest, backup
from tasks.backup.errors import PointNotFound, RestoreFailed
from tasks.backup.repo.repository import Repository
from tasks.backup.restore import restore
from tasks.backup.sources.local import LocalBlockSource, LocalTreeSource
from tests.trees import ACL, AS_ROOT, MIB, Escape, allocated, assert_same_tree, rich_tree

BLOCK = 64 * 1024
ROOT = Path(__file__).resolve().parents[2]


def request(disk: str = "data", **extra: object) -> BackupRequest:
    return BackupRequest(host="web-1", disk=disk, block_size=BLOCK, workers=3, **extra)  # type: ignore[arg-type]


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.open(LocalBlobStore(tmp_path / "repo"), create=True)


def test_forced_restore_never_follows_links_planted_at_any_depth(repo: Repository, tmp_path: Path) -> None:
    escape = Escape(tmp_path)
    point = backup(repo, LocalTreeSource(escape.src), request())
    result = restore(repo, point, escape.plant(), force=True)
    assert escape.state() == escape.before, "the restore wrote outside its target"
    assert_same_tree(escape.src, escape.target)
    assert not any(p.is_symlink() for p in escape.target.rglob("*"))
    assert result.removed == 0


def test_a_target_that_is_itself_a_link_is_refused(repo: Repository, tmp_path: Path) -> None:
    escape = Escape(tmp_path)
    point = backup(repo, LocalTreeSource(escape.src), request())
    outside, before = escape.outside, escape.before
    link = tmp_path / "target"
    link.symlink_to(outside)
    with pytest.raises(RestoreFailed, match=r"'.*/target' is a symbolic link \(to '.*/elsewhere'\)"):
        restore(repo, point, link, force=True)
    assert escape.state() == before

    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(1).randbytes(4 * BLOCK))
    image_point = backup(repo, LocalBlockSource(image), request(disk="os"))
    file_link = tmp_path / "image-link"
    file_link.symlink_to(outside / "secret.txt")
    with pytest.raises(RestoreFailed, match="image-link' is a symbolic link"):
        restore(repo, image_point, file_link, force=True)
    assert escape.state() == before


def test_failback_onto_a_drifted_tree_equals_the_point(repo: Repository, tmp_path: Path) -> None:
    src = rich_tree(tmp_path / "primary")
    old = backup(repo, LocalTreeSource(src), request())
    target = tmp_path / "dr"
    restore(repo, old, target)
    assert_same_tree(src, target)

    # The primary moves on; the DR copy drifts its own way (it ran as the primary for a while).
    (src / "etc" / "app" / "app.conf").write_text("port = 9090\n")
    os.utime(src / "etc" / "app" / "app.conf", ns=(1, 1))
    (src / "etc" / "current").unlink()
    new = backup(repo, LocalTreeSource(src), request())
    (target / "extra-dir" / "sub").mkdir(parents=True)
    (target / "extra-dir" / "sub" / "x.log").write_text("x")
    (target / "extra.txt").write_text("extra")
    (target / "data" / "table.db").write_bytes(b"changed on the DR side")
    shutil.rmtree(target / "etc" / "app")
    (target / "etc" / "app").write_text("a file where a directory was")
    os.setxattr(target / "data" / "sparse.img", "user.stray", b"1")
    os.chmod(target, 0o700)

    result = restore(repo, new, target, force=True)
    assert_same_tree(src, target)
    # extra-dir, extra-dir/sub, extra-dir/sub/x.log, extra.txt and the link the point dropped
    assert result.removed == 5


def test_restore_keeps_metadata_sparseness_links_and_special_files(repo: Repository, tmp_path: Path) -> None:
    src = rich_tree(tmp_path / "src")
    point = backup(repo, LocalTreeSource(src), request())
    target = tmp_path / "out"
    result = restore(repo, point, target)
    assert_same_tree(src, target)
    assert os.getxattr(target / "data" / "table.db", "system.posix_acl_access") == ACL
    assert os.stat(target / "data" / "table.db").st_ino == os.stat(target / "data" / "table.hardlink").st_ino
    assert stat.S_ISFIFO(os.lstat(target / "data" / "pipe").st_mode)
    assert allocated(target / "data" / "sparse.img") <= 2 * MIB  # 1 MiB of data in a 64 MiB file
    assert result.skipped == []


def test_device_nodes_without_root_are_listed_as_skipped(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Runs a real restore as an unprivileged user (setpriv), so a device node cannot be made."""
    if not AS_ROOT or not shutil.which("setpriv"):
        pytest.skip("needs root to make the device node and setpriv to drop privileges")
    # Somewhere the unprivileged user can reach (pytest's own temporary root is private to root).
    shared = Path(tempfile.mkdtemp(prefix="patchdrill-nonroot-"))
    try:
        os.chmod(shared, 0o777)
        src = shared / "src"
        src.mkdir()
        os.mknod(src / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        (src / "plain.txt").write_text("plain\n")
        repo = Repository.open(LocalBlobStore(shared / "repo"), create=True)
        backup(repo, LocalTreeSource(src), request())
        for path in (shared / "repo").rglob("*"):
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
        os.chmod(shared / "repo", 0o755)
        out = shared / "out"
        script = textwrap.dedent(f"""
            from connectors.stores import LocalBlobStore
            from tasks.backup.repo.repository import Repository
            from tasks.backup.restore import restore
            repo = Repository.open(LocalBlobStore({str(shared / "repo")!r}))
            print(restore(repo, repo.find_point("web-1", "data"), {str(out)!r}).skipped)
        """)
        done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
                               script], cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HOME": "/tmp"})
        assert done.returncode == 0, done.stderr
        assert "null: device node: only root can create it" in done.stdout
        assert (out / "plain.txt").read_text() == "plain\n"
        assert not (out / "null").exists()
    finally:
        shutil.rmtree(shared)


def test_image_holes_inside_blocks_are_punched(repo: Repository, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    with open(image, "wb") as handle:
        for index in range(16):  # every block: 4 KiB of data, then zeros
            handle.write(random.Random(index).randbytes(4096) + bytes(BLOCK - 4096))
    point = backup(repo, LocalBlockSource(image), request(disk="os"))
    fresh = tmp_path / "fresh.img"
    restore(repo, point, fresh)
    assert fresh.read_bytes() == image.read_bytes()
    assert allocated(fresh) <= 16 * 8192

    drifted = tmp_path / "drifted.img"
    drifted.write_bytes(random.Random(99).randbytes(16 * BLOCK))  # fully allocated, every block differs
    restore(repo, point, drifted, force=True)
    assert drifted.read_bytes() == image.read_bytes()
    assert allocated(drifted) <= 16 * 8192


def test_same_size_edit_with_reset_mtime_is_backed_up(repo: Repository, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    conf = src / "app.conf"
    conf.write_text("secret = aaaa\n")
    (src / "big.bin").write_bytes(random.Random(2).randbytes(3 * BLOCK))
    first = backup(repo, LocalTreeSource(src), request())
    mtime = conf.stat().st_mtime_ns
    conf.write_text("secret = bbbb\n")  # same size...
    os.utime(conf, ns=(mtime, mtime))   # ...and the old mtime, as `touch -r` or a careless tool leaves it
    second = backup(repo, LocalTreeSource(src), request())
    assert second.totals.scanned == len("secret = bbbb\n")  # read again; big.bin still not
    out = tmp_path / "out"
    restore(repo, second, out)
    assert (out / "app.conf").read_text() == "secret = bbbb\n"

    replaced = src / "big.bin"
    replacement = tmp_path / "big.new"
    shutil.copy2(replaced, replacement)  # same size, bytes and mtime, another inode
    os.replace(replacement, replaced)
    third = backup(repo, LocalTreeSource(src), request())
    assert third.totals.scanned == 3 * BLOCK and third.totals.uploaded_chunks == 0

    everything = backup(repo, LocalTreeSource(src), request(rehash=True))
    assert everything.totals.scanned == 3 * BLOCK + len("secret = bbbb\n")
    assert everything.totals.uploaded_chunks == 0
    assert first.totals.scanned == everything.totals.scanned


def test_a_point_prefix_shared_by_several_points_is_refused(repo: Repository, tmp_path: Path) -> None:
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(3).randbytes(2 * BLOCK))
    points = [backup(repo, LocalBlockSource(image), request(disk="os")) for _ in range(3)]
    stamps = [p.key.rsplit("/", 1)[1].removesuffix(".json") for p in points]
    day = stamps[0][:8]
    with pytest.raises(PointNotFound, match=rf"'{day}' matches 3 points .*{stamps[0]}, {stamps[1]}, {stamps[2]}"):
        repo.find_point("web-1", "os", day)
    assert repo.find_point("web-1", "os", stamps[1]).key == points[1].key
    assert repo.find_point("web-1", "os", points[2].key).key == points[2].key


_STALLING_RESTORE = textwrap.dedent("""
    import sys, threading
    from pathlib import Path
    from connectors.stores import LocalBlobStore
    from tasks.backup.repo.repository import Repository
    from tasks.backup.restore import restore

    class StallingStore(LocalBlobStore):
        # After `allowed` chunk reads every read blocks forever, so the parent can kill us mid-restore.
        gets = 0
        def get(self, key):
            if key.startswith("chunks/"):
                StallingStore.gets += 1
                if StallingStore.gets > int(sys.argv[3]):
                    Path(sys.argv[4]).touch()
                    threading.Event().wait()
            return super().get(key)

    repo = Repository.open(StallingStore(Path(sys.argv[1])))
    restore(repo, repo.find_point("web-1", sys.argv[5]), sys.argv[2], workers=1)
""")


@pytest.mark.parametrize("kind", ["os", "data"])
def test_a_killed_restore_leaves_a_temporary_the_next_one_removes(repo: Repository, tmp_path: Path, kind: str) -> None:
    if kind == "os":
        image = tmp_path / "disk.img"
        image.write_bytes(random.Random(4).randbytes(32 * BLOCK))
        point = backup(repo, LocalBlockSource(image), request(disk="os"))
    else:
        src = tmp_path / "src"
        src.mkdir()
        for i in range(8):
            (src / f"f{i}.bin").write_bytes(random.Random(i).randbytes(2 * BLOCK))
        point = backup(repo, LocalTreeSource(src), request(disk="data"))
    target_dir = tmp_path / "dr"
    target_dir.mkdir()
    target = target_dir / "restored"
    stalled = tmp_path / "stalled"
    proc = subprocess.Popen([sys.executable, "-c", _STALLING_RESTORE, str(repo.store.root), str(target), "5",  # type: ignore[attr-defined]
                             str(stalled), kind], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        while not stalled.exists():
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "exited"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    [leftover] = target_dir.iterdir()
    assert leftover.name.startswith(".restored.patchdrill-restore-")  # hidden, but named for what it is

    restore(repo, point, target)
    assert [p.name for p in target_dir.iterdir()] == ["restored"]


def test_read_only_target_is_one_error_naming_the_target(repo: Repository, tmp_path: Path) -> None:
    if not AS_ROOT:
        pytest.skip("needs root to mount a read-only file system")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a\n")
    tree_point = backup(repo, LocalTreeSource(src), request())
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(5).randbytes(2 * BLOCK))
    image_point = backup(repo, LocalBlockSource(image), request(disk="os"))
    media = tmp_path / "media"
    media.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(media)], check=True)
    try:
        for point, name, force in ((tree_point, "tree", False), (tree_point, "", False), (image_point, "disk.img", False)):
            where = media / name if name else media
            with pytest.raises(RestoreFailed) as caught:
                restore(repo, point, where, force=force)
            message = str(caught.value)
            assert message.startswith(f"cannot restore into {str(where)!r}") and "Read-only file system" in message
            assert "patchdrill-restore" not in message
    finally:
        subprocess.run(["umount", str(media)], check=True)


def test_restored_files_and_directories_are_fsynced(repo: Repository, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """os.fsync is wrapped (still called for real) to record what was flushed: no real part can
    observe a missing fsync short of cutting the power."""
    src = tmp_path / "src"
    (src / "a" / "b").mkdir(parents=True)
    (src / "a" / "b" / "f.txt").write_text("f\n")
    (src / "top.txt").write_text("t\n")
    image = tmp_path / "disk.img"
    image.write_bytes(random.Random(6).randbytes(2 * BLOCK))
    tree_point = backup(repo, LocalTreeSource(src), request())
    image_point = backup(repo, LocalBlockSource(image), request(disk="os"))
    flushed: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        flushed.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    out = tmp_path / "out"
    restore(repo, tree_point, out)
    restore(repo, image_point, tmp_path / "back.img")
    # A new target is written under its temporary name and renamed: count it under its final one.
    final = [re.sub(r"/\.([^/]+)\.patchdrill-restore-[0-9a-f]{12}", r"/\1", f) for f in flushed]
    expected = {str(out / p).rstrip("/") for p in ("", "a", "a/b", "a/b/f.txt", "top.txt")}
    assert expected | {str(tmp_path / "back.img")} <= set(final)
    # Each directory holding a renamed target is flushed after the rename, so the name is durable too.
    assert final.count(str(tmp_path)) == 2
    assert final.index(str(tmp_path)) > final.index(str(out))
    assert final.index(str(tmp_path), final.index(str(tmp_path / "back.img"))) > final.index(str(tmp_path / "back.img"))


def test_a_disk_path_that_is_a_link_keeps_the_directory_it_leads_to(repo: Repository, tmp_path: Path) -> None:
    real = tmp_path / "volume"
    real.mkdir()
    (real / "a.txt").write_text("a\n")
    os.chmod(real, 0o750)
    os.utime(real, ns=(1_500_000_000_000_000_000,) * 2)
    (tmp_path / "data").symlink_to(real)
    point = backup(repo, LocalTreeSource(tmp_path / "data"), request())
    out = tmp_path / "out"
    restore(repo, point, out)
    assert_same_tree(real, out)


def test_a_version_1_directory_point_still_restores(repo: Repository, tmp_path: Path) -> None:
    """A map as patchdrill wrote it before version 2: no root, ctime, inode or xattrs."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("a\n")
    point = backup(repo, LocalTreeSource(src), request())
    body = repo.get_map(point.map.id)
    v1_fields = ("path", "type", "mode", "uid", "gid", "mtime_ns", "size", "chunks", "target")
    v1 = {"kind": "directory", "block_size": body["block_size"],
          "entries": [{k: v for k, v in e.items() if k in v1_fields} for e in body["entries"]]}
    old = point.model_copy(update={"map": point.map.model_copy(update={"id": repo.put_map(v1)}),
                                   "time": point.time + timedelta(seconds=1)})
    repo.write_point(old)
    out = tmp_path / "out"
    out.mkdir()
    os.chmod(out, 0o701)
    os.setxattr(out, "user.mine", b"1")
    (out / "a.txt").write_text("b\n")
    os.setxattr(out / "a.txt", "user.mine", b"2")
    restore(repo, old, out, force=True)
    assert (out / "a.txt").read_text() == "a\n"
    # The old map says nothing of the top directory or of xattrs: the target's stay.
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o701
    assert os.getxattr(out, "user.mine") == b"1" and os.getxattr(out / "a.txt", "user.mine") == b"2"
    # A version 1 parent proves no ctime: the next backup reads the file once more.
    assert backup(repo, LocalTreeSource(src), request()).totals.scanned == len("a\n")


@pytest.mark.parametrize("hostile", ["../escape.txt", "a/../../escape.txt", "/tmp/escape.txt", "a//b", "."])
def test_a_map_naming_paths_out_of_the_target_is_refused(repo: Repository, tmp_path: Path, hostile: str) -> None:
    """Whoever can write to an unencrypted store can write a map: its paths are not trusted."""
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "b.txt").write_text("b\n")
    point = backup(repo, LocalTreeSource(src), request())
    body = repo.get_map(point.map.id)
    body["entries"].append(dict(body["entries"][-1], path=hostile))
    forged = point.model_copy(update={"map": point.map.model_copy(update={"id": repo.put_map(body)}),
                                      "time": point.time + timedelta(seconds=1)})
    repo.write_point(forged)
    out = tmp_path / "dr" / "out"
    with pytest.raises(RestoreFailed, match=r"refusing entry path .*: it would lead out of the target"):
        restore(repo, forged, out)
    assert sorted(p.name for p in tmp_path.rglob("escape.txt")) == []
    assert list((tmp_path / "dr").iterdir()) == []  # the half-built temporary is gone too


def test_the_host_writer_refuses_partial_content_for_a_file_it_must_create(tmp_path: Path) -> None:
    """The controller sends only differing blocks for files the host said it holds; if such a
    file is gone (or replaced) by the time it is written, the writer stops instead of leaving a
    file made of those blocks and zeros. blockscan.py runs as the host runs it: python3 - place."""
    target = tmp_path / "t"
    target.mkdir()
    entry = {"path": "f", "type": "file", "mode": 0o644, "uid": 0, "gid": 0, "mtime_ns": 0, "size": 8192,
             "partial": True}
    (tmp_path / "plan").write_text(json.dumps({"root": None, "prune": False, "block_size": 4096, "entries": [entry]}))
    (tmp_path / "data").write_bytes(struct.pack(">IQI", 0, 1, 4096) + b"x" * 4096)
    script = remote_source.SCRIPT.read_text()
    done = subprocess.run(["python3", "-", "place", str(tmp_path / "plan"), str(tmp_path / "data"), str(target)],
                          input=script, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr == f"blockscan: cannot restore into {target} (at f): f changed while being restored; restore again\n"
    assert not (tmp_path / "plan").exists() and not (tmp_path / "data").exists()
