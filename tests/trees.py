"""Directory trees for restore tests: one with every kind of entry and metadata a point keeps,
and a comparison that checks them all (diff -r for content, then metadata per entry)."""

from __future__ import annotations

import os
import stat
import struct
import subprocess
from pathlib import Path
from typing import Any

AS_ROOT = os.geteuid() == 0
T1, T2, T3 = 1_600_000_000_123_456_789, 1_500_000_000_000_000_000, 1_400_000_000_000_000_000
MIB = 1024 * 1024


def posix_acl(*entries: tuple[int, int, int]) -> bytes:
    """A system.posix_acl_access value (version 2; entries of tag, permissions, id), as setfacl writes it."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", tag, perm, ident) for tag, perm, ident in entries)


#: user::rw- user:1234:rwx group::r-- mask::rwx other::---
ACL = posix_acl((0x01, 6, 0xFFFFFFFF), (0x02, 7, 1234), (0x04, 4, 0xFFFFFFFF), (0x10, 7, 0xFFFFFFFF),
                (0x20, 0, 0xFFFFFFFF))


def rich_tree(root: Path) -> Path:
    """Files, nested directories, symlinks, a hard link pair, a FIFO, a sparse file, xattrs, an
    access and a default POSIX ACL, a device node (as root), odd modes and times, the top
    directory's own included."""
    (root / "etc" / "app").mkdir(parents=True)
    (root / "etc" / "app" / "app.conf").write_text("port = 8080\n")
    (root / "etc" / "current").symlink_to("app/app.conf")
    (root / "data").mkdir()
    (root / "data" / "table.db").write_bytes(os.urandom(100_000))
    os.link(root / "data" / "table.db", root / "data" / "table.hardlink")
    os.mkfifo(root / "data" / "pipe", 0o620)
    with open(root / "data" / "sparse.img", "wb") as handle:
        handle.truncate(64 * MIB)
        handle.seek(20 * MIB + 4096)
        handle.write(os.urandom(MIB))
    os.setxattr(root / "etc" / "app" / "app.conf", "user.origin", b"primary\x00\xff")
    os.setxattr(root / "etc" / "app", "user.dir-note", b"kept")
    os.setxattr(root / "data" / "table.db", "system.posix_acl_access", ACL)
    # Set after its files exist, as on a live system: a restore must not let new files inherit it.
    os.setxattr(root / "etc" / "app", "system.posix_acl_default", ACL)
    if AS_ROOT:
        os.mknod(root / "data" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.chown(root / "etc" / "app" / "app.conf", 4321, 8765)
    os.chmod(root / "etc" / "app" / "app.conf", 0o640)
    os.chmod(root / "data", 0o751)
    os.chmod(root, 0o755)
    for path, moment in ((root / "etc" / "app" / "app.conf", T1), (root / "data" / "sparse.img", T2),
                         (root / "etc" / "app", T3), (root / "data", T1), (root / "etc", T2), (root, T3)):
        os.utime(path, ns=(moment, moment))
    os.utime(root / "etc" / "current", ns=(T2, T2), follow_symlinks=False)
    return root


def describe(root: Path) -> dict[str, Any]:
    """Every entry's kind and metadata (the root's as ""), and which paths share an inode."""
    found: dict[str, Any] = {}
    inodes: dict[int, list[str]] = {}
    for path in [root, *sorted(root.rglob("*"))]:
        rel = path.relative_to(root).as_posix() if path != root else ""
        st = os.lstat(path)
        kind = stat.S_IFMT(st.st_mode)
        xattrs = {} if stat.S_ISLNK(st.st_mode) or stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode) else {
            n: os.getxattr(path, n, follow_symlinks=False) for n in os.listxattr(path, follow_symlinks=False)
            if not n.startswith("trusted.SGI_ACL_")}  # XFS's own mirror of the POSIX ACL
        # A directory's size is the file system's business; a restore only keeps the others'.
        size = st.st_size if stat.S_ISREG(st.st_mode) else None
        found[rel] = (kind, stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns, size, xattrs,
                      st.st_rdev if stat.S_ISCHR(st.st_mode) else None,
                      os.readlink(path) if stat.S_ISLNK(st.st_mode) else None)
        if stat.S_ISREG(st.st_mode):
            inodes.setdefault(st.st_ino, []).append(rel)
    found["hard link groups"] = sorted(sorted(g) for g in inodes.values() if len(g) > 1)
    return found


def assert_same_tree(expected: Path, actual: Path) -> None:
    """Same content (diff -r, links compared as links, FIFOs and devices skipped by diff) and the
    same metadata entry by entry."""
    diff = subprocess.run(["diff", "-r", "--no-dereference", str(expected), str(actual)],
                          capture_output=True, text=True)
    # diff reports FIFOs and device nodes as "special files"; their metadata is compared below.
    problems = [line for line in diff.stdout.splitlines() if "is a fifo" not in line
                and "is a character special file" not in line]
    assert not problems, "\n".join(problems)
    want, got = describe(expected), describe(actual)
    assert sorted(want) == sorted(got)
    for rel in want:
        assert want[rel] == got[rel], (rel, want[rel], got[rel])


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


class Escape:
    """A point's tree, a directory outside any target, and a target where links to it are
    planted at every depth: instead of a top-level directory, a nested one and a file, plus a
    hard link to a file outside. A restore must leave `outside` exactly as `before`."""

    def __init__(self, base: Path) -> None:
        self.src = base / "src"
        (self.src / "text" / "deep").mkdir(parents=True)
        (self.src / "text" / "deep" / "a.txt").write_text("a\n")
        (self.src / "nested" / "inner").mkdir(parents=True)
        (self.src / "nested" / "inner" / "b.txt").write_text("b\n")
        (self.src / "file.txt").write_text("file\n")
        (self.src / "shared.txt").write_text("shared\n")
        os.chmod(self.src / "text", 0o755)
        self.outside = base / "elsewhere"
        self.outside.mkdir()
        (self.outside / "secret.txt").write_text("do not touch\n")
        os.chmod(self.outside, 0o700)
        os.chmod(self.outside / "secret.txt", 0o600)
        self.before = self.state()
        self.target = base / "target"

    def plant(self) -> Path:
        self.target.mkdir()
        (self.target / "text").symlink_to(self.outside)
        (self.target / "nested").mkdir()
        (self.target / "nested" / "inner").symlink_to(self.outside)
        (self.target / "file.txt").symlink_to(self.outside / "secret.txt")
        os.link(self.outside / "secret.txt", self.target / "shared.txt")
        return self.target

    def state(self) -> list[tuple[str, int, int, bytes]]:
        return [(p.name, os.lstat(p).st_mode, os.lstat(p).st_mtime_ns, p.read_bytes() if p.is_file() else b"")
                for p in [self.outside, *sorted(self.outside.rglob("*"))]]
