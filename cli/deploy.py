"""`make deploy`: register the deployments of deployments/prefect.yaml on the server that
PREFECT_API_URL names, choosing how a worker gets the code of each run.

- By default a run starts in the worker's own checkout (the file's pull step: the directory in
  $PATCHDRILL_HOME on the worker's machine), which the operator keeps in step with the server.
- With `--git-repository URL` each run first clones the repository (Prefect's
  `prefect.deployments.steps.git_clone`, then `set_working_directory` into the clone): a worker
  on another machine needs this project's Python environment and read access to the
  repository, nothing else, and always runs the branch's code as it is at the run's start.

Only the pull steps differ; the deployments (schedules, parameters, work pool) are the file's.
Run from the checkout whose entry points you deploy (make does).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
PREFECT_YAML = REPO / "deployments" / "prefect.yaml"
CLONE_STEP = "clone-patchdrill"


def git_pull_steps(repository: str, branch: str | None = None,
                   access_token: str | None = None) -> list[dict[str, Any]]:
    """Clone, then work in the clone. `access_token` is a template naming a Prefect Secret block
    (`{{ prefect.blocks.secret.NAME }}`), resolved on the worker when the run starts: the
    deployment stores the reference, never the token."""
    clone: dict[str, Any] = {"id": CLONE_STEP, "repository": repository}
    if branch:
        clone["branch"] = branch
    if access_token:
        clone["access_token"] = access_token
    return [{"prefect.deployments.steps.git_clone": clone},
            {"prefect.deployments.steps.set_working_directory": {"directory": f"{{{{ {CLONE_STEP}.directory }}}}"}}]


def with_pull_steps(source: Path, pull: list[dict[str, Any]]) -> str:
    """The deployment file's text with its top-level pull steps replaced."""
    spec = yaml.safe_load(source.read_text())
    spec["pull"] = pull
    return yaml.safe_dump(spec, sort_keys=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefect-file", type=Path, default=PREFECT_YAML)
    parser.add_argument("--git-repository", help="clone this repository (URL) at the start of each run")
    parser.add_argument("--git-branch", help="the branch to clone (default: the repository's default branch)")
    parser.add_argument("--git-access-token", metavar="TEMPLATE",
                        help="a Secret block reference, e.g. '{{ prefect.blocks.secret.git-token }}'")
    parser.add_argument("--name", action="append", default=[], help="deploy only this deployment (repeatable)")
    args = parser.parse_args(argv)
    if not args.prefect_file.is_file():
        print(f"deploy: {args.prefect_file}: no such file", file=sys.stderr)
        return 1
    which = [arg for name in args.name for arg in ("--name", name)] or ["--all"]
    with tempfile.TemporaryDirectory(prefix="patchdrill-deploy-") as scratch:
        prefect_file = args.prefect_file
        if args.git_repository:
            prefect_file = Path(scratch) / "prefect.yaml"
            prefect_file.write_text(with_pull_steps(args.prefect_file, git_pull_steps(
                args.git_repository, args.git_branch, args.git_access_token)))
        done = subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", "deploy", *which,
                               "--prefect-file", str(prefect_file)], cwd=REPO)
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
