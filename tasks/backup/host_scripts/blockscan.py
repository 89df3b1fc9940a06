"""Hash a disk's fixed-size blocks on the host, read selected blocks back, list and restore trees.

Runs on the host with nothing but the Python 3 standard library (fed to `python3 -` by the
connector, so nothing is left behind). Only hashes, and then only the changed blocks the
controller asks for, cross the network. The controller imports this module too: the tree
listing and the tree writer below are the same code for a local disk and a host's.

    python3 - scan PATH BLOCK_SIZE
        one JSON object: {"hash": "blake2b-256", "size": N, "block_size": B, "fingerprints": "<hex>"}
        (the 32-byte digests of every block, concatenated in order); blocks inside a hole
        (SEEK_DATA) are not read, and they and all-zero blocks get the digest of zeros, by
        which the controller knows them
    python3 - read PATH BLOCK_SIZE INDEX...
        one line per index: "<index> <base64 of the block>"
    python3 - files ROOT BLOCK_SIZE RELPATH...
        every block of each file: one line per block, "<file number> <base64 of the block>"
        (file number = position in the argument list; an empty file has no line)
    python3 - apply PATCH WORK BLOCK_SIZE SIZE FINISH RENAME
        write the blocks in PATCH (records: 8-byte big-endian index, 4-byte length, data) into
        WORK at index * BLOCK_SIZE, leaving zero pages as holes (a record whose index has its
        top bit set carries no data: its LENGTH bytes are made zeros), then delete PATCH; with
        FINISH=1 also cut WORK to SIZE (regular files), fsync it and, unless RENAME is "-",
        rename it to RENAME and fsync the directory
    python3 - tree PATH 0
        one JSON object per line (see `entries`): the root first (path ""), then every entry
        under PATH, parents first, in path order (metadata only: the controller decides which
        files to read)
    python3 - probe PATH 0
        one JSON object describing PATH (see `probe`), and removes what killed restores of
        PATH left behind
    python3 - hashes ROOT BLOCK_SIZE LIST
        one JSON object {relpath: "<hex of the concatenated block hashes>"} for the regular,
        singly linked files under ROOT at the paths in LIST (a JSON file, then deleted), reached
        without following links: the blocks a restore in place need not send
    python3 - place PLAN DATA TARGET
        restore a tree (see `place_tree`): PLAN is JSON {"root", "entries", "prune",
        "block_size"}; DATA the blocks of the plan's files in plan order, each a record (4-byte
        entry number, 8-byte block index, 4-byte length, big-endian, then the data); a file
        marked "partial" got only the blocks that differ from the target's copy. Prints
        {"removed": N, "skipped": [[path, why], ...]}; PLAN and DATA are deleted.

Exit status 2 with a one-line message on stderr when the path cannot be read or written.
"""

import base64
import collections
import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import stat
import struct
import sys
import threading
import uuid

DIGEST_SIZE = 32
PAGE = 4096
ZERO_PAGE = bytes(PAGE)
#: marks the temporary names of a restore in progress; a killed one is found by it and removed
RESTORE_MARK = ".patchdrill-restore-"
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
DIR_NOFOLLOW = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | _CLOEXEC
#: xattr namespaces a restore removes when the point does not have them (security.* and
#: trusted.* belong to the system: left as they are)
_OWNED_XATTRS = ("user.", "system.posix_acl_")
#: a file system's own copy of what another name already carries (XFS shows root its POSIX ACLs
#: again as trusted.SGI_ACL_*): recording it would plant a stray attribute on any other file system
_FS_INTERNAL_XATTRS = ("trusted.SGI_ACL_",)
_FALLOC_PUNCH = 0x02 | 0x01  # FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
#: set in a patch record's index: the record has no data, its length of bytes become zeros
ZERO_RECORD = 1 << 63
_zeros = {}


def zeros(length):
    """length zero bytes, kept: a disk's blocks have one or two lengths."""
    found = _zeros.get(length)
    if found is None:
        found = _zeros[length] = bytes(length)
    return found


def is_zero(data):
    """Whether data is all zero bytes. One byte per page is looked at first: most data is
    rejected at once, and only data that passes is compared in full."""
    view = memoryview(data)
    if any(view[::PAGE]):
        return False
    return view.tobytes() == zeros(len(view))


def next_data(fd, offset):
    """Where the first data at or after offset begins (SEEK_DATA); None when only a hole
    follows; offset itself where the file system cannot tell (all of it counts as data)."""
    seek_data = getattr(os, "SEEK_DATA", None)
    if seek_data is None:
        return offset
    try:
        return os.lseek(fd, offset, seek_data)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None
        return offset


def next_hole(fd, offset, end):
    """Where the first hole at or after offset begins (SEEK_HOLE; the end of the file is one),
    at most end; end where the file system cannot tell."""
    seek_hole = getattr(os, "SEEK_HOLE", None)
    if seek_hole is None:
        return end
    try:
        return min(os.lseek(fd, offset, seek_hole), end)
    except OSError:
        return end


def read_at(fd, view, offset):
    """Fill view from offset; returns the bytes read (fewer at the end of the file). Moves the
    file's position: one reader per descriptor (os.preadv would not, but needs Python 3.7)."""
    os.lseek(fd, offset, os.SEEK_SET)
    filled = 0
    while filled < len(view):
        got = os.readv(fd, [view[filled:]])
        if not got:
            break
        filled += got
    return filled


def read_data(fd, view, offset):
    """Fill view from offset as read_at does, reading only the data extents SEEK_DATA and
    SEEK_HOLE find in the range: its holes are filled with zeros, not read."""
    end = offset + len(view)
    position = offset
    while position < end:
        data_at = next_data(fd, position)
        if data_at is None or data_at >= end:
            # A hole to the end of the range, or of the file (which may end inside the range).
            stop = min(end, max(position, os.fstat(fd).st_size))
            view[position - offset:stop - offset] = zeros(stop - position)
            return stop - offset
        if data_at > position:
            view[position - offset:data_at - offset] = zeros(data_at - position)
        stop = next_hole(fd, data_at, end)
        got = read_at(fd, view[data_at - offset:stop - offset], data_at)
        if got < stop - data_at:
            return data_at + got - offset  # the file ends here
        position = stop
    return len(view)


def block_layout(fd, size, block_size):
    """(offset, length, in_hole) for each block up to size; in_hole when SEEK_DATA finds no
    data in the block, which then need not be read."""
    data_at = -1
    for offset in range(0, size, block_size):
        length = min(block_size, size - offset)
        if data_at is not None and data_at < offset:
            data_at = next_data(fd, offset)
        yield offset, length, data_at is None or data_at >= offset + length


def scan(path, block_size):
    view = memoryview(bytearray(block_size))
    digests = []
    zero_digests = {}

    def zero_digest(length):
        if length not in zero_digests:
            zero_digests[length] = hashlib.blake2b(zeros(length), digest_size=DIGEST_SIZE).hexdigest()
        return zero_digests[length]

    fd = os.open(path, os.O_RDONLY | _CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        for offset, length, in_hole in block_layout(fd, size, block_size):
            if in_hole:
                digests.append(zero_digest(length))
                continue
            filled = read_data(fd, view[:length], offset)
            if filled == 0:
                break  # cut short since its size was taken
            data = view[:filled]
            digests.append(zero_digest(filled) if is_zero(data)
                           else hashlib.blake2b(data, digest_size=DIGEST_SIZE).hexdigest())
            if filled < length:
                break
    finally:
        os.close(fd)
    json.dump({"hash": "blake2b-256", "size": size, "block_size": block_size, "fingerprints": "".join(digests)},
              sys.stdout)


def read(path, block_size, indexes):
    out = sys.stdout
    with open(path, "rb") as handle:
        for index in indexes:
            handle.seek(index * block_size)
            data = handle.read(block_size)
            out.write("%d %s\n" % (index, base64.b64encode(data).decode("ascii")))


# -- sparse writes -------------------------------------------------------------------------

_libc = None


def libc():
    """The C library with fallocate and sync_file_range declared, or False where there is none."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            _libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        except (OSError, AttributeError):
            _libc = False
    return _libc


def punch_hole(fd, offset, length):
    """Deallocate a range of a regular file (it reads as zeros); write zeros where the file
    system cannot punch."""
    found = libc()
    if found and found.fallocate(fd, _FALLOC_PUNCH, offset, length) == 0:
        return
    os.pwrite(fd, bytes(length), offset)


#: how much of a file being restored stays in the page cache: past it, what was written is
#: waited for on disk and dropped from the cache
WRITE_BEHIND_BYTES = 64 * 1024 * 1024
_SYNC_WAIT_BEFORE, _SYNC_WRITE, _SYNC_WAIT_AFTER = 1, 2, 4


class WriteBehind(object):
    """Sends a restore's writes to disk as they are made and drops them from the page cache
    once there, keeping the last WRITE_BEHIND_BYTES of a file cached.

    A restored file is fsynced before it counts as restored, so every byte reaches the disk
    before the end anyway. Left to the page cache, a multi-gigabyte restore holds it all dirty
    until that fsync, which then writes it in one go while nothing else is being fetched; it
    fills memory the target's own programs were using, runs into the kernel's dirty limit
    (which throttles every writer on the host) and costs a page allocation for every byte
    (on a VM whose host reclaims free memory, a fault to the host for each of them). Written
    back as it goes (sync_file_range), the disk writes while blocks are still arriving, the
    final fsync finds little left and the restore reuses the same few megabytes of memory.

    Ranges may be reported from several threads at once and in any order. Durability is still
    the caller's fsync: sync_file_range neither writes metadata nor flushes the disk's cache.
    Where the C library has no sync_file_range, or the file cannot take it (a pipe, a file
    system without writeback), ranges are left to the page cache as before.
    """

    def __init__(self, fd, window=None):
        found = libc()
        self.fd = fd
        self.window = WRITE_BEHIND_BYTES if window is None else window
        self.enabled = bool(found) and hasattr(found, "sync_file_range")
        self._lock = threading.Lock()
        self._pending = collections.deque()
        self._pending_bytes = 0

    def written(self, offset, length):
        """offset..offset+length is written (or was left as it was): start writing it back, and
        wait for and drop the oldest ranges beyond the window."""
        if not self.enabled or length <= 0:
            return
        if not self._sync(offset, length, _SYNC_WRITE):
            return
        due = []
        with self._lock:
            self._pending.append((offset, length))
            self._pending_bytes += length
            while self._pending_bytes > self.window:
                oldest = self._pending.popleft()
                self._pending_bytes -= oldest[1]
                due.append(oldest)
        for start, size in due:
            if self._sync(start, size, _SYNC_WAIT_BEFORE | _SYNC_WRITE | _SYNC_WAIT_AFTER):
                os.posix_fadvise(self.fd, start, size, os.POSIX_FADV_DONTNEED)

    def _sync(self, offset, length, flags):
        if libc().sync_file_range(self.fd, offset, length, flags) == 0:
            return True
        code = ctypes.get_errno()
        if code in (errno.ESPIPE, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            self.enabled = False  # nothing to write back on this file: the page cache it is
            return False
        raise OSError(code, "cannot write back the restored data: %s" % os.strerror(code))


def zero_pages(data):
    """Indexes of the whole zero pages of data. Only pages whose first byte is zero are
    compared in full: random data costs one strided slice, not a scan of every page."""
    count = len(data) // PAGE
    heads = data[0:count * PAGE:PAGE]
    if 0 not in heads:
        return []
    return [i for i, head in enumerate(heads) if head == 0 and data[i * PAGE:(i + 1) * PAGE] == ZERO_PAGE]


def write_sparse(fd, data, offset, fresh, punch):
    """Write data at offset, leaving every zero page a hole: skipped where the file is fresh
    (it reads as zeros there already), punched where punch is allowed (regular files)."""
    zeros = zero_pages(data) if fresh or punch else []
    if not zeros:
        os.pwrite(fd, data, offset)
        return
    runs = []  # [first, end) page ranges of consecutive zero pages
    for index in zeros:
        if runs and runs[-1][1] == index:
            runs[-1][1] = index + 1
        else:
            runs.append([index, index + 1])
    view = memoryview(data)
    done = 0
    for first, end in runs:
        start, stop = first * PAGE, end * PAGE
        if start > done:
            os.pwrite(fd, view[done:start], offset + done)
        if not fresh:
            punch_hole(fd, offset + start, stop - start)
        done = stop
    if done < len(data):
        os.pwrite(fd, view[done:], offset + done)


def write_zeros(fd, offset, length, fresh, punch):
    """Make a range read as zeros: nothing to do in a fresh file, a hole punched where punch is
    allowed (regular files), zeros written elsewhere (block devices)."""
    if fresh:
        return
    if punch:
        punch_hole(fd, offset, length)
    else:
        os.pwrite(fd, zeros(length), offset)


def fsync_dir(path):
    fd = os.open(path, DIR_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def apply(patch, work, block_size, size, finish, rename):
    if rename != "-":
        os.makedirs(os.path.dirname(os.path.abspath(work)), exist_ok=True)  # a fresh DR volume's path
    fd = os.open(work, os.O_RDWR | os.O_CREAT | _CLOEXEC, 0o600)
    try:
        st = os.fstat(fd)
        regular = stat.S_ISREG(st.st_mode)
        # The temporary file of a new restore starts empty and every block is written once.
        fresh = rename != "-" and regular
        behind = WriteBehind(fd)
        with open(patch, "rb") as records:
            while True:
                head = records.read(12)
                if len(head) < 12:
                    break
                index, length = struct.unpack(">QI", head)
                if index & ZERO_RECORD:
                    write_zeros(fd, (index & ~ZERO_RECORD) * block_size, length, fresh, regular)
                    continue
                data = records.read(length)
                if len(data) != length:
                    raise OSError(5, "truncated patch file")
                write_sparse(fd, data, index * block_size, fresh, regular)
                behind.written(index * block_size, length)
        os.unlink(patch)
        if finish:
            if regular:
                os.ftruncate(fd, size)
            os.fsync(fd)
    finally:
        os.close(fd)
    if finish and rename != "-":
        os.replace(work, rename)
        fsync_dir(os.path.dirname(os.path.abspath(rename)))


def files(root, block_size, names):
    out = sys.stdout
    for number, name in enumerate(names):
        with open(os.path.join(root, name), "rb") as handle:
            while True:
                data = handle.read(block_size)
                if not data:
                    break
                out.write("%d %s\n" % (number, base64.b64encode(data).decode("ascii")))


# -- listing a tree ------------------------------------------------------------------------

def read_xattrs(path, skipped, rel):
    """Every extended attribute of path (POSIX ACLs are system.posix_acl_* among them), hex."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno not in (getattr(os, "ENOTSUP", 95), 95):
            skipped.append([rel, "extended attributes not read: %s" % exc.strerror])
        return {}
    found = {}
    for name in names:
        if name.startswith(_FS_INTERNAL_XATTRS):
            continue
        try:
            found[name] = os.getxattr(path, name, follow_symlinks=False).hex()
        except OSError as exc:
            skipped.append([rel, "extended attribute %s not read: %s" % (name, exc.strerror)])
    return found


def describe(full, rel, st, skipped, links):
    """One entry of a tree listing: metadata, the change-detection fields (size, mtime, ctime,
    inode) and what a restore needs to recreate it."""
    entry = {"path": rel, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
             "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns, "inode": st.st_ino, "size": 0}
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        entry.update(type="symlink", target=os.readlink(full))
        return entry
    if stat.S_ISREG(mode) and st.st_nlink > 1:
        first = links.setdefault((st.st_dev, st.st_ino), rel)
        if first != rel:
            entry.update(type="hardlink", target=first)
            return entry
    if stat.S_ISDIR(mode):
        entry["type"] = "dir"
    elif stat.S_ISREG(mode):
        entry.update(type="file", size=st.st_size)
    else:
        if stat.S_ISFIFO(mode):
            entry["type"] = "fifo"
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            entry.update(type="chardev" if stat.S_ISCHR(mode) else "blockdev", rdev=st.st_rdev)
        else:
            entry["type"] = "other"
            skipped.append([rel, "socket: not backed up (a program recreates it)"])
            return entry
        if read_xattrs(full, skipped, rel):
            skipped.append([rel, "extended attributes of a FIFO or device node are not kept"])
        return entry
    xattrs = read_xattrs(full, skipped, rel)
    if xattrs:
        entry["xattrs"] = xattrs
    return entry


def entries(root, skipped):
    """The root (path "") and every entry under root, parents first, in path order."""
    if not os.path.isdir(root):
        raise NotADirectoryError(20, "not a directory")
    links = {}
    # The configured path may itself be a link to the directory: the root is what it leads to.
    real = os.path.realpath(root)
    yield describe(real, "", os.stat(real), skipped, links)

    def walk(directory, relative):
        for name in sorted(os.listdir(directory)):
            full = os.path.join(directory, name)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                continue  # deleted while walking a live tree
            entry = describe(full, relative + name, st, skipped, links)
            yield entry
            if entry["type"] == "dir":
                for child in walk(full, relative + name + "/"):
                    yield child

    for entry in walk(root, ""):
        yield entry


def tree(root):
    out = sys.stdout
    skipped = []
    for entry in entries(root, skipped):
        out.write(json.dumps(entry) + "\n")
    for path, why in skipped:
        out.write(json.dumps({"skipped": path, "why": why}) + "\n")


# -- restoring a tree without leaving it ---------------------------------------------------

def lstat_at(dir_fd, name):
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None


def remove_at(dir_fd, name, skipped=None, rel=None):
    """Remove name (a whole directory tree included) through descriptors, never following a
    link and never descending into another mounted file system; returns the entries removed."""
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(name, dir_fd=dir_fd)
        return 1
    fd = os.open(name, DIR_NOFOLLOW, dir_fd=dir_fd)
    try:
        if os.fstat(fd).st_dev != os.fstat(dir_fd).st_dev:
            if skipped is not None:
                skipped.append([rel or name, "a mounted file system the point lacks: left in place"])
            return 0
        removed = 0
        kept = len(skipped) if skipped is not None else 0
        for child in list(os.scandir(fd)):
            removed += remove_at(fd, child.name, skipped, (rel or name) + "/" + child.name)
    finally:
        os.close(fd)
    if skipped is not None and len(skipped) > kept:
        return removed  # a mount point below was left in place, so this directory stays too
    os.rmdir(name, dir_fd=dir_fd)
    return removed + 1


def temp_name(path):
    """Where a new target is assembled: hidden, beside it, and named so that the next restore of
    the same target finds and removes it should this one be killed (remove_leftovers)."""
    parent, name = os.path.split(os.fspath(path).rstrip("/"))
    return os.path.join(parent, "." + name + RESTORE_MARK + uuid.uuid4().hex[:12])


def remove_leftovers(path):
    """Remove what killed restores of path left beside it (their names carry RESTORE_MARK)."""
    parent, name = os.path.split(os.path.abspath(path))
    prefixes = ("." + name + RESTORE_MARK, name + RESTORE_MARK)
    try:
        fd = os.open(parent, DIR_NOFOLLOW)
    except OSError:
        return []
    removed = []
    try:
        for child in list(os.scandir(fd)):
            if child.name.startswith(prefixes):
                remove_at(fd, child.name)
                removed.append(child.name)
    finally:
        os.close(fd)
    return removed


def probe(path):
    """What is at path, for deciding how to restore onto it: {"exists", "kind" (dir, file,
    blockdev, symlink, other), "empty" (directories), "link" (a symlink's target, and "resolved",
    the kind it leads to), "removed" (leftovers of killed restores, now gone), "readonly" and
    "writable" (the file system and directory a restore would write in)}."""
    removed = remove_leftovers(path)
    # Where the restore will write: the target itself when it is a directory (in place, on its
    # own file system), else the nearest existing directory above it.
    where = os.path.abspath(path)
    while not os.path.isdir(where) or (where == os.path.abspath(path) and os.path.islink(where)):
        where = os.path.dirname(where)
    readonly = bool(os.statvfs(where).f_flag & os.ST_RDONLY)
    writable = {"readonly": readonly, "writable": not readonly and os.access(where, os.W_OK)}
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return dict(writable, exists=False, removed=removed)
    found = dict(writable, exists=True, removed=removed)

    def kind(mode):
        if stat.S_ISDIR(mode):
            return "dir"
        if stat.S_ISREG(mode):
            return "file"
        if stat.S_ISBLK(mode):
            return "blockdev"
        return "other"

    if stat.S_ISLNK(st.st_mode):
        found.update(kind="symlink", link=os.readlink(path))
        try:
            found["resolved"] = kind(os.stat(path).st_mode)
        except OSError:
            found["resolved"] = "missing"
        return found
    found["kind"] = kind(st.st_mode)
    if found["kind"] == "dir":
        found["empty"] = not os.listdir(path)
    return found


def inside(path):
    """Refuse an entry path that could name anything outside the tree: a map is data read from
    a store, and ".." is a real directory entry that O_NOFOLLOW does not stop."""
    if not path or "\0" in path or any(part in ("", ".", "..") for part in path.split("/")):
        raise OSError(22, "refusing entry path %r: it would lead out of the target" % path)


class TreeWriter:
    """Writes a tree's entries under root through directory descriptors only.

    Every name is created, opened or removed relative to its parent's descriptor with
    O_NOFOLLOW, and each parent is reached the same way from root: a symbolic link already in
    the target (or planted while the restore runs) is replaced like any other wrong entry,
    never followed. An existing regular file is written in place (content(fd, True) may write
    only what differs); one with other hard links is replaced, so no file outside the tree
    changes. Each file is fsynced when written; directories get their metadata and an fsync
    last, deepest first, once nothing more is written into them.
    """

    def __init__(self, root, as_root):
        self.as_root = as_root
        self.root_fd = os.open(root, DIR_NOFOLLOW)
        self.stack = [("", self.root_fd)]  # the open directories along the current path
        self.dirs = []
        self.skipped = []
        self.current = ""

    def close(self):
        for _, fd in self.stack:
            os.close(fd)
        self.stack = []

    def _parent_fd(self, path):
        parent = path.rpartition("/")[0]
        while len(self.stack) > 1 and not (parent == self.stack[-1][0] or parent.startswith(self.stack[-1][0] + "/")):
            os.close(self.stack.pop()[1])
        top, fd = self.stack[-1]
        if top != parent:
            for name in (parent[len(top) + 1:] if top else parent).split("/"):
                fd = os.open(name, DIR_NOFOLLOW, dir_fd=fd)
                top = top + "/" + name if top else name
                self.stack.append((top, fd))
        return fd

    def remove_extras(self, wanted):
        """Remove every entry under root whose path is not in wanted; returns how many."""
        removed = 0
        pending = [("", os.dup(self.root_fd))]
        try:
            while pending:
                relative, fd = pending.pop()
                try:
                    for child in sorted(os.scandir(fd), key=lambda c: c.name):
                        rel = relative + child.name
                        self.current = rel
                        if rel not in wanted:
                            removed += remove_at(fd, child.name, self.skipped, rel)
                        elif child.is_dir(follow_symlinks=False):
                            pending.append((rel + "/", os.open(child.name, DIR_NOFOLLOW, dir_fd=fd)))
                finally:
                    os.close(fd)
        finally:
            for _, fd in pending:
                os.close(fd)
        return removed

    def place(self, entry, content=None):
        """Create or update one entry (parents must have been placed before their children)."""
        path, kind = entry["path"], entry["type"]
        self.current = path
        inside(path)
        if kind == "hardlink":
            inside(entry["target"])
        dir_fd = self._parent_fd(path)
        name = path.rpartition("/")[2]
        existing = lstat_at(dir_fd, name)
        if kind == "dir":
            if existing is not None and not stat.S_ISDIR(existing.st_mode):
                remove_at(dir_fd, name)
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                os.mkdir(name, 0o700, dir_fd=dir_fd)
            self.stack.append((path, os.open(name, DIR_NOFOLLOW, dir_fd=dir_fd)))
            self.dirs.append(entry)
        elif kind == "file":
            self._file(dir_fd, name, existing, entry, content)
        elif kind == "symlink":
            if existing is not None:
                remove_at(dir_fd, name)
            os.symlink(entry["target"], name, dir_fd=dir_fd)
            self._meta_at(dir_fd, name, entry, link=True)
        elif kind == "hardlink":
            self._hardlink(entry)
        elif kind in ("fifo", "chardev", "blockdev"):
            self._special(dir_fd, name, existing, entry)
        else:
            self.skipped.append([path, "entry of type %r: not restored" % kind])

    def _file(self, dir_fd, name, existing, entry, content):
        fd, in_place = None, False
        if existing is not None and stat.S_ISREG(existing.st_mode) and existing.st_nlink == 1:
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC, dir_fd=dir_fd)
            st = os.fstat(fd)
            in_place = stat.S_ISREG(st.st_mode) and st.st_nlink == 1
            if not in_place:  # swapped under us: replace it like any other wrong entry
                os.close(fd)
                fd = None
        if fd is None:
            if existing is not None:
                remove_at(dir_fd, name)
            fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | _CLOEXEC, 0o600, dir_fd=dir_fd)
        try:
            if not in_place:
                os.ftruncate(fd, entry["size"])  # reads as zeros: zero blocks need no write
            if content is not None:
                content(fd, in_place)
            os.ftruncate(fd, entry["size"])
            self._meta_fd(fd, entry)
            os.fsync(fd)
        finally:
            os.close(fd)

    def _hardlink(self, entry):
        source = entry["target"]
        source_dir = os.dup(self._parent_fd(source))
        try:
            source_name = source.rpartition("/")[2]
            dir_fd = self._parent_fd(entry["path"])
            name = entry["path"].rpartition("/")[2]
            existing = lstat_at(dir_fd, name)
            first = os.stat(source_name, dir_fd=source_dir, follow_symlinks=False)
            if existing is not None and (existing.st_dev, existing.st_ino) == (first.st_dev, first.st_ino):
                return
            if existing is not None:
                remove_at(dir_fd, name)
            os.link(source_name, name, src_dir_fd=source_dir, dst_dir_fd=dir_fd, follow_symlinks=False)
        finally:
            os.close(source_dir)

    def _special(self, dir_fd, name, existing, entry):
        kind = entry["type"]
        file_type = {"fifo": stat.S_IFIFO, "chardev": stat.S_IFCHR, "blockdev": stat.S_IFBLK}[kind]
        rdev = int(entry.get("rdev", 0))
        if kind != "fifo" and not self.as_root:
            self.skipped.append([entry["path"], "device node: only root can create it"])
            return
        if existing is not None and stat.S_IFMT(existing.st_mode) == file_type and existing.st_rdev == rdev:
            pass  # already the right node: only its metadata may differ
        else:
            if existing is not None:
                remove_at(dir_fd, name)
            if kind == "fifo":
                os.mkfifo(name, 0o600, dir_fd=dir_fd)
            else:
                os.mknod(name, 0o600 | file_type, rdev, dir_fd=dir_fd)
        self._meta_at(dir_fd, name, entry, link=False)

    def _meta_fd(self, fd, entry):
        if self.as_root:
            os.fchown(fd, entry["uid"], entry["gid"])
        os.fchmod(fd, entry["mode"])  # after chown, which clears set-id bits
        self._xattrs(fd, entry)
        os.utime(fd, ns=(entry["mtime_ns"], entry["mtime_ns"]))

    def _meta_at(self, dir_fd, name, entry, link):
        if self.as_root:
            os.chown(name, entry["uid"], entry["gid"], dir_fd=dir_fd, follow_symlinks=False)
        if not link:
            # Linux cannot chmod without following; the entry was just checked to be no link.
            if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
                raise OSError(40, "replaced by a symbolic link while restoring")
            os.chmod(name, entry["mode"], dir_fd=dir_fd)
        os.utime(name, ns=(entry["mtime_ns"], entry["mtime_ns"]), dir_fd=dir_fd, follow_symlinks=False)

    def _xattrs(self, fd, entry):
        wanted = entry.get("xattrs")
        if wanted is None:
            return  # a point from before xattrs were recorded: leave the target's
        try:
            present = os.listxattr(fd)
        except OSError:
            present = []
        for name in present:
            if name not in wanted and name.startswith(_OWNED_XATTRS):
                try:
                    os.removexattr(fd, name)
                except OSError as exc:
                    self.skipped.append([entry["path"], "extended attribute %s not removed: %s" % (name, exc.strerror)])
        for name in sorted(wanted):
            try:
                os.setxattr(fd, name, bytes.fromhex(wanted[name]))
            except OSError as exc:
                self.skipped.append([entry["path"], "extended attribute %s not restored: %s" % (name, exc.strerror)])

    def finish(self, root_entry):
        """Directory metadata, deepest first (writing into a directory changes its mtime), then
        the root's; each directory is fsynced so the names in it survive a power cut."""
        while len(self.stack) > 1:
            os.close(self.stack.pop()[1])
        for entry in reversed(self.dirs):
            self.current = entry["path"]
            fd = self._open_dir(entry["path"])
            try:
                self._meta_fd(fd, entry)
                os.fsync(fd)
            finally:
                os.close(fd)
        self.current = ""
        if root_entry is not None:
            self._meta_fd(self.root_fd, dict(root_entry, path=""))
        os.fsync(self.root_fd)

    def _open_dir(self, path):
        fd = os.dup(self.root_fd)
        for name in path.split("/"):
            try:
                child = os.open(name, DIR_NOFOLLOW, dir_fd=fd)
            finally:
                os.close(fd)
            fd = child
        return fd


def place_tree(target, plan, write_file, as_root):
    """Restore a tree at target, returns (removed, skipped).

    An existing directory (a mount point included) is restored in place, on its own file
    system; with plan["prune"], entries the point lacks are removed so the result equals the
    point. A new target is built under a temporary sibling name (carrying RESTORE_MARK) and
    renamed into place complete. write_file(fd, entry, in_place) writes one file's content.
    """
    target = os.path.abspath(target)
    existing = os.lstat(target) if os.path.lexists(target) else None
    if existing is not None and stat.S_ISLNK(existing.st_mode):
        raise OSError(40, "the target is a symbolic link (to %s); give the path it leads to" % os.readlink(target))
    in_place = existing is not None
    work = target
    if not in_place:
        os.makedirs(os.path.dirname(target), exist_ok=True)  # a fresh DR volume's path
        work = temp_name(target)
        os.mkdir(work, 0o700)
    try:
        writer = TreeWriter(work, as_root)
        try:
            removed = 0
            if in_place and plan.get("prune"):
                wanted = set(e["path"] for e in plan["entries"])
                removed = writer.remove_extras(wanted)
            for entry in plan["entries"]:
                writer.place(entry, (lambda fd, in_place_, e=entry: write_file(fd, e, in_place_))
                             if entry["type"] == "file" else None)
            writer.finish(plan.get("root"))
        except OSError as exc:
            exc.restore_path = writer.current
            raise
        finally:
            writer.close()
        if not in_place:
            os.replace(work, target)
        fsync_dir(os.path.dirname(target))
    except BaseException:
        if not in_place:
            parent_fd = os.open(os.path.dirname(work), DIR_NOFOLLOW)
            try:
                if lstat_at(parent_fd, os.path.basename(work)) is not None:
                    remove_at(parent_fd, os.path.basename(work))
            finally:
                os.close(parent_fd)
        raise
    return removed, writer.skipped


def _open_regular(root_fd, rel):
    """A descriptor on the regular, singly linked file at rel under root_fd, every component
    reached without following a link; None for anything else (missing, a link, a device...)."""
    parent, _, name = rel.rpartition("/")
    fd = os.dup(root_fd)
    try:
        for part in parent.split("/") if parent else []:
            child = os.open(part, DIR_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
        handle = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | _CLOEXEC, dir_fd=fd)
    except OSError:
        return None
    finally:
        os.close(fd)
    st = os.fstat(handle)
    if stat.S_ISREG(st.st_mode) and st.st_nlink == 1:
        return handle
    os.close(handle)
    return None


def file_hashes(root, block_size, list_path):
    """The block hashes of the files at the paths listed in list_path (JSON) under root, as the
    tree writer would write them in place: what a restore onto this tree need not send again."""
    with open(list_path) as handle:
        names = json.load(handle)
    os.unlink(list_path)
    found = {}
    try:
        root_fd = os.open(root, DIR_NOFOLLOW)
    except OSError:
        json.dump(found, sys.stdout)
        return
    try:
        for rel in names:
            inside(rel)
            fd = _open_regular(root_fd, rel)
            if fd is None:
                continue
            with os.fdopen(fd, "rb", buffering=0) as handle:
                digests = []
                while True:
                    data = handle.read(block_size)
                    if not data:
                        break
                    digests.append(hashlib.blake2b(data, digest_size=DIGEST_SIZE).hexdigest())
            found[rel] = "".join(digests)
    finally:
        os.close(root_fd)
    json.dump(found, sys.stdout)


#: a block of a file in a place data file: entry number in the plan, block index, length
_RECORD = struct.Struct(">IQI")


def place(plan_path, data_path, target):
    with open(plan_path) as handle:
        plan = json.load(handle)
    numbers = dict((entry["path"], number) for number, entry in enumerate(plan["entries"]))
    block_size = plan["block_size"]
    with open(data_path, "rb") as data:
        waiting = []  # a record header read ahead that belongs to a later file

        def write_file(fd, entry, in_place):
            if entry.get("partial") and not in_place:
                # Only the blocks that differed were sent, and the file is no longer the one
                # that was compared: writing them into an empty file would corrupt it.
                raise OSError(11, "%s changed while being restored; restore again" % entry["path"])
            number = numbers[entry["path"]]
            behind = WriteBehind(fd)
            while True:
                head = waiting.pop() if waiting else data.read(_RECORD.size)
                if len(head) < _RECORD.size:
                    return
                owner, index, length = _RECORD.unpack(head)
                if owner != number:
                    waiting.append(head)
                    return
                piece = data.read(length)
                if len(piece) != length:
                    raise OSError(5, "data file ends inside %s" % entry["path"])
                write_sparse(fd, piece, index * block_size, not in_place, True)
                behind.written(index * block_size, length)

        try:
            removed, skipped = place_tree(target, plan, write_file, os.geteuid() == 0)
        finally:
            os.unlink(plan_path)
            os.unlink(data_path)
    json.dump({"removed": removed, "skipped": skipped}, sys.stdout)


def main(argv):
    if argv[:1] == ["apply"] and len(argv) == 7:
        try:
            apply(argv[1], argv[2], int(argv[3]), int(argv[4]), argv[5] == "1", argv[6])
        except OSError as exc:
            sys.stderr.write("blockscan: cannot write %s: %s\n" % (argv[6] if argv[6] != "-" else argv[2],
                                                                   exc.strerror or exc))
            return 2
        return 0
    if argv[:1] == ["place"] and len(argv) == 4:
        try:
            place(argv[1], argv[2], argv[3])
        except OSError as exc:
            at = getattr(exc, "restore_path", "")
            sys.stderr.write("blockscan: cannot restore into %s%s: %s\n" % (
                argv[3], " (at %s)" % at if at else "", exc.strerror or exc))
            return 2
        return 0
    if len(argv) < 3 or argv[0] not in ("scan", "read", "tree", "files", "probe", "hashes"):
        sys.stderr.write("usage: blockscan.py scan|read|tree|files|probe|hashes PATH BLOCK_SIZE [INDEX...|RELPATH...|LIST] "
                         "| apply ... | place ...\n")
        return 64
    mode, path, block_size = argv[0], argv[1], int(argv[2])
    try:
        if mode == "scan":
            scan(path, block_size)
        elif mode == "tree":
            tree(path)
        elif mode == "probe":
            json.dump(probe(path), sys.stdout)
        elif mode == "hashes":
            file_hashes(path, block_size, argv[3])
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
