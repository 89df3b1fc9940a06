"""Every PowerShell script shipped in connectors/remote/ must at least parse.

No Windows runs here, so tree-sitter-powershell's grammar is the check that a .ps1 pushed to a
host is not broken before it gets there.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import tree_sitter_powershell
from tree_sitter import Language, Node, Parser

from connectors.base import REMOTE_DIR

POWERSHELL = Language(tree_sitter_powershell.language())
SCRIPTS = sorted(REMOTE_DIR.rglob("*.ps1"))


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


def test_there_are_scripts_to_check() -> None:
    assert SCRIPTS, f"no .ps1 under {REMOTE_DIR}: the glob or the layout is wrong"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(REMOTE_DIR)))
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
