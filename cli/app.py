"""The `patchdrill` command: ad-hoc runs with no server needed (cli/api.py says which API they use)."""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import version as package_version
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from cli import backup, drill, failover, patch, server
from cli.common import (
    DEFAULT_CONFIG, ConfigOption, GroupsOption, HostsOption, JsonOption, console, emit, fail, load_or_exit,
    report_problems,
)
from configs.models import PatchdrillConfig
from flows.logs import configure, json_console_for_prefect

app = typer.Typer(
    name="patchdrill", no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False,
    help="Patch, back up and rehearse disaster recovery for a mixed Windows/Linux fleet.",
)
config_app = typer.Typer(no_args_is_help=True, help="Validate configs and print their schema.")
hosts_app = typer.Typer(no_args_is_help=True, help="Look at the inventory's hosts.")
app.add_typer(config_app, name="config")
app.add_typer(hosts_app, name="hosts")


@app.callback()
def _main(log_json: Annotated[bool, typer.Option("--log-json", help="Log events as JSON lines (Prefect's own lines and errors too).")] = False) -> None:
    configure(json=log_json)
    if log_json:
        json_console_for_prefect()


@app.command()
def version(as_json: JsonOption = False) -> None:
    """Print patchdrill's version."""
    emit({"patchdrill": package_version("patchdrill")}, as_json, lambda d: console.print(f"patchdrill {d['patchdrill']}"))


@config_app.command("check")
def config_check(file: Annotated[Path, typer.Argument(help="Config file to validate.")], as_json: JsonOption = False) -> None:
    """Validate a config; print every problem with its field and line (exit 1 if any)."""
    from configs.loader import ConfigError, load_config

    try:
        loaded = load_config(file)
    except ConfigError as exc:
        if as_json:
            typer.echo(json.dumps({"file": str(file), "ok": False, "problems": [p.__dict__ for p in exc.problems]}, indent=2))
        else:
            report_problems(exc)
        raise typer.Exit(1) from None
    cfg = loaded.config
    summary = {"file": str(file), "ok": True, "hosts": len(cfg.hosts), "storage": cfg.storage.kind}
    emit(summary, as_json, lambda d: console.print(f"[green]ok[/] {d['file']}: {d['hosts']} hosts, {d['storage']} storage"))


@config_app.command("schema")
def config_schema() -> None:
    """Print the config's JSON Schema (for editor completion)."""
    typer.echo(json.dumps(PatchdrillConfig.model_json_schema(), indent=2))


@hosts_app.command("ping")
def hosts_ping(
    config: ConfigOption = DEFAULT_CONFIG,
    group: GroupsOption = None,
    host: HostsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Connect to each host in parallel: OS, boot identity, round-trip time."""
    from tasks.inventory import ping_hosts

    loaded = load_or_exit(config)
    try:
        hosts = loaded.config.select(group, host)
    except KeyError as exc:
        fail(f"{config}: {exc.args[0]}")
    if not hosts:
        fail(f"{config}: no host matches the selection")
    rows = ping_hosts(hosts, loaded.base_dir)
    emit(rows, as_json, _render_ping)
    if not all(r.reachable for r in rows):
        raise typer.Exit(2)


def _render_ping(rows: list) -> None:  # type: ignore[type-arg]
    table = Table(title="hosts")
    for column in ("host", "transport", "address", "state", "os", "boot id", "rtt ms"):
        table.add_column(column)
    for r in rows:
        state = "[green]up[/]" if r.reachable else f"[red]unreachable[/] {r.error}"
        table.add_row(r.host, r.transport, r.address, state, r.os, r.boot_id, "" if r.rtt_ms is None else f"{r.rtt_ms:.1f}")
    console.print(table)


# Each pipeline's commands live in a module of their own and add themselves to the app.
backup.register(app)
failover.register(app)
patch.register(app)
drill.register(app)
server.register(app)


# A fresh PREFECT_HOME migrates its database before Prefect's temporary API answers: 10-25 s,
# longer on a busy machine, past Prefect's own 20 s default. Set before Prefect reads settings.
EPHEMERAL_STARTUP_SECONDS = "120"


def main() -> None:
    """The installed `patchdrill` command: the app, with one line instead of a traceback for
    whatever no command turned into a clear error (PATCHDRILL_DEBUG=1 shows the traceback)."""
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", EPHEMERAL_STARTUP_SECONDS)
    try:
        app(standalone_mode=True)
    except (SystemExit, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - the command line's last resort
        if os.environ.get("PATCHDRILL_DEBUG"):
            raise
        hint = ""
        if "ephemeral Prefect API server" in str(exc):
            hint = (" (raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, or point PREFECT_API_URL at a"
                    " running server: `make server`)")
        try:
            fail(f"{type(exc).__name__}: {exc}{hint}; PATCHDRILL_DEBUG=1 shows the traceback")
        except typer.Exit as done:
            sys.exit(done.exit_code)
