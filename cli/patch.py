"""`patchdrill patch …`: enroll, assess, run, calendar, history from the command line.

enroll, assess and run start the same flows a deployment or the UI starts (on the Prefect API
cli/api.py chooses); calendar and history only read.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from cli.api import using_api
from cli.interrupts import stoppable
from cli.common import (
    DEFAULT_CONFIG, ConfigOption, GroupsOption, HostsOption, JsonOption, console, emit, exit_as,
    fail, flow_result, load_or_exit,
)

PolicyOption = Annotated[Optional[str], typer.Option(
    "--policy", help="Patch policy name (default: the group's, else 'default').")]
# Kept in step with flows.patch.DEFAULT_FORKS (not imported: that module loads Prefect).
ForksOption = Annotated[int, typer.Option("--forks", "-f", min=1, help="Hosts enrolled and assessed at once.")]
DEFAULT_FORKS = 25

RefreshOption = Annotated[bool, typer.Option(
    "--refresh/--no-refresh", help="Refresh each host's package lists first (apt-get update, dnf --refresh, "
    "zypper refresh: the one change it makes to a host); --no-refresh reads the lists the host already has "
    "and leaves its package status and lists byte for byte as they were.")]

# Exit codes of `patch run`, as its flow run's final state: Completed 0, Failed 1 (also every
# mistake in the input), Cancelled 3 (not approved).

patch_app = typer.Typer(no_args_is_help=True, help="Patch runs: enroll, assess, install by update domain, report.")


def register(app: typer.Typer) -> None:
    app.add_typer(patch_app, name="patch")


def _fleet_or_exit(config: Path, group: list[str] | None, host: list[str] | None, policy: str | None) -> Any:
    """Check the config, the selection and the policy before any flow starts (and before
    Prefect's ephemeral API spends seconds starting): one clear line per problem."""
    from tasks.patching.fleet import RunSetupError, select_fleet

    loaded = load_or_exit(config)
    try:
        return select_fleet(loaded, group, host, policy)
    except RunSetupError as exc:
        fail(str(exc))


@patch_app.command("enroll")
def enroll(config: ConfigOption = DEFAULT_CONFIG, group: GroupsOption = None, host: HostsOption = None,
           as_json: JsonOption = False) -> None:
    """Enroll hosts: OS, build, package manager, hotpatch eligibility (exit 2 if any is unreachable)."""
    from flows.patch import patch_enroll

    _fleet_or_exit(config, group, host, None)
    with using_api():
        rows = patch_enroll(config_path=str(config), groups=group, hosts=host)

    def render(data: list[Any]) -> None:
        table = Table(title="enrollment")
        for column in ("host", "state", "os", "build", "package manager", "hotpatch", "reboot detection"):
            table.add_column(column)
        for r in data:
            e = r.enrollment
            if e is None:
                table.add_row(r.host, f"[red]unreachable[/] {r.error}", "", "", "", "", "")
            else:
                table.add_row(r.host, "[green]enrolled[/]", e.os_name, e.build, e.package_manager,
                              "yes" if e.hotpatch_eligible else "no", e.reboot_detection)
        console.print(table)

    emit(rows, as_json, render)
    if not all(r.reachable for r in rows):
        raise typer.Exit(2)


def _changes_made(assessment: Any) -> str:
    """What an assessment or a dry run changed on the hosts, in words that stay true."""
    if not assessment.refreshed:
        return "nothing on any host changed (the package lists the hosts already had were read)"
    return (f"nothing was installed or rebooted, but the package lists of {len(assessment.refreshed)} host(s) "
            f"were refreshed ({', '.join(assessment.refreshed)}); --no-refresh changes nothing")


def _render_assessment(report: Any) -> None:
    table = Table(title="assessment")
    for column in ("host", "update", "classification", "state", "reason"):
        table.add_column(column)
    for plan in report.plans:
        for update in plan.install:
            table.add_row(plan.host, update.id, update.classification.value, "Missing", "selected for the next run")
        for held in plan.held:
            table.add_row(plan.host, held.update_id, held.classification.value, held.state.value, held.reason)
        if not plan.install and not plan.held:
            table.add_row(plan.host, "", "", "", "up to date")
    for host_name, error in report.errors.items():
        table.add_row(host_name, "", "", "[red]error[/]", error)
    console.print(table)


def _render_assess(report: Any) -> None:
    _render_assessment(report)
    console.print(f"Assessment: {_changes_made(report)}.", highlight=False)


@patch_app.command("assess")
def assess(
    config: ConfigOption = DEFAULT_CONFIG,
    group: GroupsOption = None,
    host: HostsOption = None,
    policy: PolicyOption = None,
    refresh: RefreshOption = True,
    forks: ForksOption = DEFAULT_FORKS,
    as_json: JsonOption = False,
) -> None:
    """What each host misses and what a run would install now. Installs nothing; refreshes the
    hosts' package lists first unless --no-refresh (exit 2 if a host could not be assessed)."""
    from flows.patch import patch_assess

    _fleet_or_exit(config, group, host, policy)
    with using_api():
        report = patch_assess(config_path=str(config), groups=group, hosts=host, policy=policy, refresh=refresh,
                              forks=forks)
    emit(report, as_json, _render_assess)
    if report.errors:
        raise typer.Exit(2)


def _status(status: str) -> str:
    # A "rebooting" record is one the run never finished: the host may still be down.
    return {"failed": "[red]failed[/]", "unreachable": "[red]unreachable[/]",
            "rebooting": "[yellow]rebooting[/]"}.get(status, status)


def _render_run(report: Any) -> None:
    if report.dry_run:
        _render_assessment(report.assessment)
        console.print(report.plan.as_text(), highlight=False)
        console.print(f"[bold]Dry run[/]: {_changes_made(report.assessment)}.", highlight=False)
        return
    table = Table(title=f"patch run {report.run_id}")
    for column in ("host", "status", "rebooted", "installed", "failed", "missing", "reason"):
        table.add_column(column)
    from tasks.patching.models import ComplianceState as S

    for r in sorted(report.records, key=lambda r: r.host):
        installed = r.count(S.INSTALLED) + r.count(S.INSTALLED_PENDING_REBOOT)
        table.add_row(r.host, _status(r.status), "yes" if r.rebooted else "no", str(installed), str(r.count(S.FAILED)),
                      str(r.count(S.MISSING)), r.reason)
    console.print(table)
    if report.stopped:
        console.print(f"[bold red]rollout stopped:[/] {report.stopped}", highlight=False)


@patch_app.command("run")
def run(
    config: ConfigOption = DEFAULT_CONFIG,
    group: GroupsOption = None,
    host: HostsOption = None,
    policy: PolicyOption = None,
    dry_run: Annotated[bool, typer.Option(
        "--dry-run", help="Print the rollout plan (batches, windows, expected reboots); change nothing.")] = False,
    yes: Annotated[bool, typer.Option(
        "--yes", "-y", help="Approve the run here (for policies that require approval).")] = False,
    ignore_windows: Annotated[bool, typer.Option(
        "--ignore-windows", help="Install on hosts outside their maintenance window too.")] = False,
    reboot_outside_window: Annotated[bool, typer.Option(
        "--reboot-outside-window", help="Allow reboots outside maintenance windows.")] = False,
    wait_for_approval: Annotated[bool, typer.Option(
        "--wait-for-approval", help="Pause for approval in the Prefect UI, as a deployment's run does "
        "(needs a Prefect server: PREFECT_API_URL).")] = False,
    refresh: RefreshOption = True,
    forks: ForksOption = DEFAULT_FORKS,
    as_json: JsonOption = False,
) -> None:
    """Patch hosts by update domain inside their windows.

    Exit 0 when the run completed, 1 when a host failed or the rollout stopped (the run's state
    is Failed), 3 when the run was not approved or was stopped (Cancelled): Ctrl-C lets the
    running batch finish and starts no other; a second Ctrl-C exits at once.
    """
    from prefect.settings import get_current_settings

    from flows.patch import PatchRunReport, patch_run

    fleet = _fleet_or_exit(config, group, host, policy)
    if wait_for_approval and yes:
        fail("--yes and --wait-for-approval contradict each other: choose one")
    if wait_for_approval and not get_current_settings().api.url:
        fail("--wait-for-approval needs a Prefect server to approve on: set PREFECT_API_URL")
    if fleet.policy.approval_required and not dry_run and not yes and not wait_for_approval:
        fail(f"policy {fleet.policy_name!r} requires approval: review `patchdrill patch run --dry-run`, then run "
             "again with --yes, or with --wait-for-approval to approve in the Prefect UI")
    gate = fleet.policy.recovery_point
    if gate is not None and gate.rollback == "ask" and not dry_run and not wait_for_approval:
        fail(f"policy {fleet.policy_name!r} asks before a rollback (recovery_point.rollback: ask), which is answered "
             "in the Prefect UI: run with --wait-for-approval (a Prefect server: PREFECT_API_URL)")
    with stoppable():  # Ctrl-C: the running batch ends and is recorded, no other starts (exit 3)
        state = patch_run(config_path=str(config), groups=group, hosts=host, policy=policy, dry_run=dry_run,
                          ignore_windows=ignore_windows, reboot_outside_window=reboot_outside_window, approved=yes,
                          forks=forks, refresh=refresh, return_state=True)
    emit(flow_result(state, PatchRunReport, "patch run "), as_json, _render_run)
    exit_as(state)


@patch_app.command("calendar")
def calendar(
    year: Annotated[int, typer.Option("--year", help="Calendar year.")] = datetime.now(timezone.utc).year,
    config: Annotated[Optional[Path], typer.Option(
        "--config", "-c", help="Config whose policy to use (default: built-in policy).")] = None,
    policy: PolicyOption = None,
    group: GroupsOption = None,
    as_json: JsonOption = False,
) -> None:
    """Print the year's months: Patch Tuesday and whether each is a baseline or hotpatch month."""
    from tasks.patching.plan.calendar import year_calendar
    from configs.policies import PatchPolicy
    from tasks.patching.fleet import RunSetupError, resolve_policy

    if not 1 <= year <= 9999:
        fail(f"--year {year} is not a calendar year")
    chosen = PatchPolicy()
    if config is not None:
        try:
            _, chosen = resolve_policy(load_or_exit(config), policy, group)
        except RunSetupError as exc:
            fail(str(exc))
    months = [{"month": m.label, "patch_tuesday": m.patch_tuesday.isoformat(), "kind": m.kind, "unplanned": m.unplanned}
              for m in year_calendar(year, chosen)]

    def render(data: list[dict[str, Any]]) -> None:
        table = Table(title=f"patch calendar {year}")
        for column in ("month", "Patch Tuesday", "kind"):
            table.add_column(column)
        for m in data:
            kind = m["kind"] + (" (unplanned)" if m["unplanned"] else "")
            table.add_row(m["month"], m["patch_tuesday"], f"[bold]{kind}[/]" if m["kind"] == "baseline" else kind)
        console.print(table)

    emit(months, as_json, render)


@patch_app.command("history")
def history_command(
    host: Annotated[str, typer.Argument(help="Host name.")],
    config: ConfigOption = DEFAULT_CONFIG,
    days: Annotated[int, typer.Option("--days", min=1, help="How far back.")] = 30,
    as_json: JsonOption = False,
) -> None:
    """The host's patch runs of the last days (30 by default), newest first."""
    from connectors.stores import StoreError, open_store
    from tasks.patching.history import HistoryError, history
    from tasks.patching.safety.report import unavailability_trend

    loaded = load_or_exit(config)
    if host not in {h.name for h in loaded.config.hosts}:
        fail(f"{config}: no such host: {host}")
    try:
        with open_store(loaded.config.storage, loaded.base_dir) as store:
            records = history(store, host, days=days)
    except (StoreError, HistoryError) as exc:
        fail(str(exc))

    def render(data: list[Any]) -> None:
        table = Table(title=f"{host}: last {days} days")
        # The recovery-point column only for hosts whose policy has the gate: the table stays narrow otherwise.
        gated = any(r.recovery is not None for r in data)
        for column in ("started", "run", "month", "status", "rebooted", "unavailable", "updates",
                       *(["recovery point"] if gated else []), "reason"):
            # The short columns stay whole on a narrow terminal; the long ones wrap.
            table.add_column(column, no_wrap=column in ("run", "month", "status", "rebooted"))
        for r in data:
            recovery = [r.recovery.describe() if r.recovery else ""] if gated else []
            table.add_row(r.started_at.isoformat(timespec="minutes"), r.run_id[:8], r.month_kind, _status(r.status),
                          "yes" if r.rebooted else "no", r.unavailability.text() if r.unavailability else "-",
                          str(len(r.updates)), *recovery, r.reason)
        console.print(table)
        if trend := unavailability_trend(data):
            console.print(trend)

    emit(records, as_json, render)
