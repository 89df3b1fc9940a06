"""`patchdrill backup | restore | points | verify | prune`: the backup pipeline from a shell.

backup and restore run the same Prefect flows a deployment runs (on the ephemeral API when no
server is configured); points, verify and prune work on the repository directly, so they answer
at once and can list every damaged chunk (verify_run is the flow for schedules and the UI). Progress bars
go to stderr so `--json` output on stdout stays clean.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional, TypeVar

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn
from rich.table import Table

from configs.secrets import SecretError, redact
from connectors.base import ConnectorError
from connectors.storage import StoreError
from flows.cli_common import (
    DEFAULT_CONFIG, ConfigOption, GroupsOption, HostsOption, JsonOption, console, emit, err_console, fail, load_or_exit,
)
from flows.logs import JsonLinesHandler, json_lines
from tasks.backup import progress
from tasks.backup.errors import BackupError
from tasks.backup.policy import BackupPolicy, policy_from_config

T = TypeVar("T")

PolicyOption = Annotated[Optional[str], typer.Option("--policy", "-p", help="Backup policy name (default: 'default' or the only one).")]
_EXPECTED = (BackupError, StoreError, ConnectorError, SecretError, OSError, KeyError)


class _Bars:
    """A rich progress bar per kind of work the engines report (a ProgressSink)."""

    def __init__(self, bars: Progress) -> None:
        self.bars = bars
        self.ids: dict[str, TaskID] = {}
        self.lock = threading.Lock()

    def _id(self, what: str) -> TaskID:
        with self.lock:
            if what not in self.ids:
                self.ids[what] = self.bars.add_task(what, total=0 if what != "uploaded" else None)
            return self.ids[what]

    def add_total(self, what: str, nbytes: int) -> None:
        task_id = self._id(what)
        current = self.bars.tasks[task_id].total or 0
        self.bars.update(task_id, total=current + nbytes)

    def advance(self, what: str, nbytes: int) -> None:
        self.bars.advance(self._id(what), nbytes)


@contextmanager
def _quiet_prefect_console() -> Iterator[None]:
    """Keep Prefect's own console lines (and the tracebacks it logs for a failed run) off the
    terminal while a command runs a flow: the command prints its result or one error line, and
    the run's logs still reach the Prefect API and UI through their own handler."""
    from prefect.logging.handlers import PrefectConsoleHandler

    loggers = [logging.getLogger()] + [logging.getLogger(name) for name in list(logging.root.manager.loggerDict)
                                       if name.startswith("prefect")]
    muted = [(h, h.level) for lg in loggers for h in lg.handlers if isinstance(h, (PrefectConsoleHandler, JsonLinesHandler))]
    for handler, _ in muted:
        handler.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        for handler, level in muted:
            handler.setLevel(level)


@contextmanager
def _progress(enabled: bool) -> Iterator[None]:
    # Under --log-json stderr is a stream of JSON lines, with no room for progress bars.
    if not enabled or json_lines():
        with _quiet_prefect_console():
            yield
        return
    bars = Progress(TextColumn("{task.description:>9}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    console=err_console, transient=False)
    progress.install(_Bars(bars))
    try:
        with bars, _quiet_prefect_console():
            yield
    finally:
        progress.install(None)


def _run(action: Callable[[], T]) -> T:
    """Run a flow or engine call; any failure becomes one clear line and exit 1."""
    try:
        return action()
    except typer.Exit:
        raise
    except _EXPECTED as exc:
        fail(str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc))
    except Exception as exc:  # noqa: BLE001 - the command line shows one line, never a traceback
        fail(f"{type(exc).__name__}: {redact(str(exc))}")


def _policy(config: Path, name: str | None) -> BackupPolicy:
    loaded = load_or_exit(config)
    return _run(lambda: policy_from_config(loaded.config.backup_policies, name, source=str(config)))


def _mib(n: int) -> str:
    return f"{n / 1048576:,.1f} MiB"


def backup(config: ConfigOption = DEFAULT_CONFIG, host: HostsOption = None, group: GroupsOption = None,
           disk: Annotated[Optional[list[str]], typer.Option("--disk", help="Only this disk (repeatable).")] = None,
           policy: PolicyOption = None, as_json: JsonOption = False) -> None:
    """Back up the selected hosts' disks (all hosts by default), then apply retention."""
    from flows.backup_run import BackupRunFailed, backup_run

    def run() -> tuple[list[Any], BackupRunFailed | None]:
        try:
            return backup_run(str(config), hosts=host, groups=group, policy=policy, disks=disk), None
        except BackupRunFailed as failure:
            if not hasattr(failure, "reports"):
                raise
            return failure.reports, failure

    _policy(config, policy)
    with _progress(not as_json):
        reports, failure = _run(run)
    # Every disk's outcome, the failed ones too: the disks that were backed up stay visible to a
    # script, which then reads the exit code.
    emit(reports, as_json, _render_backup)
    if failure is not None:
        fail(str(failure))


def _render_backup(reports: list[Any]) -> None:
    table = Table(title="backup (sizes in MiB)")
    for column in ("host", "disk", "consistency", "scanned", "changed", "uploaded", "stored", "s"):
        table.add_column(column, justify="right" if column in ("scanned", "changed", "uploaded", "stored", "s") else "left")
    for r in reports:
        table.add_row(r.host, r.disk, "[red]failed[/]" if r.status != "ok" else (r.consistency or "").removesuffix("-consistent"), *(f"{n / 1048576:,.1f}" for n in (
            r.scanned_bytes, r.changed_bytes, r.uploaded_bytes, r.stored_bytes)), f"{r.seconds:.1f}")
    console.print(table)


def restore(host: Annotated[str, typer.Argument(help="Host whose disk to restore.")],
            disk: Annotated[str, typer.Argument(help="Disk name.")],
            target: Annotated[Path, typer.Argument(help="Image file, device or directory to restore to (on this machine unless --to-host).")],
            config: ConfigOption = DEFAULT_CONFIG,
            point: Annotated[Optional[str], typer.Option("--point", help="Point time stamp (or its prefix) or key; default: latest.")] = None,
            force: Annotated[bool, typer.Option("--force", help="Overwrite an existing target (only differing blocks are written).")] = False,
            include: Annotated[Optional[list[str]], typer.Option("--include", "-i", help="Only this file, directory or glob (directory points; repeatable).")] = None,
            to_host: Annotated[Optional[str], typer.Option("--to-host", help="Restore onto this host of the config (default: this machine).")] = None,
            policy: PolicyOption = None, as_json: JsonOption = False) -> None:
    """Restore a recovery point, verifying every chunk before it is written."""
    from flows.restore_run import restore_run

    _policy(config, policy)
    with _progress(not as_json):
        where = str(target) if to_host else str(target.absolute())
        result = _run(lambda: restore_run(str(config), host, disk, where, point=point, force=force,
                                          include=include, policy=policy, target_host=to_host))
    emit(vars(result), as_json, lambda r: console.print(
        f"[green]restored[/] {r['point']} to {r['target']}: {r['blocks_written']}/{r['blocks']} blocks written "
        f"({_mib(r['bytes_written'])}) in {r['seconds']:.1f}s"))


def points(config: ConfigOption = DEFAULT_CONFIG,
           host: Annotated[Optional[str], typer.Option("--host", help="Only this host.")] = None,
           disk: Annotated[Optional[str], typer.Option("--disk", help="Only this disk.")] = None,
           as_json: JsonOption = False) -> None:
    """List recovery points: time, consistency, sizes. Needs no encryption key."""
    from connectors.storage import open_store
    from tasks.backup.repository import Repository

    loaded = load_or_exit(config)
    store = _run(lambda: open_store(loaded.config.storage, loaded.base_dir))
    # Points are plaintext: listing them needs the store, not the key.
    found = _run(lambda: Repository.open(store, metadata_only=True).points(host, disk))
    emit(found, as_json, _render_points)


def _render_points(found: list[Any]) -> None:
    table = Table(title="recovery points (sizes in MiB)")
    for column in ("host", "disk", "time (UTC)", "kind", "consistency", "size", "uploaded", "s"):
        table.add_column(column, no_wrap=column == "time (UTC)",
                         justify="right" if column in ("size", "uploaded", "s") else "left")
    for p in found:
        table.add_row(p.host, p.disk, p.time.strftime("%Y-%m-%d %H:%M:%S"), p.kind,
                      p.consistency.removesuffix("-consistent"), f"{p.totals.size / 1048576:,.1f}",
                      f"{p.totals.uploaded_bytes / 1048576:,.1f}", f"{p.seconds:.1f}")
    console.print(table)


def verify(config: ConfigOption = DEFAULT_CONFIG,
           host: Annotated[Optional[str], typer.Option("--host", help="Only this host's points.")] = None,
           disk: Annotated[Optional[str], typer.Option("--disk", help="Only this disk's points.")] = None,
           sample: Annotated[float, typer.Option("--sample", min=0.01, max=100.0, help="Percent of chunks to read back.")] = 100.0,
           policy: PolicyOption = None, as_json: JsonOption = False) -> None:
    """Read chunks back and check them; exit 1 and list what is missing or corrupt."""
    from tasks.backup.run import open_repository
    from tasks.backup.verify import verify as verify_repository

    loaded = load_or_exit(config)
    chosen = _policy(config, policy)
    with _progress(not as_json):
        repo = _run(lambda: open_repository(loaded.config, loaded.base_dir, chosen))
        report = _run(lambda: verify_repository(repo, host=host, disk=disk, sample_percent=sample))
    emit(vars(report) | {"ok": report.ok}, as_json, lambda _: _render_verify(report))
    if not report.ok:
        raise typer.Exit(1)


def _render_verify(report: Any) -> None:
    for kind, found in (("missing", report.missing), ("corrupt", report.corrupt)):
        for chunk, users in found.items():
            err_console.print(f"[red]{kind}[/] chunk {chunk} (points: {', '.join(users)})", highlight=False)
    for key, why in report.broken_points.items():
        err_console.print(f"[red]unreadable[/] point {key}: {why}", highlight=False)
    console.print(("[green]ok[/] " if report.ok else "[red]damaged[/] ") + report.summary())


def prune(config: ConfigOption = DEFAULT_CONFIG, policy: PolicyOption = None,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would go; delete nothing.")] = False,
          as_json: JsonOption = False) -> None:
    """Forget points the policy no longer keeps, then delete data no point references."""
    from tasks.backup.retention import forget, prune as prune_repository
    from tasks.backup.run import open_repository

    loaded = load_or_exit(config)
    chosen = _policy(config, policy)
    repo = _run(lambda: open_repository(loaded.config, loaded.base_dir, chosen))
    forgotten = _run(lambda: forget(repo, chosen.keep, dry_run=dry_run)) if not chosen.keep.keeps_everything else None
    report = _run(lambda: prune_repository(repo, dry_run=dry_run))
    summary = {"forgotten": forgotten.forgotten if forgotten else [], **vars(report)}
    emit(summary, as_json, lambda s: console.print(
        f"{'would forget' if dry_run else 'forgot'} {len(s['forgotten'])} points; "
        f"{'would delete' if dry_run else 'deleted'} {s['chunks_deleted']} chunks and {s['maps_deleted']} maps, "
        f"{_mib(s['bytes_freed'])}; {s['chunks_kept']} chunks kept"))


def register(app: typer.Typer) -> None:
    for command in (backup, restore, points, verify, prune):
        app.command(command.__name__)(command)
