"""Kept reflink clones of image files on the host: changed-block tracking and instant restores.

Runs on the host with nothing but the Python 3 standard library (fed to `python3 -` by the
connector). A backup that read an image from a reflink clone keeps that clone beside the image
(`<image dir>/.patchdrill-kept/<host>/<disk>/<point stamp>.img`); the next backup compares the
extent maps of its new clone and the kept one (FIEMAP): a range both files map to the same
physical blocks holds the same bytes, because while the kept clone holds those blocks the file
system can neither rewrite them in place (a write to a shared block is copied on write) nor give
them to other data. Only the other ranges are read and hashed.

    python3 - changed KEPT NEW BLOCK_SIZE IDENTITY
        {"size": N, "changed": [[first block, count], ...]}; exit 4 when the kept clone cannot
        be trusted (IDENTITY is the JSON `identity` the keep action printed: a kept clone whose
        inode, size or ctime moved was touched since, and one on another file system shares
        nothing)
    python3 - keep CLONE IMAGE HOST DISK STAMP LIMIT IMAGE...
        renames the snapshot clone CLONE to the kept path of IMAGE's point STAMP when its file
        system has LIMIT bytes free beyond what HOST's kept clones beside the IMAGEs hold of
        their own; prints {"kept": bool, "identity": {...}, "fs": {...}, "room": N} with the
        usage listing below
    python3 - usage HOST IMAGE...
        {"clones": [{"disk", "stamp", "path"}], "own_bytes": N, "file_systems": [{...}]}: the
        kept clones of HOST beside each IMAGE and the bytes they alone hold (their extents that
        no live image shares), with each file system's free space
    python3 - fs PATH
        {"device", "type", "mount", "free"} of the file system PATH is on
    python3 - drop HOST IMAGE DISK STAMP...
        removes those kept clones; {"dropped": [...]}
    python3 - restore KEPT TARGET IDENTITY IN_PLACE
        clones the kept clone to TARGET: a new file under a temporary name renamed into place,
        or (IN_PLACE=1) into the existing regular file itself; {"size": N} or exit 4 with why

Exit status 4 (with a one-line reason on stderr) when the clone cannot serve: the caller falls
back to reading or to the repository. Exit 2 for bad arguments.
"""

import array
import errno
import fcntl
import json
import os
import stat
import struct
import sys
import uuid

KEPT_DIR = ".patchdrill-kept"
FS_IOC_FIEMAP = 0xC020660B
FICLONE = 0x40049409
FIEMAP_FLAG_SYNC = 0x1
_HEADER = struct.Struct("=QQIIII")
_EXTENT = struct.Struct("=QQQQQIIII")
_BATCH = 512
EXTENT_LAST = 0x1
EXTENT_UNWRITTEN = 0x800
#: extents whose physical address does not identify their bytes: unknown or delayed location,
#: encoded (compressed) or encrypted data, data packed with metadata; never trusted as unchanged
_UNTRUSTED = 0x2 | 0x4 | 0x8 | 0x80 | 0x100 | 0x200 | 0x400
NOT_APPLICABLE = 4


class CannotServe(Exception):
    """The kept clone cannot be used for this; the caller falls back."""


def extents(fd):
    """[(logical, physical, length, flags)] of an open file, in logical order."""
    found, start = [], 0
    while True:
        request = bytearray(_HEADER.size + _BATCH * _EXTENT.size)
        _HEADER.pack_into(request, 0, start, (1 << 64) - 1 - start, FIEMAP_FLAG_SYNC, 0, _BATCH, 0)
        buffer = array.array("B", request)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buffer, True)
        except OSError as exc:
            raise CannotServe(f"the file system cannot map extents (FIEMAP: {exc.strerror})") from None
        mapped = _HEADER.unpack_from(buffer, 0)[3]
        if not mapped:
            return found
        last = None
        for i in range(mapped):
            logical, physical, length, _, _, flags, _, _, _ = _EXTENT.unpack_from(buffer, _HEADER.size + i * _EXTENT.size)
            found.append((logical, physical, length, flags))
            last = (logical, length, flags)
        if last[2] & EXTENT_LAST:
            return found
        start = last[0] + last[1]


def _boundaries(mapped, size):
    points = {0, size}
    for logical, _, length, _ in mapped:
        points.update((min(logical, size), min(logical + length, size)))
    return points


def _at(mapped, offset, cursor):
    """The extent holding offset (None: a hole), advancing cursor[0] through sorted extents."""
    i = cursor[0]
    while i < len(mapped) and mapped[i][0] + mapped[i][2] <= offset:
        i += 1
    cursor[0] = i
    if i < len(mapped) and mapped[i][0] <= offset:
        return mapped[i]
    return None


def changed_blocks(old, old_size, new, new_size, block_size):
    """Block indexes of the new file that may differ from the old one: every block some byte
    of which the two files do not map to the same physical place (holes in both match)."""
    limit = min(old_size, new_size)
    cuts = sorted(p for p in _boundaries(old, limit) | _boundaries(new, limit) if p <= limit)
    changed = set()
    old_cursor, new_cursor = [0], [0]
    for start, end in zip(cuts, cuts[1:]):
        a, b = _at(old, start, old_cursor), _at(new, start, new_cursor)
        same = (a is None and b is None) or (
            a is not None and b is not None and not (a[3] | b[3]) & _UNTRUSTED
            and a[1] + start - a[0] == b[1] + start - b[0]
            and a[3] & EXTENT_UNWRITTEN == b[3] & EXTENT_UNWRITTEN)
        if not same:
            changed.update(range(start // block_size, (end - 1) // block_size + 1))
    blocks = -(-new_size // block_size)
    if old_size != new_size:
        # A block whose length differs (the old last one, and all past the old end) is new.
        changed.update(range(min(old_size, new_size) // block_size, blocks))
    return sorted(i for i in changed if i < blocks)


def ranges(indexes):
    out = []
    for i in indexes:
        if out and out[-1][0] + out[-1][1] == i:
            out[-1][1] += 1
        else:
            out.append([i, 1])
    return out


def identity(path):
    st = os.stat(path)
    return {"path": path, "device": st.st_dev, "inode": st.st_ino, "ctime_ns": st.st_ctime_ns, "size": st.st_size}


def check_identity(path, expected):
    try:
        found = identity(path)
    except FileNotFoundError:
        raise CannotServe(f"kept clone {path} is missing") from None
    for field in ("device", "inode", "size", "ctime_ns"):
        if found[field] != expected[field]:
            raise CannotServe(f"kept clone {path} was changed or replaced since it was kept ({field} differs)")
    return found


def file_system(path):
    st, vfs = os.stat(path), os.statvfs(path)
    fs_type, mount = "unknown", "/"
    try:
        with open("/proc/self/mountinfo", encoding="utf-8") as handle:
            for line in handle:
                fields = line.split()
                major, minor = fields[2].split(":")
                if os.makedev(int(major), int(minor)) == st.st_dev:
                    mount, fs_type = fields[4].replace("\\040", " "), fields[fields.index("-") + 1]
    except OSError:
        pass
    return {"device": st.st_dev, "type": fs_type, "mount": mount, "free": vfs.f_bavail * vfs.f_frsize}


def _name(value, what):
    if not value or "/" in value or value.startswith("."):
        raise ValueError(f"bad {what} {value!r}")
    return value


def kept_dir(image, host, disk):
    real = os.path.realpath(image)
    return os.path.join(os.path.dirname(real), KEPT_DIR, _name(host, "host"), _name(disk, "disk"))


def changed(kept, new, block_size, expected):
    old_id = check_identity(kept, expected)
    new_st = os.stat(new)
    if new_st.st_dev != old_id["device"]:
        raise CannotServe(f"kept clone {kept} is on another file system than the new snapshot {new}")
    with open(kept, "rb") as old_handle, open(new, "rb") as new_handle:
        old_map, new_map = extents(old_handle.fileno()), extents(new_handle.fileno())
        # Re-checked after mapping: a write to the kept clone during the walk moves its ctime.
        check_identity(kept, expected)
    found = changed_blocks(old_map, old_id["size"], new_map, new_st.st_size, block_size)
    return {"size": new_st.st_size, "changed": ranges(found)}


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def keep(clone, image, host, disk, stamp, limit, images):
    """Keep the snapshot clone where its file system has room for the host's kept clones to grow
    to `limit` bytes of their own; what the host holds either way."""
    held = usage(host, images)
    fs = file_system(os.path.dirname(clone))
    room = limit - held["own_bytes"]
    if fs["free"] < room:
        return {"kept": False, "fs": fs, "room": room, **held}
    directory = kept_dir(image, host, disk)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    target = os.path.join(directory, _name(stamp, "stamp") + ".img")
    os.rename(clone, target)
    fsync_dir(directory)
    held["clones"].append({"disk": disk, "stamp": stamp, "path": target})
    return {"kept": True, "identity": identity(target), "fs": fs, "room": room, **held}


def _clones(host, images):
    """The kept clones beside each image (a directory holding several images lists them once)."""
    found = {}
    for image in images:
        base = os.path.dirname(kept_dir(image, host, "x"))
        try:
            disks = sorted(os.listdir(base))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for disk in disks:
            for name in sorted(os.listdir(os.path.join(base, disk))):
                path = os.path.join(base, disk, name)
                if name.endswith(".img") and path not in found:
                    found[path] = {"disk": disk, "stamp": name[:-4], "path": path}
    return list(found.values())


def _physical(path):
    with open(path, "rb") as handle:
        return [(p, p + length) for _, p, length, flags in extents(handle.fileno()) if not flags & _UNTRUSTED]


def _merge(spans):
    merged = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return merged


def _minus(spans, taken):
    """Total length of spans (merged) outside taken (merged)."""
    total, j = 0, 0
    for start, end in spans:
        position = start
        while j < len(taken) and taken[j][1] <= position:
            j += 1
        k = j
        while k < len(taken) and taken[k][0] < end:
            if taken[k][0] > position:
                total += taken[k][0] - position
            position = max(position, taken[k][1])
            k += 1
        if position < end:
            total += end - position
    return total


def usage(host, images):
    clones = _clones(host, images)
    by_device = {}
    for clone in clones:
        by_device.setdefault(os.stat(clone["path"]).st_dev, []).append(clone)
    own, systems = 0, []
    for device, group in by_device.items():
        live = [p for image in {os.path.realpath(i) for i in images} if os.path.isfile(image)
                and os.stat(image).st_dev == device for p in _physical(image)]
        kept = _merge(p for c in group for p in _physical(c["path"]))
        own += _minus(kept, _merge(live))
        systems.append(file_system(group[0]["path"]))
    return {"clones": [{k: c[k] for k in ("disk", "stamp", "path")} for c in clones], "own_bytes": own,
            "file_systems": systems}


def drop(host, image, disk, stamps):
    directory, dropped = kept_dir(image, host, disk), []
    for stamp in stamps:
        try:
            os.unlink(os.path.join(directory, _name(stamp, "stamp") + ".img"))
            dropped.append(stamp)
        except FileNotFoundError:
            pass
    return {"dropped": dropped}


def restore(kept, target, expected, in_place):
    found = check_identity(kept, expected)
    source = os.open(kept, os.O_RDONLY)
    try:
        if in_place:
            fd = os.open(target, os.O_RDWR | os.O_NOFOLLOW)
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                os.close(fd)
                raise CannotServe(f"{target} is not a regular file: a clone restores only onto an image file")
            work = None
        else:
            parent, name = os.path.split(os.path.abspath(target))
            os.makedirs(parent, exist_ok=True)
            # blockscan's temporary name: the next restore of target removes it if this one dies.
            work = os.path.join(parent, f".{name}.patchdrill-restore-{uuid.uuid4().hex[:12]}")
            fd = os.open(work, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            # The length first: a clone may end in a partial block only at the target's end.
            os.ftruncate(fd, found["size"])
            try:
                fcntl.ioctl(fd, FICLONE, source)
            except OSError as exc:
                if exc.errno in (errno.EXDEV, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTTY, errno.EPERM):
                    raise CannotServe(f"cannot clone {kept} onto {target}: {exc.strerror}") from None
                raise
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            if work:
                os.unlink(work)
            raise
        os.close(fd)
        if work:
            os.rename(work, target)
        fsync_dir(os.path.dirname(os.path.abspath(target)))
    finally:
        os.close(source)
    return {"size": found["size"]}


def main(argv):
    action, args = (argv[0], argv[1:]) if argv else ("", [])
    if action == "changed" and len(args) == 4:
        return changed(args[0], args[1], int(args[2]), json.loads(args[3]))
    if action == "keep" and len(args) >= 6:
        return keep(*args[:5], int(args[5]), args[6:])
    if action == "usage" and len(args) >= 2:
        return usage(args[0], args[1:])
    if action == "fs" and len(args) == 1:
        return file_system(args[0])
    if action == "drop" and len(args) >= 3:
        return drop(args[0], args[1], args[2], args[3:])
    if action == "restore" and len(args) == 4:
        return restore(args[0], args[1], json.loads(args[2]), args[3] == "1")
    raise ValueError(f"usage: changed|keep|usage|drop|restore ... (got {action!r} with {len(args)} arguments)")


if __name__ == "__main__":
    try:
        print(json.dumps(main(sys.argv[1:])))
    except CannotServe as exc:
        print(f"kept_clones: {exc}", file=sys.stderr)
        sys.exit(NOT_APPLICABLE)
    except ValueError as exc:
        print(f"kept_clones: {exc}", file=sys.stderr)
        sys.exit(2)
    except OSError as exc:
        print(f"kept_clones: {exc.filename or ''}: {exc.strerror}", file=sys.stderr)
        sys.exit(1)
