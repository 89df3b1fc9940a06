"""Load a YAML config into the pydantic schema, reporting every problem with its line.

Errors name the file, the field path (hosts[2].password) and the YAML line, so a user can fix
all of them in one pass; the message never repeats a field's value, which might be a secret.

The file is parsed once, by libyaml when PyYAML has it, into a node tree that keeps each
node's line; a problem's line is found by walking that tree along the problem's path, so a
large config costs one parse and each problem a few steps, whatever the file's size.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from configs.alerts import AlertsConfig
from configs.models import REFERENCES_FROM, PatchdrillConfig

Loc = tuple[str | int, ...]

# libyaml parses about eight times faster than the pure-Python parser and builds nodes in C.
_Base: type[yaml.SafeLoader] = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _Loader(_Base):  # type: ignore[valid-type,misc]
    """Safe loading that refuses a key written twice in one mapping: PyYAML keeps the last and
    silently drops the first, which for a second `hosts:` would drop a whole inventory."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], yaml.Node] = {}
            for key, _ in node.value:
                # Merged keys (<<: *defaults) are meant to be overridden; only literal keys count.
                if isinstance(key, yaml.ScalarNode) and key.tag != _MERGE_TAG:
                    first = seen.setdefault((key.tag, key.value), key)
                    if first is not key:
                        raise yaml.constructor.ConstructorError(
                            None, None, f"key {key.value!r} appears twice in one mapping (first at line "
                            f"{first.start_mark.line + 1})", key.start_mark)
        return super().construct_mapping(node, deep)
_gc_lock = threading.Lock()
_gc_pausers = 0


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
    base_dir = path.resolve().parent
    return LoadedConfig(config=parse_config(_read(path), str(path), base_dir=base_dir), path=path,
                        base_dir=base_dir)


def load_alerts(path: Path | str) -> AlertsConfig | None:
    """Only the `alerts:` section (None when there is none): what a failed run's alert needs even
    when the rest of the file is what failed the run."""
    path = Path(path)
    root, data = _parse_yaml(_read(path), str(path))
    section = data.get("alerts") if isinstance(data, dict) else None
    if section is None:
        return None
    try:
        return AlertsConfig.model_validate(section, context={REFERENCES_FROM: path.resolve().parent})
    except ValidationError as exc:
        raise _config_error(exc, {"alerts": section}, root, str(path), prefix=("alerts",)) from None


def _read(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError([Problem(str(path), "", None, "file not found")]) from None
    except OSError as exc:
        raise ConfigError([Problem(str(path), "", None, f"cannot read: {exc.strerror}")]) from None
    return _decode(raw, str(path))


def _decode(raw: bytes, filename: str) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError([Problem(
            filename, "", line,
            f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {column}): save the file as UTF-8",
        )]) from None


def parse_config(text: str, filename: str = "<config>", *, base_dir: Path | None = None) -> PatchdrillConfig:
    """Validate a config's text. With base_dir (the file's directory), checks that need a
    credential's value resolve the reference (env: and file:) to make them."""
    with _gc_paused():
        return _parse_config(text, filename, base_dir)


def _parse_config(text: str, filename: str, base_dir: Path | None) -> PatchdrillConfig:
    root, data = _parse_yaml(text, filename)
    if not isinstance(data, dict):
        raise ConfigError([Problem(filename, "", 1, "expected a mapping with 'storage' and 'hosts'")])
    try:
        context = {REFERENCES_FROM: base_dir} if base_dir is not None else None
        return PatchdrillConfig.model_validate(data, context=context)
    except ValidationError as exc:
        raise _config_error(exc, data, root, filename) from None


def _config_error(exc: ValidationError, data: Any, root: yaml.Node | None, filename: str,
                  prefix: Loc = ()) -> ConfigError:
    """Each of pydantic's errors as a Problem naming its field and line; `prefix` is the path of
    the section validated when it was not the whole file."""
    lines = _LineFinder(root)
    problems = []
    for err in exc.errors(include_input=False, include_url=False):
        loc = _yaml_path(data, (*prefix, *err["loc"]))
        problems.append(Problem(filename, _dotted(loc), lines.line(loc), _message(err)))
    return ConfigError(problems)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Hold the cyclic garbage collector while a config is parsed and validated: both allocate
    many small objects that hold no reference cycles.

    Each full collection walks every live object, so with the collector on a parse grows
    faster than the file (measured: 16x the hosts took 36x the time); paused, it is linear.
    Counted, so overlapping parses in several threads restore the collector only at the end.
    """
    global _gc_pausers
    with _gc_lock:
        if _gc_pausers == 0 and not gc.isenabled():
            # Someone else switched the collector off; leave it to them.
            pausing = False
        else:
            pausing = True
            _gc_pausers += 1
            gc.disable()
    try:
        yield
    finally:
        if pausing:
            with _gc_lock:
                _gc_pausers -= 1
                if _gc_pausers == 0:
                    gc.enable()


def _parse_yaml(text: str, filename: str) -> tuple[yaml.Node | None, Any]:
    """One parse: the node tree (for lines) and the plain data built from it."""
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        return root, (loader.construct_document(root) if root is not None else None)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise ConfigError([Problem(filename, "", line, f"not valid YAML: {exc.problem or exc.context or 'cannot parse'}")]) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        # libyaml reports the character as a code point, the pure-Python reader as a string.
        code = exc.character if isinstance(exc.character, int) else ord(exc.character)
        raise ConfigError([Problem(
            filename, "", line, f"not valid YAML: character U+{code:04X} is not allowed in YAML text")]) from None
    except yaml.YAMLError as exc:
        raise ConfigError([Problem(filename, "", None, f"not valid YAML: {exc}")]) from None
    except RecursionError:
        raise ConfigError([Problem(filename, "", None, "not a config: nested too deeply")]) from None
    finally:
        loader.dispose()


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


class _LineFinder:
    """The 1-based line of a YAML path: the deepest node on the path that exists.

    Each step is a list index or a key looked up in a per-mapping dict built the first time a
    problem passes through that mapping, so N problems in a file of any size cost about N times
    the path's length. `visits` counts the steps, for tests of exactly that.
    """

    def __init__(self, root: yaml.Node | None) -> None:
        self.root = root
        self._keys: dict[int, dict[str, tuple[yaml.Node, yaml.Node]]] = {}
        self.visits = 0

    def line(self, loc: Loc) -> int | None:
        node = self.root
        if node is None:
            return None
        line = node.start_mark.line + 1
        for part in loc:
            self.visits += 1
            if isinstance(node, yaml.MappingNode):
                found = self._mapping(node).get(str(part))
                if found is None:
                    break
                key, node = found
                # A key's line, not its value's: a block value starts on the line after.
                line = key.start_mark.line + 1
            elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
                node = node.value[part]
                line = node.start_mark.line + 1
            else:
                break
        return line

    def _mapping(self, node: yaml.MappingNode) -> dict[str, tuple[yaml.Node, yaml.Node]]:
        keys = self._keys.get(id(node))
        if keys is None:
            keys = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode):
                    # The last of two equal keys wins, as in the data PyYAML builds.
                    keys[key.value] = (key, value)
            self._keys[id(node)] = keys
        return keys
