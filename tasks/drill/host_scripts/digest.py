"""Read-only digest of a disk on a host: a tree digest for a directory, a content digest for an
image file or block device. Standard library only; opens nothing for writing and changes no
time stamp it records (atime is left out), so a drill can prove the primary untouched.

usage: python3 - PATH   ->  one JSON line: {"kind", "digest", "entries", "bytes"}
"""

import hashlib
import json
import os
import stat
import sys

READ = 4 * 1024 * 1024


def _open(path):
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    try:
        return os.open(path, flags | getattr(os, "O_NOATIME", 0))
    except PermissionError:
        # O_NOATIME is refused on files the caller does not own (unless root).
        return os.open(path, flags)


def content(path, h):
    total = 0
    fd = _open(path)
    try:
        while True:
            data = os.read(fd, READ)
            if not data:
                return total
            h.update(data)
            total += len(data)
    finally:
        os.close(fd)


def tree(root):
    h = hashlib.sha256()
    entries = nbytes = 0
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root)
            st = os.lstat(full)
            line = [rel, oct(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns]
            if stat.S_ISLNK(st.st_mode):
                line.append(os.readlink(full))
            elif stat.S_ISREG(st.st_mode):
                fh = hashlib.sha256()
                nbytes += content(full, fh)
                line += [st.st_size, fh.hexdigest()]
            h.update(json.dumps(line).encode() + b"\n")
            entries += 1
    return {"kind": "tree", "digest": "sha256:" + h.hexdigest(), "entries": entries, "bytes": nbytes}


def image(path):
    h = hashlib.sha256()
    nbytes = content(path, h)
    return {"kind": "image", "digest": "sha256:" + h.hexdigest(), "entries": 1, "bytes": nbytes}


def main(path):
    st = os.stat(path)
    found = tree(path) if stat.S_ISDIR(st.st_mode) else image(path)
    sys.stdout.write(json.dumps(found) + "\n")


if __name__ == "__main__":
    try:
        main(sys.argv[1])
    except OSError as exc:
        sys.stderr.write(f"digest: {exc.filename or sys.argv[1]}: {exc.strerror}\n")
        sys.exit(2)
