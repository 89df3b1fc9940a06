"""`patchdrill drill run | cleanup | report | history`: DR drills from a shell.

run starts the same flow a deployment or the UI starts (with no server configured, Prefect's
ephemeral API); cleanup works from the run's ledger in the store alone, so it needs neither the
run nor a server; report and history only read evidence records.

Exit codes of `drill run`, as its flow run's final state: Completed 0 (every probe passed,
cleanup verified, primaries unchanged), Failed 1 (also every mistake in the input), Cancelled 3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from cli.common import (
    DEFAULT_CONFIG, EXIT_FAILED, ConfigOption, JsonOption, console, emit, err_console, exit_as, fail, flow_result,
    load_or_exit,
)


drill_app = typer.Typer(no_args_is_help=True, help="DR drills: test failover of a recovery plan, cleanup, evidence.")

RunArgument = Annotated[str, typer.Argument(help="The drill's run id (its Prefect flow run id).")]


def register(app: typer.Typer) -> None:
    app.add_typer(drill_app, name="drill")


def _plan_or_exit(config: Path, plan: str) -> Any:
    from tasks.drill.members import PlanError, find_plan

    loaded = load_or_exit(config)
    try:
        return find_plan(loaded.config, plan, str(config))
    except PlanError as exc:
        fail(str(exc))


def _store(config: Path) -> Any:
    from connectors.stores import open_store

    loaded = load_or_exit(config)
    return open_store(loaded.config.storage, loaded.base_dir)


def _evidence(config: Path, run: str) -> Any:
    from connectors.stores import StoreError
    from tasks.drill.steps import find_evidence

    try:
        with _store(config) as store:
            found = find_evidence(store, run)
    except StoreError as exc:
        fail(str(exc))
    if found is None:
        fail(f"{config}: no drill {run!r} in the store (see `patchdrill drill history`)")
    return found


def _render_run(evidence: Any) -> None:
    from tasks.drill.report import member_rows, rpo_line, rto_line

    rows = member_rows(evidence)
    if rows:
        table = Table(title=f"drill {evidence.plan} {evidence.run_id}")
        for column in rows[0]:
            table.add_column(column)
        for row in rows:
            table.add_row(*row.values())
        console.print(table)
    color = {"passed": "green", "failed": "red", "cancelled": "yellow"}.get(evidence.outcome, "red")
    console.print(f"[bold {color}]{evidence.outcome}[/]: {evidence.notes[-1] if evidence.notes else ''}", highlight=False)
    console.print(f"RTO {rto_line(evidence)}; RPO {rpo_line(evidence)}", highlight=False)
    console.print(f"evidence: `patchdrill drill report {evidence.run_id}`", highlight=False)


@drill_app.command("run")
def run(
    plan: Annotated[str, typer.Argument(help="The recovery plan to drill.")],
    config: ConfigOption = DEFAULT_CONFIG,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="The plan's manual actions are done (or you will do them "
                                      "as the drill reaches them): do not pause for them. Without it, a plan with "
                                      "manual actions pauses for the Prefect UI, which needs a server "
                                      "(PREFECT_API_URL).")] = False,
    operator: Annotated[Optional[str], typer.Option("--operator", help="Who runs the drill, for the evidence "
                                                    "(default: PATCHDRILL_OPERATOR, else your user name).")] = None,
    slot_timeout: Annotated[float, typer.Option("--slot-timeout", min=0, help="Minutes to wait while another drill "
                                                "of the plan runs; then this one fails, having started nothing.")] = 240.0,
    as_json: JsonOption = False,
) -> None:
    """Test failover of a recovery plan: restore, isolate, start, probe, clean up with proof.

    Exit 0 when the drill passed, 1 when it failed (a probe, cleanup, readiness) or the input is
    wrong, 3 when it was cancelled (cleanup still ran).
    """
    from cli.interrupts import stoppable
    from flows.drill import drill_run
    from tasks.drill.evidence import DrillEvidence

    _plan_or_exit(config, plan)
    with stoppable():
        state = drill_run(config_path=str(config), plan=plan, operator=operator or "", manual_confirmed=yes,
                          slot_timeout_minutes=slot_timeout, return_state=True)
    emit(flow_result(state, DrillEvidence, f"drill {plan} "), as_json, _render_run)
    exit_as(state)


@drill_app.command("cleanup")
def cleanup(run: Annotated[Optional[str], typer.Argument(help="The drill's run id (its Prefect flow run id).")] = None,
            orphans: Annotated[bool, typer.Option("--orphans", help="Every drill whose ledger is not closed and that "
                                                  "is not running (no live slot lease): what crashed controllers "
                                                  "left.")] = False,
            config: ConfigOption = DEFAULT_CONFIG, as_json: JsonOption = False) -> None:
    """Remove exactly what a drill's ledger names and verify each item gone; exit 1 if any is not.

    For a run whose controller crashed, say; removing twice is harmless."""
    from connectors import connect
    from connectors.stores import StoreError
    from tasks.drill.cleanup import cleanup_run, orphaned_runs
    from tasks.drill.ledger import LedgerError
    from tasks.drill.members import CONTROLLER_HOST
    from tasks.drill.slot import running_runs
    from tasks.drill.steps import record_cleanup

    if (run is None) == (not orphans):
        fail("name one drill run, or give --orphans for every drill a crashed controller left")
    loaded = load_or_exit(config)
    hosts = {h.name: h for h in loaded.config.hosts} | {CONTROLLER_HOST.name: CONTROLLER_HOST}
    reports = []
    try:
        with _store(config) as store:
            runs = [run] if run is not None else orphaned_runs(store, running_runs(store))
            for run_id in runs:
                def connect_name(name: str, run_id: str = run_id) -> Any:
                    if name not in hosts:
                        raise KeyError(f"{config}: no host {name!r}, named in drill {run_id}'s ledger")
                    return connect(hosts[name], base_dir=loaded.base_dir)

                report = cleanup_run(store, run_id, connect_name)
                if not report.items and run is not None:
                    fail(f"{config}: drill {run!r} has no ledger in the store: nothing recorded, nothing removed")
                record_cleanup(store, run_id, report)
                reports.append(report)
    except (StoreError, LedgerError) as exc:
        fail(str(exc))

    def render(data: Any) -> None:
        if not data:
            console.print("no orphaned drill: every ledger in the store is closed or its drill is running",
                          highlight=False)
        for one in data:
            table = Table(title=f"cleanup of drill {one.run_id}")
            for column in ("member", "kind", "target", "item", "action", "verified"):
                table.add_column(column)
            for item in one.items:
                table.add_row(item.member or "", item.kind, item.target, item.identifier, item.action,
                              "[green]yes[/]" if item.verified else "[red]NO[/]")
            console.print(table)
            console.print(one.summary(), highlight=False)

    as_data = [{"run_id": r.run_id, "ok": r.ok, "items": [vars(i) for i in r.items]} for r in reports]
    emit((as_data[0] if run is not None else as_data) if as_json else reports, as_json, render)
    if not all(r.ok for r in reports):
        raise typer.Exit(EXIT_FAILED)


@drill_app.command("report")
def report(run: RunArgument, config: ConfigOption = DEFAULT_CONFIG,
           html: Annotated[Optional[Path], typer.Option("--html", help="Also write the self-contained HTML report "
                                                        "into this directory.")] = None,
           as_json: JsonOption = False) -> None:
    """Print a drill's evidence: verdicts, timeline, probes, points, cleanup proof, checksums."""
    from tasks.drill.report import drill_markdown, write_html_report

    evidence = _evidence(config, run)
    emit(evidence, as_json, lambda e: typer.echo(drill_markdown(e)))
    if html is not None:
        try:
            path = write_html_report(evidence, html)
        except OSError as exc:
            fail(f"cannot write the HTML report into {html}: {exc.strerror or exc}")
        err_console.print(f"HTML report: {path}", highlight=False)


@drill_app.command("history")
def history(plan: Annotated[Optional[str], typer.Argument(help="Only this plan.")] = None,
            config: ConfigOption = DEFAULT_CONFIG, as_json: JsonOption = False) -> None:
    """Every drill run with its RTO and RPO against the targets, oldest first, and the RTO trend per plan."""
    from connectors.stores import StoreError
    from tasks.drill.report import history_rows, rto_trend
    from tasks.drill.steps import read_evidence

    if plan is not None:
        _plan_or_exit(config, plan)
    try:
        with _store(config) as store:
            records = read_evidence(store, plan)
    except StoreError as exc:
        fail(str(exc))

    def render(data: dict[str, list[dict[str, str]]]) -> None:
        for title, rows in (("drills", data["runs"]), ("RTO trend", data["trend"])):
            table = Table(title=title)
            for column in (rows[0] if rows else {"": ""}):
                table.add_column(column)
            for row in rows:
                table.add_row(*row.values())
            console.print(table)

    emit({"runs": history_rows(records), "trend": rto_trend(records)}, as_json, render)
