"""Whom the warm process may serve (cli/warm.py): a caller whose code, import-time environment or
Prefect settings files differ runs its command in a process of its own."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cli import warm


def test_the_code_stamp_changes_with_any_source_file(tmp_path: Path) -> None:
    (tmp_path / "tasks" / "backup").mkdir(parents=True)
    source = tmp_path / "tasks" / "backup" / "restore.py"
    source.write_text("x = 1\n")
    (tmp_path / "tasks" / "backup" / "blockscan.ps1").write_text("# script\n")
    before = warm.code_stamp(tmp_path)
    assert warm.code_stamp(tmp_path) == before
    source.write_text("x = 22\n")
    assert warm.code_stamp(tmp_path) != before
    changed = warm.code_stamp(tmp_path)
    (tmp_path / "tasks" / "backup" / "blockscan.ps1").write_text("# another script\n")
    assert warm.code_stamp(tmp_path) != changed


def test_the_key_follows_the_import_time_environment_and_settings_files(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    env = {"PREFECT_HOME": str(tmp_path / "home"), "PATH": os.environ.get("PATH", "")}
    key = warm.fits_key(env)
    assert warm.fits_key({**env, "PATH": "/elsewhere"}) == key, "only PREFECT_*/PATCHDRILL_* are read on import"
    assert warm.fits_key({**env, "PATCHDRILL_PRIVATE_API": "1"}) == key, "set by the command itself"
    assert warm.fits_key({**env, "PATCHDRILL_APPROVAL_POLL_SECONDS": "3"}) != key
    assert warm.fits_key({**env, "PREFECT_API_URL": "http://127.0.0.1:9/api"}) != key
    (tmp_path / "prefect.toml").write_text("[logging]\nlevel = 'DEBUG'\n")
    assert warm.fits_key(env) != key, "Prefect reads prefect.toml in the working directory"
    (tmp_path / "prefect.toml").unlink()
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "profiles.toml").write_text("active = 'other'\n")
    assert warm.fits_key(env) != key, "Prefect reads its profiles"


def test_no_warm_process_runs_nothing_and_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PREFECT_HOME", str(tmp_path))
    assert warm.run_warm(["version"]) is None
    (tmp_path / "patchdrill" / "server").mkdir(parents=True)
    # A state left by a warm process that is gone (a pid that cannot exist).
    warm.state_file().write_text('{"pid": 999999999, "key": "x", "socket": "/nonexistent"}')
    assert warm.run_warm(["version"]) is None
    monkeypatch.setenv("PATCHDRILL_WARM", "0")
    assert warm.run_warm(["version"]) is None
