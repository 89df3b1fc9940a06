"""`patchdrill failover …` and `patchdrill failback`: the real failover of a recovery plan.

They start the same flows a deployment or the UI starts (with no server configured, Prefect's
ephemeral API). Both change production, so each asks first: --yes approves on the command
line; without it the command states what happens (for an unplanned failover, the data it
loses) and asks; --wait-for-approval pauses for approval in the Prefect UI instead.

Exit codes, as `patch run`: 0 the run completed, 1 it failed (also every mistake in the input),
3 it was not approved (Cancelled; nothing changed); stopped by Ctrl-C or SIGTERM, 130 or 143,
as a stopped backup (the evidence says which step the run reached).
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Annotated, Any, Optional

import click
import typer
from rich.table import Table
from typer.core import TyperGroup

from cli.common import (
    DEFAULT_CONFIG, EXIT_CANCELLED, ConfigOption, JsonOption, console, emit, exit_as, fail, flow_result, load_or_exit,
)
from cli.api import using_api
from cli.interrupts import stoppable


#: The hidden command `failover PLAN …` runs: a group cannot take an argument before its
#: subcommands (`failover commit RUN` would read "commit" as the plan).
FAILOVER_COMMAND = "plan"


class _PlanOrVerb(TyperGroup):
    """`failover PLAN --planned` and `failover commit RUN` side by side: a first word that is
    not a subcommand is a plan's name (so no plan can be called `commit` or `cancel`)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            args = [FAILOVER_COMMAND, *args]
        return super().parse_args(ctx, args)


failover_app = typer.Typer(cls=_PlanOrVerb, no_args_is_help=True,
                           help="Fail a recovery plan over to its DR targets (failover PLAN --planned|--unplanned); "
                                "commit or cancel it (failover commit|cancel RUN).")

PolicyOption = Annotated[Optional[str], typer.Option(
    "--policy", help="Backup policy whose repository settings (key, block size) apply (default: the default policy).")]
YesOption = Annotated[bool, typer.Option("--yes", "-y", help="Approve here, without asking.")]
WaitOption = Annotated[bool, typer.Option(
    "--wait-for-approval", help="Pause for approval in the Prefect UI (needs a Prefect server: PREFECT_API_URL).")]


def register(app: typer.Typer) -> None:
    app.add_typer(failover_app, name="failover")
    app.command("failback")(failback)


def _checked_or_exit(config: Any, plan: str, kind: str, yes: bool, wait_for_approval: bool) -> tuple[Any, Any]:
    """The config, the plan and the plan's state (no failover over a failover, no failback
    without a committed one) checked before any flow starts, and before Prefect's ephemeral API
    spends seconds starting: one clear line per problem."""
    from prefect.settings import get_current_settings

    from connectors.stores import StoreError, open_store
    from tasks.drill.failover import FailoverError, check_can_start, load_plan

    if wait_for_approval and yes:
        fail("--yes and --wait-for-approval contradict each other: choose one")
    if wait_for_approval and not get_current_settings().api.url:
        fail("--wait-for-approval needs a Prefect server to approve on: set PREFECT_API_URL")
    loaded = load_or_exit(config)
    try:
        chosen = load_plan(loaded.config, loaded.base_dir, plan, source=str(config))
        with open_store(loaded.config.storage, loaded.base_dir) as store:
            check_can_start(store, plan, kind)
    except (FailoverError, StoreError) as exc:
        fail(str(exc))
    return loaded, chosen


def _ask(question: str) -> None:
    """Ask on the terminal; no (or no answer) ends the command Cancelled, having changed nothing."""
    try:
        answer = typer.confirm(question, default=False)
    except click.Abort:  # end of input: no answer is no
        answer = False
    if not answer:
        console.print("not approved: nothing was changed", highlight=False)
        raise typer.Exit(EXIT_CANCELLED)


def _render(summary: dict[str, Any]) -> None:
    table = Table(title=f"{summary['kind']} {summary['plan']}")
    for column in ("run", "state", "RTO s", "RPO s", "bytes moved", "points"):
        table.add_column(column)
    rto, rpo = summary["rto_seconds"], summary["rpo_seconds"]
    table.add_row(summary["run_id"], summary["state"], "" if rto is None else f"{rto:.1f}",
                  "" if rpo is None else f"{rpo:.1f}", str(summary["bytes_moved"]), "\n".join(summary["points"]))
    console.print(table)
    for note in summary["notes"]:
        console.print(f"- {note}", highlight=False, soft_wrap=True)


def _finish(state: Any, as_json: bool) -> None:
    emit(flow_result(state, dict, ""), as_json, _render)
    if state.is_cancelled():
        from tasks.backup import cancel

        # Stopped by Ctrl-C or SIGTERM: the shell's code for the signal, as a stopped backup exits.
        exit_as(state, cancelled=cancel.exit_code() if cancel.requested() else EXIT_CANCELLED)
    if not state.is_completed():
        console.print(f"[bold red]{state.name}:[/] {state.message}", highlight=False, soft_wrap=True)
    exit_as(state)


@failover_app.command(FAILOVER_COMMAND, hidden=True)
def failover(
    plan: Annotated[str, typer.Argument(help="Recovery plan to fail over.")],
    planned: Annotated[bool, typer.Option("--planned", help="Stop the primary, final backup, zero data loss.")] = False,
    unplanned: Annotated[bool, typer.Option("--unplanned", help="The primary is down: restore from --point.")] = False,
    point: Annotated[Optional[str], typer.Option(
        "--point", help="Unplanned: latest, latest-application-consistent, or before:<ISO time> "
        "(default: each member's own `point` in the plan).")] = None,
    config: ConfigOption = DEFAULT_CONFIG,
    policy: PolicyOption = None,
    yes: YesOption = False,
    wait_for_approval: WaitOption = False,
    as_json: JsonOption = False,
) -> None:
    """Fail PLAN over to its DR targets: --planned or --unplanned. Then `failover commit RUN`
    (or `failover cancel RUN`). Exit 0 failed over, 1 failed, 3 not approved."""
    if planned == unplanned:
        fail("choose exactly one of --planned (the primary is healthy) or --unplanned (the primary is down)")
    if planned and point is not None:
        fail("--point is for --unplanned: a planned failover takes a final backup after stopping the primary")
    from tasks.drill.failover import FailoverError, parse_selector

    try:
        if point is not None:
            parse_selector(point)
    except FailoverError as exc:
        fail(str(exc))
    mode = "planned" if planned else "unplanned"
    loaded, chosen = _checked_or_exit(config, plan, f"{mode}-failover", yes, wait_for_approval)
    if not yes and not wait_for_approval:
        _ask(_question(loaded, plan, chosen, mode, point, policy))
    from flows.failover import failover_run

    with stoppable():
        state = failover_run(config_path=str(config), plan=plan, mode=mode, point=point, policy=policy,
                             approved=not wait_for_approval, return_state=True)
    _finish(state, as_json)


def _question(loaded: Any, name: str, chosen: tuple[Any, Any], mode: str, point: str | None,
              policy: str | None) -> str:
    """What the failover will do, and for an unplanned one the data it loses, before the question."""
    from flows.failover import data_loss_text
    from tasks.backup.errors import BackupError
    from tasks.backup.policy import policy_from_config
    from tasks.backup.disk import open_repository
    from tasks.drill.failover import FailoverError, members_of, unplanned_points

    plan, groups = chosen
    targets = ", ".join(f"{m.primary.name} → {m.target.name}" for m in members_of(groups))
    if mode == "planned":
        console.print(f"Planned failover of {name}: {targets}. The primaries' applications stop, a final "
                      "backup is taken after the stop (no data is lost), the copies start as production.",
                      highlight=False, soft_wrap=True)
    else:
        try:
            repo = open_repository(loaded.config.storage, loaded.base_dir, policy_from_config(
                loaded.config.backup_policies, policy or plan.backup_policy))
            points = unplanned_points(repo, groups, point)
        except (BackupError, FailoverError) as exc:
            fail(str(exc))
        console.print(f"Unplanned failover of {name}: {targets}. The primaries are not touched.",
                      highlight=False, soft_wrap=True)
        console.print(data_loss_text(points, datetime.now(timezone.utc)), highlight=False, soft_wrap=True)
    return f"Fail {name} over ({mode})?"


@failover_app.command("commit")
def commit(
    run: Annotated[str, typer.Argument(help="The failover run (its id, or a unique prefix).")],
    config: ConfigOption = DEFAULT_CONFIG,
    comment: Annotated[str, typer.Option("--comment", help="Recorded in the run's evidence.")] = "",
    as_json: JsonOption = False,
) -> None:
    """Commit a failover: the copies are production from now on (failback brings them home)."""
    from connectors.stores import StoreError
    from flows.failover import failover_commit
    from tasks.drill.failover import FailoverError, evidence_summary

    load_or_exit(config)
    try:
        evidence = failover_commit(str(config), run, comment)
    except (FailoverError, StoreError) as exc:
        fail(str(exc))
    emit(evidence_summary(evidence), as_json, _render)


@failover_app.command("cancel")
def cancel(
    run: Annotated[str, typer.Argument(help="The failover run (its id, or a unique prefix).")],
    config: ConfigOption = DEFAULT_CONFIG,
    yes: YesOption = False,
    as_json: JsonOption = False,
) -> None:
    """Undo an uncommitted failover: stop the copies; after a planned one, restart the primary."""
    load_or_exit(config)
    if not yes:
        _ask(f"Cancel failover {run}: stop its copies (and restart the primary after a planned failover)?")
    from flows.failover import failover_cancel

    with using_api():
        state = failover_cancel(config_path=str(config), run_id=run, return_state=True)
    _finish(state, as_json)


def failback(
    plan: Annotated[str, typer.Argument(help="Recovery plan whose committed failover is brought home.")],
    config: ConfigOption = DEFAULT_CONFIG,
    policy: PolicyOption = None,
    yes: YesOption = False,
    wait_for_approval: WaitOption = False,
    as_json: JsonOption = False,
) -> None:
    """Fail PLAN back: re-protect the copies, stop them, restore onto the primaries (only
    changed blocks travel), start and probe the primaries. Exit 0, 1 failed, 3 not approved."""
    _checked_or_exit(config, plan, "failback", yes, wait_for_approval)
    if not yes and not wait_for_approval:
        _ask(f"Fail {plan} back: the copies stop and their changes are restored onto the primaries?")
    from flows.failover import failback_run

    with stoppable():
        state = failback_run(config_path=str(config), plan=plan, policy=policy, approved=not wait_for_approval,
                             return_state=True)
    _finish(state, as_json)
