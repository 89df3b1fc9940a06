"""What every `patchdrill` command shares: the config and --json options, clear errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Callable, NoReturn, Optional, TypeVar

import structlog
import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape

from configs.loader import ConfigError, LoadedConfig, load_config
from configs.secrets import redact
from flows.logs import json_lines

DEFAULT_CONFIG = Path("configs/lab.yaml")
_log = structlog.stdlib.get_logger("patchdrill.cli")

console = Console()
err_console = Console(stderr=True)


def reopen_consoles() -> None:
    """Look at standard output and error again (terminal or not, colours, width): a warm
    process's command (cli/warm.py) was handed its caller's after these were made."""
    console.__init__()  # type: ignore[misc]
    err_console.__init__(stderr=True)  # type: ignore[misc]

ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="Config file (YAML).")]
JsonOption = Annotated[bool, typer.Option("--json", help="Machine-readable JSON on stdout.")]
GroupsOption = Annotated[Optional[list[str]], typer.Option("--group", "-g", help="Only hosts in this group (repeatable).")]
HostsOption = Annotated[Optional[list[str]], typer.Option("--host", help="Only this host (repeatable).")]


def fail(message: str, code: int = 1) -> NoReturn:
    """One clear line on stderr, no traceback (a JSON line under --log-json)."""
    if json_lines():
        _log.error("cli.error", error=message)
    else:
        err_console.print(f"[bold red]error:[/] {escape(redact(message))}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def notice(event: str, message: str, **fields: Any) -> None:
    """One informational line on stderr (a JSON line under --log-json), apart from the command's output."""
    if json_lines():
        _log.info(event, **fields)
    else:
        err_console.print(escape(message), highlight=False, soft_wrap=True)


def load_or_exit(path: Path) -> LoadedConfig:
    try:
        return load_config(path)
    except ConfigError as exc:
        report_problems(exc)
        raise typer.Exit(1) from None


def report_problems(exc: ConfigError) -> None:
    """One line per problem on stderr, each naming file:line and field."""
    for problem in exc.problems:
        if json_lines():
            _log.error("config.problem", **vars(problem))
        else:
            err_console.print(f"[bold red]error:[/] {escape(str(problem))}", highlight=False, soft_wrap=True)


def to_jsonable(data: Any) -> Any:
    if isinstance(data, BaseModel):
        return data.model_dump(mode="json")
    if isinstance(data, (list, tuple)):
        return [to_jsonable(item) for item in data]
    if isinstance(data, dict):
        return {key: to_jsonable(value) for key, value in data.items()}
    return data


#: exit codes of the commands that run a flow: 0 Completed, 1 Failed (or bad input), 3 Cancelled
EXIT_FAILED = 1
EXIT_CANCELLED = 3

R = TypeVar("R")


def flow_result(state: Any, expected: type[R], what: str) -> R:
    """The result a flow run returned, or one line saying why there is none (it stopped early)."""
    result = state.result(raise_on_failure=False)
    if not isinstance(result, expected):
        fail(f"{what}{state.name}: {state.message or result}")
    return result


def exit_as(state: Any, *, cancelled: int = EXIT_CANCELLED) -> None:
    """Leave with the exit code the flow run's final state stands for (nothing when Completed)."""
    if state.is_cancelled():
        raise typer.Exit(cancelled)
    if not state.is_completed():
        raise typer.Exit(EXIT_FAILED)


def emit(data: Any, as_json: bool, render: Callable[[Any], None]) -> None:
    """JSON on stdout for scripts, or a rich rendering for people."""
    if as_json:
        typer.echo(redact(json.dumps(to_jsonable(data), indent=2, default=str)))
    else:
        render(data)
