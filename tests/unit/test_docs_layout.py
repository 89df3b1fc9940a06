"""docs/architecture.md and the README's layout name every package of the project, so a new
folder cannot land without its sentence."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LAYERS = ("configs", "connectors", "tasks", "flows", "cli")


def packages() -> list[str]:
    """Every folder of Python modules under the layers (host scripts and templates are data)."""
    found = {path.parent.relative_to(ROOT).as_posix() for layer in LAYERS for path in (ROOT / layer).rglob("*.py")}
    return sorted(p for p in found if not {"host_scripts", "templates", "__pycache__"} & set(p.split("/")))


def test_every_package_has_its_sentence() -> None:
    guide = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "tasks/patching/plan" in packages()
    missing = {name: [doc for doc, text in (("docs/architecture.md", f"| `{name}/` |"), ("README.md", f"\n{name}/ "))
                      if text not in (guide if doc.startswith("docs") else readme)]
               for name in packages()}
    assert not {name: docs for name, docs in missing.items() if docs}
