"""Load a YAML config into the pydantic schema, reporting every problem with its line.

Errors name the file, the field path (hosts[2].password) and the YAML line, so a user can fix
all of them in one pass; the message never repeats a field's value, which might be a secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from configs.models import PatchdrillConfig

Loc = tuple[str | int, ...]


@dataclass(frozen=True)
class Problem:
    file: str
    field: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field or '(top level)'}: {self.message}"


class ConfigError(Exception):
    """The config cannot be used; `problems` lists each fault."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class LoadedConfig:
    config: PatchdrillConfig
    path: Path
    base_dir: Path


def load_config(path: Path | str) -> LoadedConfig:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError([Problem(str(path), "", None, "file not found")]) from None
    except OSError as exc:
        raise ConfigError([Problem(str(path), "", None, f"cannot read: {exc.strerror}")]) from None
    return LoadedConfig(config=parse_config(text, str(path)), path=path, base_dir=path.resolve().parent)


def parse_config(text: str, filename: str = "<config>") -> PatchdrillConfig:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else None
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([Problem(filename, "", line, f"not valid YAML: {reason}")]) from None
    if not isinstance(data, dict):
        raise ConfigError([Problem(filename, "", 1, "expected a mapping with 'storage' and 'hosts'")])
    lines = _line_index(node)
    try:
        return PatchdrillConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors(include_input=False, include_url=False):
            loc = _yaml_path(data, err["loc"])
            problems.append(Problem(filename, _dotted(loc), _nearest_line(lines, loc), _message(err)))
        raise ConfigError(problems) from None


def _message(err: Any) -> str:
    msg = str(err["msg"])
    return msg.removeprefix("Value error, ")


def _yaml_path(data: Any, loc: Loc) -> Loc:
    """pydantic's error path without the union tags it inserts (storage.local.path → storage.path)."""
    path: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and isinstance(part, str) and part not in node and node.get("kind") == part:
            continue
        path.append(part)
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            node = None
    return tuple(path)


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else ("." if out else "") + str(part)
    return out


def _line_index(node: yaml.Node | None, loc: Loc = ()) -> dict[Loc, int]:
    """Map each YAML path to its 1-based line."""
    index: dict[Loc, int] = {}
    if node is None:
        return index
    index[loc] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            child = (*loc, key.value)
            index[child] = key.start_mark.line + 1
            for sub, line in _line_index(value, child).items():
                index.setdefault(sub, line)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            index.update(_line_index(item, (*loc, i)))
    return index


def _nearest_line(lines: dict[Loc, int], loc: Loc) -> int | None:
    path = loc
    while path:
        if path in lines:
            return lines[path]
        path = path[:-1]
    return lines.get(())
