"""The config schema and loader: every problem named with file, field and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from configs.loader import ConfigError, load_config, parse_config
from configs.models import HostConfig, PatchdrillConfig

REPO = Path(__file__).resolve().parents[2]

GOOD = """\
storage:
  kind: local
  path: store
hosts:
  - name: web-1
    address: 10.0.0.5
    transport: ssh
    user: ops
    ssh_key: ~/.ssh/id_ed25519
    groups: [web]
    timezone: Europe/Paris
    update_domain: 1
  - name: sql-1
    address: sql-1.corp.example
    transport: winrm
    os_family: windows
    user: CORP\\\\svc-patch
    password: env:PATCHDRILL_SQL_PASSWORD
    groups: [db]
"""


def test_shipped_configs_are_valid() -> None:
    for name in ("lab.yaml", "fleet.example.yaml"):
        loaded = load_config(REPO / "configs" / name)
        assert loaded.config.hosts, name


def test_good_config_parses_and_selects_groups() -> None:
    cfg = parse_config(GOOD)
    assert [h.name for h in cfg.select(["db"])] == ["sql-1"]
    assert cfg.hosts[1].effective_port == 5986
    assert cfg.hosts[0].effective_port == 22
    with pytest.raises(KeyError, match="nope"):
        cfg.select(names=["nope"])


def test_literal_password_rejected_with_how_to_reference_it() -> None:
    text = GOOD.replace("env:PATCHDRILL_SQL_PASSWORD", "S3cret-Passw0rd!")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "fleet.yaml")
    [problem] = caught.value.problems
    assert problem.field == "hosts[1].password"
    assert problem.line == 18
    assert "env:" in problem.message and "file:" in problem.message
    assert "S3cret-Passw0rd!" not in str(caught.value)


def test_every_problem_reported_with_line() -> None:
    text = GOOD.replace("Europe/Paris", "Europe/Atlantis").replace("update_domain: 1", "update_domain: -1")
    text = text.replace("transport: ssh", "transport: telnet")
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "f.yaml")
    found = {(p.field, p.line) for p in caught.value.problems}
    assert ("hosts[0].transport", 7) in found
    assert ("hosts[0].timezone", 11) in found
    assert ("hosts[0].update_domain", 12) in found
    assert all(str(p).startswith("f.yaml:") for p in caught.value.problems)


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("storage:\n  kind: local\n  path: [unclosed\nhosts: []\n")
    with pytest.raises(ConfigError) as caught:
        load_config(bad)
    assert "bad.yaml:" in str(caught.value) and "not valid YAML" in str(caught.value)


def test_missing_file_is_a_problem_not_a_traceback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.yaml")


def test_unknown_fields_and_duplicates_rejected() -> None:
    with pytest.raises(ConfigError, match=r"hosts\[0\]\.adress"):
        parse_config(GOOD.replace("address: 10.0.0.5", "adress: 10.0.0.5"))
    dup = GOOD.replace("name: sql-1", "name: web-1")
    with pytest.raises(ConfigError, match="appears twice"):
        parse_config(dup)


def test_basic_over_http_needs_explicit_opt_in() -> None:
    base = dict(name="w", transport="winrm", os_family="windows", user="u", password="env:X",
                winrm_scheme="http", winrm_auth="basic")
    with pytest.raises(ValueError, match="allow_insecure_transport"):
        HostConfig(**base)
    assert HostConfig(**base, allow_insecure_transport=True).effective_port == 5985


def test_azure_storage_needs_exactly_one_way_in() -> None:
    with pytest.raises(ConfigError, match="exactly one"):
        parse_config("storage:\n  kind: azure\n  container: backups\nhosts: []\n")
    with pytest.raises(ConfigError, match="storage.connection_string"):
        parse_config("storage:\n  kind: azure\n  container: backups\n  connection_string: DefaultEndpointsProtocol=https\n")


def test_schema_is_json_schema_with_descriptions() -> None:
    schema = PatchdrillConfig.model_json_schema()
    json.dumps(schema)
    host = schema["$defs"]["HostConfig"]["properties"]
    assert "reference" in host["password"]["anyOf"][0]["description"] or "reference" in host["password"]["description"]
    assert host["transport"]["enum"] == ["local", "ssh", "winrm"]


def test_problems_inside_tagged_unions_point_at_yaml_fields() -> None:
    text = GOOD + "patch_policies:\n  web:\n    health_probes:\n      - {kind: http, url: 'http://x/', status: 200}\n"
    with pytest.raises(ConfigError) as caught:
        parse_config(text, "f.yaml")
    [problem] = caught.value.problems
    assert problem.field == "patch_policies.web.health_probes[0].status"
    assert problem.line == 23
