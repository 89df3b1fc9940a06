"""Debian's chromium, headless and cut off from every network, to open pages the product writes
as a person would (`make bootstrap` installs it).

Offline for real: as root the browser runs in a network namespace of its own (`unshare --net`:
only a loopback that is down), and in any case behind a proxy that points at a closed port and a
resolver that finds no name, so a page that tried to fetch anything would get nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

# Debian's /usr/bin/chromium is a wrapper script around this binary.
_CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser")
TIMEOUT_SECONDS = 120


def chromium() -> str:
    for candidate in _CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    raise RuntimeError("chromium not found: `make bootstrap` installs Debian's chromium")


def _offline_command(profile: Path) -> list[str]:
    isolate = ["unshare", "--net"] if os.geteuid() == 0 and shutil.which("unshare") else []
    return [*isolate, chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-extensions", "--disable-background-networking", "--disable-sync",
            f"--user-data-dir={profile}", "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND",
            # Lets timers and load events (an <img onerror>, say) fire before the DOM is read.
            "--virtual-time-budget=3000"]


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_SECONDS, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"chromium exited {done.returncode}: {done.stderr[-2000:]}")
    return done


def dump_dom(page: Path, workdir: Path) -> str:
    """The DOM after the page loaded (and after any script on it ran), serialized."""
    return _run([*_offline_command(workdir / "profile"), "--dump-dom", page.as_uri()]).stdout


def screenshot(page: Path, png: Path, workdir: Path, *, width: int = 1200, height: int = 1400) -> Path:
    _run([*_offline_command(workdir / "profile"), f"--window-size={width},{height}", f"--screenshot={png}",
          page.as_uri()])
    return png
