"""Hash a disk's fixed-size blocks on the host, and read selected blocks back.

Runs on the host with nothing but the Python 3 standard library (fed to `python3 -` by the
connector, so nothing is left behind). Only hashes, and then only the changed blocks the
controller asks for, cross the network.

    python3 - scan PATH BLOCK_SIZE
        one JSON object: {"hash": "blake2b-256", "size": N, "block_size": B, "fingerprints": "<hex>"}
        (the 32-byte digests of every block, concatenated in order)
    python3 - read PATH BLOCK_SIZE INDEX...
        one line per index: "<index> <base64 of the block>"
    python3 - files ROOT BLOCK_SIZE RELPATH...
        every block of each file: one line per block, "<file number> <base64 of the block>"
        (file number = position in the argument list; an empty file has no line)
    python3 - apply PATCH WORK BLOCK_SIZE SIZE FINISH RENAME
        write the blocks in PATCH (records: 8-byte big-endian index, 4-byte length, data) into
        WORK at index * BLOCK_SIZE, then delete PATCH; with FINISH=1 also cut WORK to SIZE
        (regular files), fsync it and, unless RENAME is "-", rename it to RENAME
    python3 - tree PATH 0
        one JSON object per line for every entry under PATH, parents first, in path order:
        {"path", "type": "file"|"dir"|"symlink"|"other", "mode", "uid", "gid", "mtime_ns",
         "size", "target"} (metadata only: the controller decides which files to read)

Exit status 2 with a one-line message on stderr when the path cannot be read.
"""

import base64
import hashlib
import json
import os
import stat
import struct
import sys

DIGEST_SIZE = 32


def disk_size(handle):
    return handle.seek(0, os.SEEK_END)


def scan(path, block_size):
    buffer = bytearray(block_size)
    view = memoryview(buffer)
    digests = []
    with open(path, "rb", buffering=0) as handle:
        size = disk_size(handle)
        handle.seek(0)
        remaining = size
        while remaining > 0:
            want = min(block_size, remaining)
            filled = 0
            while filled < want:
                got = handle.readinto(view[filled:want])
                if not got:
                    break
                filled += got
            if filled == 0:
                break
            digests.append(hashlib.blake2b(view[:filled], digest_size=DIGEST_SIZE).hexdigest())
            remaining -= filled
    json.dump({"hash": "blake2b-256", "size": size, "block_size": block_size, "fingerprints": "".join(digests)},
              sys.stdout)


def read(path, block_size, indexes):
    out = sys.stdout
    with open(path, "rb") as handle:
        for index in indexes:
            handle.seek(index * block_size)
            data = handle.read(block_size)
            out.write("%d %s\n" % (index, base64.b64encode(data).decode("ascii")))


def apply(patch, work, block_size, size, finish, rename):
    fd = os.open(work, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        with open(patch, "rb") as records:
            while True:
                head = records.read(12)
                if len(head) < 12:
                    break
                index, length = struct.unpack(">QI", head)
                data = records.read(length)
                if len(data) != length:
                    raise OSError(5, "truncated patch file")
                os.pwrite(fd, data, index * block_size)
        os.unlink(patch)
        if finish:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.ftruncate(fd, size)
            os.fsync(fd)
    finally:
        os.close(fd)
    if finish and rename != "-":
        os.replace(work, rename)


def files(root, block_size, names):
    out = sys.stdout
    for number, name in enumerate(names):
        with open(os.path.join(root, name), "rb") as handle:
            while True:
                data = handle.read(block_size)
                if not data:
                    break
                out.write("%d %s\n" % (number, base64.b64encode(data).decode("ascii")))


def tree(root):
    out = sys.stdout

    def walk(directory, relative):
        for name in sorted(os.listdir(directory)):
            full = os.path.join(directory, name)
            rel = relative + name
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue  # deleted while walking a live tree
            entry = {"path": rel, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
                     "mtime_ns": st.st_mtime_ns, "size": 0}
            if stat.S_ISLNK(st.st_mode):
                entry.update(type="symlink", target=os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                entry["type"] = "dir"
            elif stat.S_ISREG(st.st_mode):
                entry.update(type="file", size=st.st_size)
            else:
                entry["type"] = "other"
            out.write(json.dumps(entry) + "\n")
            if entry["type"] == "dir":
                walk(full, rel + "/")

    if not os.path.isdir(root):
        raise NotADirectoryError(20, "not a directory")
    walk(root, "")


def main(argv):
    if argv[:1] == ["apply"] and len(argv) == 7:
        try:
            apply(argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5] == "1", argv[6])
        except OSError as exc:
            sys.stderr.write("blockscan: cannot write %s: %s\n" % (argv[2], exc.strerror or exc))
            return 2
        return 0
    if len(argv) < 3 or argv[0] not in ("scan", "read", "tree", "files"):
        sys.stderr.write("usage: blockscan.py scan|read|tree|files PATH BLOCK_SIZE [INDEX...|RELPATH...] | apply ...\n")
        return 64
    mode, path, block_size = argv[0], argv[1], int(argv[2])
    try:
        if mode == "scan":
            scan(path, block_size)
        elif mode == "tree":
            tree(path)
        elif mode == "files":
            files(path, block_size, argv[3:])
        else:
            read(path, block_size, [int(i) for i in argv[3:]])
    except OSError as exc:
        sys.stderr.write("blockscan: cannot read %s: %s\n" % (path, exc.strerror or exc))
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
