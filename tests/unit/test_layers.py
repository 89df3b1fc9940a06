"""The house rules of the layout: imports point down (configs < connectors < tasks < flows < cli)
and never in a circle, and the pure modules load no orchestrator or SDK.

The import graph is read from the source with `ast` (nothing is imported), counting every
import: module level, inside functions and under TYPE_CHECKING alike, because each is a
dependency a reader has to follow. Importing `a.b.c` runs `a` and `a.b` first, so each import
also depends on the packages above the module it names.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
#: Lowest first: a module may import its own layer and the ones before it, never one after.
LAYERS = ("configs", "connectors", "tasks", "flows", "cli")

Graph = Mapping[str, set[str]]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for layer in LAYERS for path in sorted((ROOT / layer).rglob("*.py"))}


def imported_names(path: Path, name: str) -> Iterable[str]:
    """Every module name an import statement in `path` names (relative imports resolved); for
    `from a import b`, both `a` and `a.b` (b may be a module or a name inside a)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield base
            yield from (f"{base}.{alias.name}" for alias in node.names)


def import_graph(modules: Mapping[str, Path]) -> dict[str, set[str]]:
    """module -> the project modules importing it runs (the named one and its packages)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for target in imported_names(path, name):
            parts = target.split(".")
            edges.update(prefix for i in range(1, len(parts) + 1) if (prefix := ".".join(parts[:i])) in modules)
        # A module's own packages run before it; they are not an import of its own.
        graph[name] = edges - {name} - {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    return graph


def upward_imports(graph: Graph) -> list[str]:
    rank = {layer: index for index, layer in enumerate(LAYERS)}
    return sorted(f"{source} imports {target}" for source, targets in graph.items() for target in targets
                  if rank[target.split(".")[0]] > rank[source.split(".")[0]])


def cycles(graph: Graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component: list[str] = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(found)


def test_the_checks_catch_an_upward_import_and_a_cycle() -> None:
    graph = {
        "configs.models": {"tasks.backup.policy"},
        "tasks.backup.policy": {"tasks.backup.repo.repository"},
        "tasks.backup.repo.repository": {"connectors.stores"},
        "connectors.stores": {"configs.models"},
        "flows.backup": {"tasks.backup.policy", "cli.common"},
        "cli.backup": {"flows.backup"},
        "cli.common": {"flows.logs"},
    }
    assert upward_imports(graph) == ["configs.models imports tasks.backup.policy", "flows.backup imports cli.common"]
    assert cycles(graph) == [["configs.models", "connectors.stores", "tasks.backup.policy", "tasks.backup.repo.repository"]]


def test_the_walk_sees_every_layer_and_lazy_imports() -> None:
    modules = project_modules()
    graph = import_graph(modules)
    assert {name.split(".")[0] for name in modules} == set(LAYERS)
    # connectors/__init__.py imports the transports inside connect(): those count too.
    assert {"connectors.local", "connectors.ssh", "connectors.winrm"} <= graph["connectors"]
    # The command registers its pipelines' sub-apps with plain imports, and they start the flows.
    assert {"cli.backup", "cli.patch"} <= graph["cli.app"]
    assert "flows.backup" in graph["cli.backup"]


def test_imports_point_down_only() -> None:
    assert upward_imports(import_graph(project_modules())) == []


def test_no_import_cycles() -> None:
    assert cycles(import_graph(project_modules())) == []


HEAVY = ("prefect", "azure", "zstandard", "blake3", "cryptography", "winrm", "paramiko")
#: The patch planner, package and every module of it: pure, so usable and testable without Prefect.
PLANNER = ("tasks.patching.plan", *sorted(module_name(path) for path in (ROOT / "tasks/patching/plan").glob("[!_]*.py")))


@pytest.mark.parametrize(("module", "forbidden"), [
    ("tasks.backup.repo", HEAVY),
    ("tasks.backup.repo.blockmap", HEAVY),
    ("configs.models", HEAVY),
    ("configs.policies", HEAVY),
    ("tasks.probes", ("prefect", "winrm", "azure")),
    ("configs.probes", HEAVY),
    ("connectors.stores", ("prefect", "azure")),
    *((module, HEAVY) for module in PLANNER),
    # A drill's isolation, start/stop and cleanup work over any connector, without Prefect.
    *((f"tasks.drill.{module}", HEAVY) for module in ("ledger", "isolation", "control", "copies", "cleanup")),
])
def test_pure_modules_load_no_orchestrator_or_sdk(module: str, forbidden: tuple[str, ...]) -> None:
    """In a fresh interpreter, so what this test process already imported cannot hide a load."""
    probe = (f"import json, sys\nimport {module}\n"
             f"print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}} & {set(forbidden)!r})))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == [], f"import {module} loads {done.stdout.strip()}"


#: What the repository core may stand on besides itself: the pipeline's errors, the stop token a
#: lock wait honours, the progress sink and the thread count verify uses.
REPO_GROUND = {"tasks", "tasks.backup", "tasks.backup.errors", "tasks.backup.cancel", "tasks.backup.progress",
               "tasks.backup.scheduling"}


def test_the_repository_core_stands_on_its_own() -> None:
    """tasks/backup/repo/ is the restic-like core: sources, snapshots, the engine and the Prefect
    steps build on it, never the reverse."""
    graph = import_graph(project_modules())
    leaks = sorted(f"{source} imports {target}" for source, targets in graph.items()
                   if source.startswith("tasks.backup.repo") for target in targets
                   if target.startswith("tasks.") and not target.startswith("tasks.backup.repo")
                   and target not in REPO_GROUND)
    assert leaks == []


#: The first segment of every kind of key in a backup repository (docs/repository.md).
REPOSITORY_KEYS = ("config.json", "chunks/", "maps/", "points/", "locks/", "damaged/", "staging/", "index/")


def test_only_the_repository_module_names_repository_keys() -> None:
    """A key is written in one place, tasks/backup/repo/repository.py: anywhere else, a string that
    starts like one is a key built by hand, which the format can change under."""
    owner = ROOT / "tasks/backup/repo/repository.py"
    found = []
    for path in sorted(p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")):
        if path == owner or "host_scripts" in path.parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(REPOSITORY_KEYS):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert found == []
