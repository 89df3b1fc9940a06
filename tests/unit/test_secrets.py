"""Credential references resolve, and whatever they resolve to is redacted everywhere."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import structlog

from configs.secrets import SecretError, redact, resolve
from flows.logs import configure


def test_env_and_file_references(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PD_TEST_SECRET", "env-secret-value")
    assert resolve("env:PD_TEST_SECRET") == "env-secret-value"
    (tmp_path / "pw").write_text("file-secret-value\n")
    assert resolve("file:pw", base_dir=tmp_path) == "file-secret-value"
    assert redact("a env-secret-value b file-secret-value") == "a *** b ***"


def test_unresolvable_references_name_the_reference_only(tmp_path: Path) -> None:
    with pytest.raises(SecretError, match="PD_SURELY_UNSET"):
        resolve("env:PD_SURELY_UNSET")
    with pytest.raises(SecretError, match="cannot read secret file"):
        resolve(f"file:{tmp_path}/missing")
    with pytest.raises(SecretError, match="not a credential reference"):
        resolve("vault:x")


def test_log_lines_never_carry_a_resolved_secret(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("PD_TEST_LOG_SECRET", "log-secret-0042")
    secret = resolve("env:PD_TEST_LOG_SECRET")
    configure(json=True)
    structlog.stdlib.get_logger("patchdrill.test").info("connecting", detail=f"password={secret}")
    logging.getLogger("patchdrill.test.stdlib").warning("plain %s", secret)
    err = capsys.readouterr().err
    assert "connecting" in err and "plain" in err
    assert secret not in err
    assert "***" in err
