"""The lab's PostgreSQL cluster refuses, in one line, what it cannot start from.
(tests/e2e/test_scale_stack.py runs the cluster under a real Prefect server.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.lab_postgres import LabPostgres, PostgresFailed, server_binaries


def test_no_postgresql_installed_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(PostgresFailed, match=r"^Debian's postgresql is not installed .*make bootstrap"):
        server_binaries(tmp_path)


def test_a_cluster_without_its_password_file_is_refused_not_reinitialised(tmp_path: Path) -> None:
    cluster = LabPostgres(tmp_path / "pg", 5999)
    (cluster.data).mkdir(parents=True)
    (cluster.data / "PG_VERSION").write_text("15\n")
    with pytest.raises(PostgresFailed, match="password is missing") as failed:
        cluster.prepare()
    assert str(tmp_path / "pg") in str(failed.value)
    assert (cluster.data / "PG_VERSION").read_text() == "15\n"  # the data is left alone
