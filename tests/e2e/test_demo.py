"""`make demo` end to end: the lab's backups and restores on the embedded default."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def test_demo_backs_up_and_restores_byte_identical() -> None:
    proc = subprocess.run([sys.executable, "-m", "cli.demo"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "lab-local: up" in proc.stdout
    assert proc.stdout.count("byte-identical") == 2
    assert "all intact" in proc.stdout
    assert "Traceback" not in proc.stderr
