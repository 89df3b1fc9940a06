"""A real file system of its own for a test: an XFS image, loop-mounted (needs root and xfsprogs).

Used where the host's own file system is not what is being tested: fsfreeze and reflink in the
snapshot tests, a mount point as a restore target in the restore tests.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def loop_xfs(directory: Path, size: int = 320 << 20) -> Iterator[Path]:
    """A loop-mounted XFS image with reflink in `directory` (its image and mount point), unmounted
    at the end; skips the test where root or xfsprogs is missing."""
    if os.geteuid() != 0 or not shutil.which("mkfs.xfs"):
        pytest.skip("needs root and xfsprogs (apt-get install xfsprogs) for a loop-mounted XFS")
    image, mount = directory / "xfs.img", directory / "mnt"
    mount.mkdir()
    with image.open("wb") as handle:
        handle.truncate(size)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", str(image)], check=True)
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mount)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount an XFS image here: {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        # A failed test must not leave a frozen file system behind.
        subprocess.run(["fsfreeze", "--unfreeze", str(mount)], capture_output=True)
        subprocess.run(["umount", str(mount)], check=True)


@pytest.fixture
def xfs(tmp_path: Path) -> Iterator[Path]:
    """A loop-mounted XFS image with reflink, private to the test."""
    with loop_xfs(tmp_path) as mount:
        yield mount
