"""`patchdrill backup | restore | points | verify | freshness | prune | repair | unlock`: the backup pipeline from a shell.

backup, restore, verify and prune run the same Prefect flows a deployment runs (on the ephemeral
API when no server is configured), so a command and a scheduled run behave alike; points, repair
and unlock work on the repository directly. Progress bars go to stderr so `--json` output on
stdout stays clean.
"""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Optional, TypeVar

import typer
from rich import box
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn
from rich.table import Table

from configs.policies import BackupPolicy
from configs.secrets import SecretError, redact
from connectors.base import ConnectorError
from connectors.stores import StoreError
from cli.common import (
    DEFAULT_CONFIG, ConfigOption, GroupsOption, HostsOption, JsonOption, console, emit, err_console, fail, load_or_exit,
)
from cli.interrupts import stoppable
from flows.logs import JsonLinesHandler, json_lines
from tasks.backup import cancel, kept, progress
from tasks.backup.cancel import Interrupted
from tasks.backup.errors import BackupError
from tasks.backup.policy import policy_from_config

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
    """Run a flow or engine call; any failure becomes one clear line and exit 1, a run stopped
    by a signal one line and the shell's code for that signal (130 for Ctrl-C, 143 for SIGTERM)."""
    try:
        return action()
    except typer.Exit:
        raise
    except Interrupted as exc:
        fail(str(exc), code=cancel.exit_code())
    except _EXPECTED as exc:
        fail(str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc))
    except Exception as exc:  # noqa: BLE001 - the command line shows one line, never a traceback
        fail(f"{type(exc).__name__}: {redact(str(exc))}")


def _outcome(state: Any) -> Any:
    """A flow run's result from its final state; a Cancelled run (stopped by a signal) raises
    Interrupted with the run's own account of what it left."""
    if state.is_cancelled():
        raise Interrupted(state.message or "interrupted")
    return state.result()


def _policy(config: Path, name: str | None) -> BackupPolicy:
    loaded = load_or_exit(config)
    return _run(lambda: policy_from_config(loaded.config.backup_policies, name, source=str(config)))


def _mib(n: int) -> str:
    return f"{n / 1048576:,.1f} MiB"


def backup(config: ConfigOption = DEFAULT_CONFIG, host: HostsOption = None, group: GroupsOption = None,
           disk: Annotated[Optional[list[str]], typer.Option("--disk", help="Only this disk (repeatable).")] = None,
           policy: PolicyOption = None, as_json: JsonOption = False) -> None:
    """Back up the selected hosts' disks (all hosts by default), then apply retention."""
    from flows.backup import BackupRunFailed, backup_run

    def run() -> tuple[list[Any], BackupRunFailed | None]:
        try:
            return _outcome(backup_run(str(config), hosts=host, groups=group, policy=policy, disks=disk,
                                       return_state=True)), None
        except BackupRunFailed as failure:
            if not hasattr(failure, "reports"):
                raise
            return failure.reports, failure

    _policy(config, policy)
    with stoppable(), _progress(not as_json):
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
    for r in reports:
        if r.warning:
            err_console.print(f"[yellow]warning:[/] {r.host} {r.disk}: {r.warning}", highlight=False)


def restore(host: Annotated[str, typer.Argument(help="Host whose disk to restore.")],
            disk: Annotated[str, typer.Argument(help="Disk name.")],
            target: Annotated[Path, typer.Argument(help="Image file, device or directory to restore to (on this machine unless --to-host).")],
            config: ConfigOption = DEFAULT_CONFIG,
            point: Annotated[Optional[str], typer.Option("--point", help="Point time stamp (or a prefix only one point has) or key; default: latest.")] = None,
            force: Annotated[bool, typer.Option("--force", help="Overwrite an existing target: only differing blocks are written, and entries the point lacks are removed.")] = False,
            include: Annotated[Optional[list[str]], typer.Option("--include", "-i", help="Only this file, directory or glob (directory points; repeatable).")] = None,
            to_host: Annotated[Optional[str], typer.Option("--to-host", help="Restore onto this host of the config (default: this machine).")] = None,
            policy: PolicyOption = None, as_json: JsonOption = False) -> None:
    """Restore a recovery point, verifying every chunk before it is written."""
    from flows.restore import restore_run

    _policy(config, policy)
    with stoppable(), _progress(not as_json):
        where = str(target) if to_host else str(target.absolute())
        result = _run(lambda: _outcome(restore_run(str(config), host, disk, where, point=point, force=force,
                                                   include=include, policy=policy, target_host=to_host,
                                                   return_state=True)))
    emit(vars(result), as_json, _render_restore)


def _render_restore(r: dict[str, Any]) -> None:
    for note in r["notes"]:
        err_console.print(f"[yellow]from the repository:[/] {note}", highlight=False)
    if r["source"] == "instant copy":
        console.print(f"[green]restored[/] {r['point']} to {r['target']} from its instant copy on the host "
                      f"({_mib(r['bytes_written'])} cloned, nothing read from the store) in {r['seconds']:.1f}s",
                      highlight=False)
        return
    removed = f", {r['removed']} entries the point lacks removed" if r["removed"] else ""
    console.print(f"[green]restored[/] {r['point']} to {r['target']}: {r['blocks_written']}/{r['blocks']} blocks "
                  f"written ({_mib(r['bytes_written'])}){removed} in {r['seconds']:.1f}s", highlight=False)
    for line in r["skipped"]:
        err_console.print(f"[yellow]not restored[/] {line}", highlight=False)


def points(config: ConfigOption = DEFAULT_CONFIG,
           host: Annotated[Optional[str], typer.Option("--host", help="Only this host.")] = None,
           disk: Annotated[Optional[str], typer.Option("--disk", help="Only this disk.")] = None,
           instant_copies: Annotated[bool, typer.Option("--instant/--no-instant", help="Ask each host with image points which still have their clone kept there (an instant restore).")] = True,
           as_json: JsonOption = False) -> None:
    """List recovery points: time, consistency, the disk's size and the bytes it holds (used:
    its size less holes and zero blocks), what was uploaded, and whether an instant copy is kept
    on the host. Needs no encryption key."""
    from connectors.stores import open_store
    from tasks.backup.repo.repository import Repository

    loaded = load_or_exit(config)
    store = _run(lambda: open_store(loaded.config.storage, loaded.base_dir))
    # Points are plaintext: listing them needs the store, not the key.
    found = _run(lambda: Repository.open(store, metadata_only=True).points(host, disk))
    # Whether a point's clone is still kept on its host is the host's to say (one call per host).
    instant = kept.instant_points(loaded.config.hosts, loaded.base_dir, found) if instant_copies else {}
    rows = [p.model_dump(mode="json") | {"instant_copy": instant.get(p.key)} for p in found]
    emit(rows, as_json, _render_points)


_SHORT_LEVEL = {"crash-consistent": "crash", "application-consistent": "app", "file-system-consistent": "fs"}


def _render_points(found: list[dict[str, Any]]) -> None:
    # Fits 80 columns: short kinds (--json has the full words and the seconds each point took).
    table = Table(title="recovery points (sizes in MiB)", box=box.SIMPLE_HEAD, padding=(0, 1, 0, 0))
    numbers = ("size", "used", "uploaded")
    for column in ("host", "disk", "time (UTC)", "kind", *numbers, "instant"):
        table.add_column(column, no_wrap=column in ("time (UTC)", "kind", "instant"), justify="right" if column in numbers else "left")
    for p in found:
        totals = p["totals"]
        # Points from before holes were recorded say nothing of their used bytes.
        used = "—" if totals.get("used") is None else f"{totals['used'] / 1048576:,.1f}"
        level = _SHORT_LEVEL.get(p["consistency"], p["consistency"])
        table.add_row(p["host"], p["disk"], p["time"][:16].replace("T", " "),
                      f"{'dir' if p['kind'] == 'directory' else p['kind']}, {level}",
                      f"{totals['size'] / 1048576:,.1f}", used, f"{totals['uploaded_bytes'] / 1048576:,.1f}",
                      {True: "yes", False: "-", None: "?" if p["kind"] == "block" else "-"}[p["instant_copy"]])
    console.print(table)


def verify(config: ConfigOption = DEFAULT_CONFIG,
           host: Annotated[Optional[str], typer.Option("--host", help="Only this host's points.")] = None,
           disk: Annotated[Optional[str], typer.Option("--disk", help="Only this disk's points.")] = None,
           sample: Annotated[float, typer.Option("--sample", min=0.01, max=100.0, help="Percent of chunks to read back.")] = 100.0,
           policy: PolicyOption = None, as_json: JsonOption = False) -> None:
    """Read chunks back and check them; exit 1 and list what is missing or corrupt."""
    from flows.verify import RepositoryDamaged, verify_run

    def run() -> Any:
        try:
            return _outcome(verify_run(str(config), host=host, disk=disk, sample_percent=sample, policy=policy,
                                       return_state=True))
        except RepositoryDamaged as damaged:
            if not hasattr(damaged, "report"):
                raise
            return damaged.report

    _policy(config, policy)
    with stoppable(), _progress(not as_json):
        report = _run(run)
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
    if report.missing or report.corrupt:
        console.print("recorded: the next backup rewrites these chunks where it reads their data; "
                      "`patchdrill repair` does it now from the live disks")


def freshness(config: ConfigOption = DEFAULT_CONFIG, host: HostsOption = None, group: GroupsOption = None,
              policy: PolicyOption = None, as_json: JsonOption = False) -> None:
    """Alert on each disk whose newest point is older than the policy's max_point_age (or that has
    none); exit 1 if any is stale."""
    from flows.freshness import freshness_check

    if _policy(config, policy).max_point_age is None:
        fail(f"{config}: backup policy {policy or 'default'} sets no max_point_age: nothing to check against")
    with stoppable():
        rows = _run(lambda: _outcome(freshness_check(str(config), hosts=host, groups=group, policy=policy,
                                                     return_state=True)))
    emit(rows, as_json, _render_freshness)
    if any(row.stale for row in rows):
        raise typer.Exit(1)


def _render_freshness(rows: list[Any]) -> None:
    table = Table(title="newest recovery point per disk")
    for column in ("host", "disk", "newest point (UTC)", "age", "state"):
        table.add_column(column)
    for row in rows:
        age = "" if row.age_seconds is None else f"{row.age_seconds / 3600:,.1f} h"
        newest = row.newest_point.strftime("%Y-%m-%d %H:%M:%S") if row.newest_point else "none"
        table.add_row(row.host, row.disk, newest, age, "[red]stale[/]" if row.stale else "[green]ok[/]")
    console.print(table)


def prune(config: ConfigOption = DEFAULT_CONFIG, host: HostsOption = None, group: GroupsOption = None,
          policy: PolicyOption = None,
          dry_run: Annotated[bool, typer.Option("--dry-run", help="Show what would go; delete nothing.")] = False,
          as_json: JsonOption = False) -> None:
    """Forget the selected hosts' points the policy no longer keeps (every host of the config by
    default), then delete data no point references (one lock, taken first)."""
    from flows.prune import prune_run

    _policy(config, policy)
    with stoppable(), _progress(False):
        summary = _run(lambda: _outcome(prune_run(str(config), hosts=host, groups=group, policy=policy,
                                                  dry_run=dry_run, return_state=True)))
    report = summary.prune
    assert report is not None
    for why in report.stale_locks_removed:
        err_console.print(f"[yellow]removed stale lock[/] {why}", highlight=False)
    emit({"forgotten": summary.forgotten, **vars(report), "kept_clones_dropped": summary.kept_clones_dropped},
         as_json, lambda s: console.print(
        f"{'would forget' if dry_run else 'forgot'} {len(s['forgotten'])} points; "
        f"{'would delete' if dry_run else 'deleted'} {s['chunks_deleted']} chunks and {s['maps_deleted']} maps, "
        f"{_mib(s['bytes_freed'])}; {s['chunks_kept']} chunks kept"
        + (f"; removed {len(s['kept_clones_dropped'])} kept clones from hosts" if s["kept_clones_dropped"] else "")))
    if summary.kept_clones_error:
        err_console.print(f"[yellow]warning:[/] kept clones of forgotten points stay on hosts until their next "
                          f"backup: {summary.kept_clones_error}", highlight=False)
    if report.staged_left:
        err_console.print(f"[yellow]warning:[/] {report.staged_left} staged upload blobs could not be deleted "
                          "(see the log); the next prune tries again", highlight=False)


def unlock(config: ConfigOption = DEFAULT_CONFIG,
           remove_all: Annotated[bool, typer.Option("--all", help="Also remove locks whose holders look alive (a host that is gone for good).")] = False,
           as_json: JsonOption = False) -> None:
    """Remove stale locks (their process is dead, or their host stopped refreshing them); --all removes every lock."""
    from connectors.stores import open_store
    from tasks.backup.repo.repository import Repository

    loaded = load_or_exit(config)
    store = _run(lambda: open_store(loaded.config.storage, loaded.base_dir))
    # Locks are plaintext: removing them needs the store, not the key.
    repo = _run(lambda: Repository.open(store, metadata_only=True))
    removed = _run(lambda: repo.remove_locks(include_live=remove_all))
    left = _run(lambda: repo.lock_states())
    for state in removed:
        if not state.stale:
            err_console.print(f"[yellow]warning:[/] removed a live lock: {redact(state.why)}. If that process is still "
                              "running, a prune can now delete data it is writing; stop it or re-run it.", highlight=False)
    summary = {"removed": [{"lock": s.key, "kind": s.kind, "stale": s.stale, "why": redact(s.why)} for s in removed],
               "held": [{"lock": s.key, "kind": s.kind, "why": redact(s.why)} for s in left]}
    emit(summary, as_json, _render_unlock)


def _render_unlock(summary: dict[str, Any]) -> None:
    for row in summary["removed"]:
        console.print(f"removed {row['lock']}: {row['why']}", highlight=False)
    for row in summary["held"]:
        console.print(f"[yellow]still held[/] {row['why']}; `patchdrill unlock --all` removes it", highlight=False)
    if not summary["removed"] and not summary["held"]:
        console.print("no locks")


def repair(config: ConfigOption = DEFAULT_CONFIG, policy: PolicyOption = None, as_json: JsonOption = False) -> None:
    """After `verify`: rewrite damaged chunks from the live disks that still hold their data; exit 1
    and list the points that stay damaged."""
    from functools import partial

    from tasks.backup.repair import repair as repair_repository
    from tasks.backup.disk import live_source, open_repository

    loaded = load_or_exit(config)
    chosen = _policy(config, policy)
    with _progress(not as_json):
        repo = _run(lambda: open_repository(loaded.config.storage, loaded.base_dir, chosen))
        report = _run(lambda: repair_repository(repo, partial(live_source, loaded.config, loaded.base_dir),
                                                workers=chosen.workers))
    emit(vars(report) | {"index": vars(report.index), "damaged_points": report.damaged_points, "ok": report.ok}, as_json,
         lambda _: _render_repair(report))
    if not report.ok:
        raise typer.Exit(1)


def _render_repair(report: Any) -> None:
    index = report.index
    if index.rebuilt:
        console.print(f"index rebuilt from the store's {index.stored} chunks ({index.stale} stale entries, "
                      f"{index.unindexed} chunks unindexed, {index.unreadable} unreadable index files)", highlight=False)
    elif index.folded:
        console.print(f"index of {index.stored} chunks folded from {index.folded} files into one", highlight=False)
    if not report.recorded:
        console.print("nothing to repair: no damage recorded (run `patchdrill verify` first)")
        return
    for where, why in report.unreadable_disks.items():
        err_console.print(f"[yellow]could not read[/] {where}: {why}", highlight=False)
    for chunk, users in report.remaining.items():
        err_console.print(f"[red]still damaged[/] chunk {chunk} (points: {', '.join(users)})", highlight=False)
    for key, why in report.broken_points.items():
        err_console.print(f"[red]unreadable[/] point {key}: {why}", highlight=False)
    damaged = report.damaged_points
    console.print(f"repaired {len(report.repaired)} of {report.recorded} damaged chunks; "
                  + (f"[red]{len(damaged)} points remain damaged[/]: {', '.join(damaged)}" if damaged
                     else "[green]no point remains damaged[/]"), highlight=False)


def register(app: typer.Typer) -> None:
    for command in (backup, restore, points, verify, freshness, prune, repair, unlock):
        app.command(command.__name__)(command)
