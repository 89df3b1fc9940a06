"""The demo application (examples/notes-app) started for real: as a plain process on loopback or
inside a network namespace of its own, the way a drill starts a restored copy."""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

APP_DIR = Path(__file__).resolve().parents[2] / "examples" / "notes-app"
APP = APP_DIR / "app.py"
SEED = APP_DIR / "seed.py"
START_TIMEOUT_SECONDS = 30


@dataclass(frozen=True)
class RunningApp:
    process: subprocess.Popen[str]
    port: int
    banner: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"


def seed(data: Path, notes: int) -> str:
    return subprocess.run([sys.executable, str(SEED), "--data", str(data), "--notes", str(notes)],
                          capture_output=True, text=True, check=True, timeout=60).stdout.strip()


def _banner(process: subprocess.Popen[str], log: tempfile._TemporaryFileWrapper[str]) -> str:
    """The app's `listening on …` line, or the reason it never came."""
    assert process.stdout is not None
    ready, _, _ = select.select([process.stdout], [], [], START_TIMEOUT_SECONDS)
    line = process.stdout.readline() if ready else ""
    if not line.startswith("listening on "):
        process.kill()
        process.wait(timeout=10)
        log.seek(0)
        raise RuntimeError(f"notes-app did not start: {line!r} {log.read()[-2000:]}")
    return line.strip()


@contextmanager
def running(data: Path, *, port: int = 0, prefix: list[str] | None = None) -> Iterator[RunningApp]:
    """Start the app on data (127.0.0.1, port 0 = any free one), stop it with SIGTERM after."""
    command = [*(prefix or []), sys.executable, str(APP), "--data", str(data), "--bind", "127.0.0.1",
               "--port", str(port)]
    # The request log goes to a file: a pipe nobody reads would fill and stall the app.
    log = tempfile.NamedTemporaryFile("w+", prefix="notes-app-", suffix=".log")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
    try:
        banner = _banner(process, log)
        yield RunningApp(process=process, port=int(banner.split()[2].rsplit(":", 1)[1]), banner=banner)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.close()


@contextmanager
def network_namespace() -> Iterator[str]:
    """A namespace with only a loopback that is up: what a drill's test copy runs in (root only)."""
    name = f"pdtest-notes-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    subprocess.run(["ip", "netns", "add", name], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True, capture_output=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)
