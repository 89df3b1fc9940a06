"""The installed `patchdrill` command: the warm process when one fits (cli/warm.py), the command
line itself otherwise. Standard library only until it knows which: this is what every command
pays before it does anything."""

from __future__ import annotations

import sys


def main() -> None:
    from cli.warm import run_warm

    code = run_warm(sys.argv[1:])
    if code is not None:
        sys.exit(code)
    from cli.app import main as run_here

    run_here()
