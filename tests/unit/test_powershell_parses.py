"""Every PowerShell script shipped (the WinRM connector's own, and those in the tasks'
host_scripts/) must at least parse.

No Windows runs here, so tree-sitter-powershell's grammar is the check that a .ps1 pushed to a
host is not broken before it gets there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tree_sitter_powershell
from tree_sitter import Language, Node, Parser

from connectors import winrm
from tasks import probes
from tasks.backup.snapshot import host as snapshot
from tasks.backup import remote_restore
from tasks.backup.sources import windows_direct_upload as staged
from tasks.drill import readiness
from tasks.patching import windows_update
from tasks.patching.safety import clock

POWERSHELL = Language(tree_sitter_powershell.language())
ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(path for package in ("connectors", "tasks") for path in (ROOT / package).rglob("*.ps1"))


def syntax_problems(source: str) -> list[str]:
    """Every ERROR or MISSING node, as 'line:column: what'."""
    tree = Parser(POWERSHELL).parse(source.encode("utf-8"))
    problems: list[str] = []
    stack: list[Node] = [tree.root_node]
    while stack:
        node = stack.pop()
        if node.is_error or node.is_missing:
            row, column = node.start_point
            kind = f"missing {node.type}" if node.is_missing else "unexpected " + repr(node.text.decode("utf-8", "replace")[:40] if node.text else "")
            problems.append(f"{row + 1}:{column + 1}: {kind}")
        stack.extend(node.children)
    return sorted(problems)


def test_every_script_the_code_sends_is_checked() -> None:
    sent = {winrm.STDIN_LOADER, winrm.BOOT_IDENTITY, winrm.FILE_WRITE_CHUNK, winrm.FILE_COMMIT, winrm.FILE_STAT,
            winrm.FILE_READ_CHUNK, snapshot.VSS_SCRIPT, snapshot.VSS_REMOVE_SCRIPT, staged.HOST_SCRIPT,
            windows_update.SCRIPT, probes.WINDOWS_SCRIPT, readiness.FREE_SPACE_SCRIPT,
            remote_restore.WINDOWS_SCRIPT, clock.WINDOWS_SCRIPT}
    missing = sorted(str(path) for path in sent if path.resolve() not in SCRIPTS)
    assert not missing, f"sent to hosts but not found by the glob: {missing}"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_script_parses(script: Path) -> None:
    assert syntax_problems(script.read_text(encoding="utf-8")) == [], f"{script} has syntax errors"


@pytest.mark.parametrize("broken", [
    "param([string]$Path\n$x = 1\n",                       # unclosed param(
    "if ($x -eq 1) {\n    Write-Output 'one'\n",           # unclosed block
    "$value = 'never closed\n",                            # unterminated string
    "$x = (1 + )\n",                                        # missing operand (a MISSING node)
    "$h = @{ a = }\n",                                      # hashtable entry without a value
])
def test_a_broken_script_is_caught(broken: str) -> None:
    assert syntax_problems(broken), f"the parser accepted broken PowerShell: {broken!r}"


def test_a_valid_snippet_passes() -> None:
    assert syntax_problems("param([int]$Count)\nforeach ($n in 1..$Count) { Write-Output $n }\n") == []
