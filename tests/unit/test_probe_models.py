"""The probe models (configs/probes.py) as a config file states them, and as `config check` rejects them."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError
from typer.testing import CliRunner

from cli.app import app
from configs.policies import PatchPolicy
from configs.probes import ChecksumProbe, CommandProbe, HttpProbe, Probe, ScriptProbe, SqlProbe, TcpProbe

runner = CliRunner()
PROBE: TypeAdapter[Probe] = TypeAdapter(Probe)

EVERY_KIND = [
    {"kind": "tcp", "port": 5432, "where": "host"},
    {"kind": "http", "url": "https://{address}/health", "expect_body": "ok", "verify_tls": False},
    {"kind": "http", "url": "http://x/", "expect_body": r"^ready \d+", "body_match": "regex"},
    {"kind": "service", "service": "nginx"},
    {"kind": "command", "command": "pg_isready", "expect_output": "accepting"},
    {"kind": "script", "script": "checks/app.sh", "args": ["--quick"]},
    {"kind": "sql", "query": "SELECT count(*) FROM t", "database": "app", "user": "probe", "port": 5432,
     "password": "env:APP_DB_PASSWORD", "expect": 3},
    {"kind": "sql", "engine": "sqlite3", "database": "/srv/app/app.db", "query": "SELECT 1, 'a'", "expect_rows": [[1, "a"]]},
    {"kind": "checksum", "disk": "data", "paths": ["etc/app.conf", "var/lib/app/db"]},
]


@pytest.mark.parametrize("data", EVERY_KIND, ids=lambda d: str(d["kind"]))
def test_every_kind_reads_from_config_data_and_is_named(data: dict[str, object]) -> None:
    probe = PROBE.validate_python(data)
    assert probe.kind == data["kind"]
    # Unnamed probes are named by their description; a given name wins.
    assert probe.label == probe.describe() and probe.label
    named = PROBE.validate_python({**data, "name": "primary db"})
    assert named.label == "primary db"


def test_numbers_in_expected_sql_results_mean_the_text_the_client_prints() -> None:
    probe = PROBE.validate_python(EVERY_KIND[6])
    assert isinstance(probe, SqlProbe) and probe.expect == "3"
    rows = PROBE.validate_python(EVERY_KIND[7])
    assert isinstance(rows, SqlProbe) and rows.expect_rows == [["1", "a"]]


@pytest.mark.parametrize(("data", "message"), [
    ({"kind": "sql", "query": "select 1", "password": "hunter2-literal"}, "must be a reference, not a literal"),
    ({"kind": "sql", "query": "select 1", "expect": "1", "expect_rows": [["1"]]}, "not both"),
    ({"kind": "sql", "engine": "sqlite3", "query": "select 1"}, "needs database"),
    ({"kind": "sql", "engine": "sqlite3", "database": "a.db", "query": "select 1", "port": 5432}, "do not apply"),
    ({"kind": "command", "command": "true", "expect_output": "(unclosed"}, "not a valid regular expression"),
    ({"kind": "http", "url": "http://x/", "expect_body": "[", "body_match": "regex"}, "not a valid regular expression"),
    ({"kind": "checksum", "paths": ["../etc/shadow"]}, "relative to the disk's root"),
    ({"kind": "checksum", "paths": ["/etc/passwd"]}, "relative to the disk's root"),
    ({"kind": "checksum", "paths": ["C:\\Windows\\win.ini"]}, "relative to the disk's root"),
    ({"kind": "tcp", "port": 80, "where": "elsewhere"}, "where"),
])
def test_bad_probes_are_refused_with_the_reason(data: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message.replace("(", r"\(")) as caught:
        PROBE.validate_python(data)
    # The message (what `config check` prints) never repeats a pasted secret.
    assert all("hunter2-literal" not in error["msg"] for error in caught.value.errors())


def test_a_checksum_probe_has_no_place_in_a_patch_policy() -> None:
    with pytest.raises(ValidationError, match="belongs in a recovery plan"):
        PatchPolicy(health_probes=[{"kind": "checksum", "paths": ["a"]}])  # type: ignore[list-item]
    policy = PatchPolicy(health_probes=[{"kind": "tcp", "port": 22}, {"kind": "command", "command": "true"}])  # type: ignore[list-item]
    assert [type(p) for p in policy.health_probes] == [TcpProbe, CommandProbe]


def test_defaults_keep_the_patch_pipeline_as_it_was() -> None:
    http = HttpProbe(url="http://{address}/")
    assert (http.where, http.expect_status, http.verify_tls, http.timeout_seconds) == ("controller", 200, True, 10.0)
    assert ScriptProbe(script="a.sh").expect_exit == 0 and ChecksumProbe(paths=["a"]).disk is None


def test_config_check_names_the_line_of_a_literal_database_password(tmp_path: Path) -> None:
    config = tmp_path / "fleet.yaml"
    config.write_text(
        "storage: {kind: local, path: s}\nhosts: []\npatch_policies:\n  db:\n    health_probes:\n"
        "      - kind: sql\n        query: select 1\n        password: Sup3r-Secret\n", encoding="utf-8")
    result = runner.invoke(app, ["config", "check", str(config)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    [line] = result.stderr.splitlines()
    assert line.startswith(f"error: {config}:8:") and "patch_policies.db.health_probes[0]" in line and "password" in line
    assert "Sup3r-Secret" not in result.output
