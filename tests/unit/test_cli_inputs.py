"""Hostile configs on the user's path: `patchdrill config check` answers each with exit code 1 and
one line naming file:line and field, never a traceback."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from configs.loader import ConfigError, _LineFinder, _parse_yaml, load_config
from configs.models import AzureStorage
from connectors.stores import AzureBlobStore, StoreError
from cli.app import app

runner = CliRunner()

HOST = "  - name: {name}\n    transport: ssh\n    user: ops\n    address: 10.0.0.{n}\n"


def config_text(*hosts: str, storage: str = "storage: {kind: local, path: s}\n") -> str:
    return storage + ("hosts:\n" + "".join(hosts) if hosts else "hosts: []\n")


def one_error(tmp_path: Path, content: str | bytes, *args: str) -> str:
    """Run `config check` on content; assert the one-line failure and return that line."""
    path = tmp_path / "fleet.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    result = runner.invoke(app, ["config", "check", str(path), *args])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {path}:"), lines[0]
    return lines[0]


def test_latin1_config_names_the_byte_and_its_line(tmp_path: Path) -> None:
    text = config_text(HOST.format(name="web-1", n=1)) + "    tags: {site: Malmö}\n"
    line = one_error(tmp_path, text.encode("latin-1"))
    assert ":7: (top level): not UTF-8 text (byte 0xf6 at column 22)" in line


def test_random_bytes_are_one_line_not_a_traceback(tmp_path: Path) -> None:
    noise = random.Random(7).randbytes(4096)
    assert "UTF-8" in one_error(tmp_path, noise)


def test_control_characters_are_named_with_their_line(tmp_path: Path) -> None:
    line = one_error(tmp_path, config_text(HOST.format(name="web-1", n=1)) + "    tags: {a: \x07}\n")
    assert ":7: (top level): not valid YAML: character U+0007 is not allowed" in line


def test_nesting_too_deep_for_the_parser_is_one_line(tmp_path: Path) -> None:
    line = one_error(tmp_path, "storage: " + "[" * 5000 + "]" * 5000 + "\n")
    assert "storage" in line


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=512) | st.text(max_size=512).map(lambda t: t.encode("utf-8")))
def test_any_bytes_load_or_fail_with_problems(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "any.yaml"
    path.write_bytes(content)
    try:
        load_config(path)
    except ConfigError as exc:
        assert exc.problems and all(str(p).startswith(str(path)) for p in exc.problems)


def test_a_key_written_twice_is_refused_not_half_dropped(tmp_path: Path) -> None:
    text = config_text(HOST.format(name="web-1", n=1)) + "hosts:\n" + HOST.format(name="web-2", n=2)
    line = one_error(tmp_path, text)
    assert line.endswith(":7: (top level): not valid YAML: key 'hosts' appears twice in one mapping (first at line 2)")
    # A merged key may be overridden: that is what merging is for.
    _, data = _parse_yaml("base: &b {user: ops, port: 22}\nhost: {<<: *b, user: root}\n", "merge.yaml")
    assert data["host"] == {"user": "root", "port": 22}


def test_duplicate_host_is_reported_at_its_own_line(tmp_path: Path) -> None:
    text = config_text(HOST.format(name="web-1", n=1), HOST.format(name="web-2", n=2), HOST.format(name="web-1", n=3))
    line = one_error(tmp_path, text)
    assert line.endswith(":11: hosts[2].name: host name 'web-1' appears twice; first at hosts[0]"), line


@pytest.mark.parametrize(("reference", "expected", "payload"), [
    ("env:MY_PW extra", "'env:' must be followed by an environment variable name", "MY_PW extra"),
    ("env:1PW", "'env:' must be followed by an environment variable name", "1PW"),
    ("env:", "'env:' must be followed by an environment variable name", None),
    ("file: /run/pw", "'file:' must be followed by a file path on one line", "/run/pw"),
    ("file:/run/pw\nx", "'file:' must be followed by a file path on one line", "/run/pw"),
    ("prefect-secret:My Block", "'prefect-secret:' must be followed by a Prefect block name", "My Block"),
    ("vault:s3cr3t", "must be a reference, not a literal", "s3cr3t"),
    ("hunter2-hunter2", "must be a reference, not a literal", "hunter2"),
])
def test_malformed_references_are_refused_without_their_value(
        tmp_path: Path, reference: str, expected: str, payload: str | None) -> None:
    quoted = reference.replace("\n", "\\n")
    line = one_error(tmp_path, config_text(HOST.format(name="web-1", n=1) + f'    password: "{quoted}"\n'))
    assert f":7: hosts[0].password: password {expected}" in line
    # What follows the scheme may be a pasted secret: the error line never repeats it.
    assert payload is None or payload not in line


@pytest.mark.parametrize("reference", ["env:MY_PW", "env:_x9", "file:/run/my secrets/pw", "file:pw.txt",
                                       "prefect-secret:sql-01-winrm"])
def test_well_formed_references_pass(tmp_path: Path, reference: str) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text(config_text(HOST.format(name="web-1", n=1) + f'    password: "{reference}"\n'))
    result = runner.invoke(app, ["config", "check", str(path)])
    assert result.exit_code == 0, result.output


def test_a_large_config_finds_each_line_in_steps_bounded_by_the_path() -> None:
    """The line of a problem costs as many node visits as its path has parts, whatever the file's
    size: the old line index visited and copied every node of the file for every config."""
    visits = []
    for count in (10, 2000):
        text = config_text(*(HOST.format(name=f"h{i}", n=i % 250) for i in range(count)))
        text += "  - name: last\n    transport: nope\n"
        root, _ = _parse_yaml(text, "big.yaml")
        finder = _LineFinder(root)
        assert finder.line(("hosts", count, "transport")) == 2 + 4 * count + 2
        visits.append(finder.visits)
    assert visits == [3, 3]


_KEY = "c2VjcmV0LWFjY291bnQta2V5"
_REMOTE_HTTP = f"DefaultEndpointsProtocol=http;AccountName=acct;AccountKey={_KEY};BlobEndpoint=http://10.1.2.3:10000/acct"


@pytest.mark.parametrize("reference, text", [
    ("env:PD_TEST_CONN", _REMOTE_HTTP),
    ("file:conn.secret", _REMOTE_HTTP),  # relative to the config file, wherever the check runs
    ("env:PD_TEST_CONN", f"DefaultEndpointsProtocol=http;AccountName=acct;AccountKey={_KEY}"),
])
def test_azure_connection_string_over_http_needs_the_lab_flag(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               reference: str, text: str) -> None:
    monkeypatch.setenv("PD_TEST_CONN", text)
    (tmp_path / "conn.secret").write_text(text + "\n")
    monkeypatch.chdir("/")
    storage = f"storage:\n  kind: azure\n  container: backups\n  connection_string: {reference}\n"
    line = one_error(tmp_path, config_text(storage=storage))
    assert ":4: storage.connection_string: its blob endpoint is plain http" in line and "allow_insecure_transport" in line
    assert _KEY not in line and "10.1.2.3" not in line
    lab = tmp_path / "lab.yaml"
    lab.write_text(config_text(storage=storage + "  allow_insecure_transport: true\n"))
    assert runner.invoke(app, ["config", "check", str(lab)]).exit_code == 0


@pytest.mark.parametrize("text", [
    f"DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey={_KEY};"
    "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;",
    "UseDevelopmentStorage=true",
    f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={_KEY};EndpointSuffix=core.windows.net",
])
def test_https_and_loopback_connection_strings_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setenv("PD_TEST_CONN", text)
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(config_text(storage="storage:\n  kind: azure\n  container: backups\n  connection_string: env:PD_TEST_CONN\n"))
    result = runner.invoke(app, ["config", "check", str(cfg)])
    assert result.exit_code == 0, result.output


def test_a_connection_string_the_check_could_not_read_is_refused_when_the_store_opens(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A config built in code (or a Prefect Secret) is not resolved while validating: the store
    refuses it as it opens, before any request is sent."""
    monkeypatch.setenv("PD_TEST_CONN", _REMOTE_HTTP)
    cfg = AzureStorage(container="backups", connection_string="env:PD_TEST_CONN")
    with pytest.raises(StoreError, match="connection_string: its blob endpoint is plain http") as refused:
        AzureBlobStore.from_config(cfg)
    assert _KEY not in str(refused.value)
    lab = AzureStorage(container="backups", connection_string="env:PD_TEST_CONN", allow_insecure_transport=True)
    assert lab.connection_string_problem(_REMOTE_HTTP) is None


def test_azure_account_url_over_http_needs_the_lab_flag(tmp_path: Path) -> None:
    storage = "storage:\n  kind: azure\n  container: backups\n  account_url: http://acct.blob.core.windows.net\n"
    line = one_error(tmp_path, config_text(storage=storage))
    assert ":4: storage.account_url: plain http would send backups" in line and "allow_insecure_transport" in line
    lab = tmp_path / "lab.yaml"
    lab.write_text(config_text(storage=storage + "  allow_insecure_transport: true\n"))
    assert runner.invoke(app, ["config", "check", str(lab)]).exit_code == 0


def test_an_account_url_on_loopback_needs_no_lab_flag(tmp_path: Path) -> None:
    """One rule for both ways in: plain http that never leaves the machine is not readable on a network."""
    cfg = tmp_path / "fleet.yaml"
    cfg.write_text(config_text(storage="storage:\n  kind: azure\n  container: backups\n"
                                       "  account_url: http://127.0.0.1:10000/devstoreaccount1\n"))
    result = runner.invoke(app, ["config", "check", str(cfg)])
    assert result.exit_code == 0, result.output
