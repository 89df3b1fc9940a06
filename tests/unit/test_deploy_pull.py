"""`make deploy GIT=…`: the git pull steps replace the checkout's, and nothing else changes.
(tests/e2e/test_scale_stack.py runs a flow through them on a real server and worker.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cli.deploy import PREFECT_YAML, git_pull_steps, with_pull_steps


def test_only_the_pull_steps_change() -> None:
    shipped = yaml.safe_load(PREFECT_YAML.read_text())
    steps = git_pull_steps("https://git.example.com/ops/patchdrill.git", "main",
                           "{{ prefect.blocks.secret.git-token }}")
    changed = yaml.safe_load(with_pull_steps(PREFECT_YAML, steps))
    assert changed["pull"] == [
        {"prefect.deployments.steps.git_clone": {"id": "clone-patchdrill",
                                                 "repository": "https://git.example.com/ops/patchdrill.git",
                                                 "branch": "main",
                                                 "access_token": "{{ prefect.blocks.secret.git-token }}"}},
        {"prefect.deployments.steps.set_working_directory": {"directory": "{{ clone-patchdrill.directory }}"}},
    ]
    assert {k: v for k, v in changed.items() if k != "pull"} == {k: v for k, v in shipped.items() if k != "pull"}


def test_a_missing_deployment_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cli.deploy import main

    assert main(["--prefect-file", str(tmp_path / "nope.yaml")]) == 1
    assert capsys.readouterr().err.strip() == f"deploy: {tmp_path / 'nope.yaml'}: no such file"
