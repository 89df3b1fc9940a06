"""`make demo`: the whole maintenance cycle on the embedded lab, in runbook order, in one screen.

The lab (configs/lab.yaml) is this machine as host lab-local with a local store under .lab/.
The demo makes its disks (a sample tree, a disk image, and the notes web application with its
seeded SQLite database), serves notes-app on port 18082 as a service, and gives the host a
sandboxed apt holding notes-app 1.0 with 1.1 waiting as a security update. Then, one block each:

 1. assess: enroll and assess the host (read-only but for its package lists);
 2. plan: the patch run's dry run (batches, update domains, windows, expected reboots);
 3. backup, 4. incremental (after a small change: only it travels), 5. verify, 6. restore;
 7. drill: plan lab-notes restored, started in a network namespace of its own, probed over
    HTTP, by SQL and by checksums, cleaned up with proof, RTO and RPO against their targets;
 8. patch: the recovery-point gate, the notices, the install, the measured unavailability;
 9. safety net: a bad update 1.2, its failed health probe and the rollback that follows.

The flows' logs go to .lab/demo.log (`--verbose` shows them live). The flows are the ones the
deployments schedule; they run on the Prefect server PREFECT_API_URL names or `make server`'s
(the end then lists their pages in the UI), else on Prefect's temporary API, ended with the demo.
"""

from __future__ import annotations

import argparse
import contextlib
import filecmp
import os
import random
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

from rich.console import Console

from cli.api import ApiUnavailable
from cli.demo_patch import HOST, POLICY, NotesService, patch_step, prepare_update, safety_net_step, stamp
from cli.demo_screen import CROSS, TICK, Screen, Step, StepFailed, console_width, plural, send_logs_to, small_table
from flows.logs import configure
from tasks.backup import cancel
from tasks.drill.evidence import DrillEvidence
from tasks.rendering import human_size

REPO = Path(__file__).resolve().parent.parent
LAB_CONFIG = REPO / "configs" / "lab.yaml"
LAB = REPO / ".lab"
LOG_FILE = LAB / "demo.log"
REPORTS = LAB / "reports"
MIB = 1024 * 1024
NOTES_APP = REPO / "examples" / "notes-app"
NOTES_HOME = LAB / "notes-app"
#: The notes the lab's copy of notes-app holds; plan lab-notes in lab.yaml probes for this count.
NOTES_SEEDED = 120
DRILL_PLAN = "lab-notes"
#: Where Prefect's temporary API server keeps its database (read by that server's process).
DATABASE_ENV = "PREFECT_SERVER_DATABASE_CONNECTION_URL"


def make_sample_data(rng: random.Random) -> None:
    """Deterministic data with some repetition, so dedup and compression have work to do."""
    tree = LAB / "sample"
    (tree / "etc").mkdir(parents=True, exist_ok=True)
    (tree / "var" / "data").mkdir(parents=True, exist_ok=True)
    for i in range(20):
        (tree / "etc" / f"app-{i}.conf").write_text(f"# service {i}\nport = {8000 + i}\nworkers = {i % 4 + 1}\n" * 50)
    for i in range(4):
        (tree / "var" / "data" / f"table-{i}.db").write_bytes(rng.randbytes(2 * MIB) + bytes(MIB))
    link = tree / "current.conf"
    if not link.is_symlink():
        link.symlink_to("etc/app-0.conf")
    image = LAB / "disk.img"
    with image.open("wb") as out:
        for block in range(32):
            out.write(bytes(MIB) if block % 4 == 3 else rng.randbytes(MIB))


def install_notes_app(home: Path = NOTES_HOME, notes: int = NOTES_SEEDED) -> None:
    """The application as the lab host runs it: its code beside its data directory, the database
    seeded by the app's own seed.py, so a restored copy can start on its own."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy2(NOTES_APP / "app.py", home / "app.py")
    subprocess.run([sys.executable, str(NOTES_APP / "seed.py"), "--data", str(home / "data"), "--notes", str(notes)],
                   check=True, capture_output=True)


def change_a_little(rng: random.Random) -> None:
    (LAB / "sample" / "etc" / "app-3.conf").write_text("# service 3\nport = 9999\n")
    with (LAB / "disk.img").open("r+b") as image:
        for block in (5, 17):
            image.seek(block * MIB)
            image.write(rng.randbytes(MIB))


def same_tree(left: Path, right: Path) -> bool:
    compare = filecmp.dircmp(left, right)
    if compare.left_only or compare.right_only or compare.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(left, right, compare.common_files, shallow=False)
    return not mismatch and not errors and all(same_tree(left / d, right / d) for d in compare.common_dirs)


def shown(path: Path | str) -> str:
    """A path as short as it stays unambiguous: relative to the working directory when under it."""
    path = Path(path)
    with contextlib.suppress(ValueError):
        return str(path.resolve().relative_to(Path.cwd()))
    return str(path)


def completed(state: Any, step: Step) -> Any:
    """A flow's result when its run completed; else the step's cross with the run's message."""
    step.ran(state.state_details.flow_run_id)
    if not state.is_completed():
        step.failed(f"{state.name}: {state.message or ''}".rstrip(": "))
        return None
    return state.result()


# --------------------------------------------------------------------------- the steps


def lab_step(step: Step) -> None:
    rng = random.Random(20261122)
    make_sample_data(rng)
    install_notes_app()
    step.passed(f"host {HOST} (this machine): 3 disks made in {shown(LAB)}/",
                f"sample: a tree; image: 32 MiB; notes: notes-app, {NOTES_SEEDED} notes",
                "notes-app serves :18082; 1.1 waits in the host's sandboxed apt")


def assess_step(step: Step) -> None:
    from flows.patch import patch_assess

    report = completed(patch_assess(config_path=str(LAB_CONFIG), hosts=[HOST], policy=POLICY, return_state=True), step)
    if report is None:
        return
    if report.errors:
        step.failed(*(f"{host}: {error}" for host, error in report.errors.items()))
        return
    [row] = report.enrollments
    [plan] = report.plans
    missing = ", ".join(f"{u.id} ({u.classification.value})" for u in plan.install) or "none"
    step.passed(f"{HOST}: {row.enrollment.os_name}, {row.enrollment.package_manager}",
                f"missing: {missing}; reboot pending: {'yes' if plan.reboot_pending else 'no'}",
                "read-only: only its package lists were refreshed")


def plan_step(step: Step) -> None:
    from flows.patch import patch_run

    report = completed(patch_run(config_path=str(LAB_CONFIG), hosts=[HOST], policy=POLICY, dry_run=True,
                                 refresh=False, return_state=True), step)
    if report is None:
        return
    plan = report.plan
    if not plan.batches:
        step.failed("nothing scheduled: " + "; ".join(f"{h}: {why}" for h, why in plan.skipped.items()))
        return
    step.passed(f"dry run, policy {POLICY}: {plural(len(plan.scheduled), 'host')} in "
                f"{plural(len(plan.batches), 'batch')}")
    step.passed(*(f"batch {b.index}: update domain {b.update_domain}: {', '.join(b.hosts)}" for b in plan.batches),
                *(f"window {window}" for window in plan.windows.values()),
                f"reboots expected: {', '.join(plan.expected_reboots) or 'none'}; "
                f"stops after {plural(plan.allowed_failures + 1, 'failure')}")


def backup_step(step: Step, title: str) -> list[Any]:
    from flows.backup import backup_run

    reports = completed(backup_run(str(LAB_CONFIG), return_state=True), step)
    if reports is None:
        return []
    bad = [r for r in reports if r.status != "ok"]
    if bad:
        step.failed(*(f"{r.disk}: {r.status} {r.error or ''}" for r in bad))
        return reports
    read, stored = (human_size(sum(getattr(r, f) for r in reports)) for f in ("scanned_bytes", "uploaded_bytes"))
    step.passed(title.format(disks=len(reports)),
                f"{read} read, {stored} stored, {', '.join(sorted({r.consistency or '?' for r in reports}))}")
    return reports


def verify_step(step: Step) -> None:
    from flows.verify import verify_run

    report = completed(verify_run(str(LAB_CONFIG), return_state=True), step)
    if report is None:
        return
    damaged = len(report.missing) + len(report.corrupt)
    line = f"{report.chunks_checked}/{report.chunks_total} chunks of {report.points} points read back"
    (step.failed(f"{line}: {damaged} missing or corrupt") if damaged else step.passed(f"{line}, all intact"))


def restore_step(step: Step) -> None:
    from flows.restore import restore_run

    written, names = 0, []
    for disk, original in (("sample", LAB / "sample"), ("image", LAB / "disk.img")):
        target = LAB / "restore" / disk
        result = completed(restore_run(str(LAB_CONFIG), HOST, disk, str(target), force=True, return_state=True), step)
        if result is None:
            return
        identical = same_tree(original, target) if original.is_dir() else filecmp.cmp(original, target, shallow=False)
        if not identical:
            step.failed(f"{disk}: {shown(target)} differs from {shown(original)}")
            return
        written += result.bytes_written
        names.append(disk)
    step.passed(f"{' and '.join(names)} restored into {shown(LAB / 'restore')}/",
                f"byte-identical to the originals; {human_size(written)} written")


def run_drill(config: Path, reports: Path = REPORTS) -> tuple[Any, DrillEvidence | None, Path | None]:
    """Drill plan lab-notes as `patchdrill drill run` does: the run's state, its evidence and its
    HTML report (None when the run ended before it had evidence)."""
    from flows.drill import drill_run
    from tasks.drill.report import write_html_report

    state = drill_run(config_path=str(config), plan=DRILL_PLAN, operator="demo", manual_confirmed=True,
                      return_state=True)
    evidence = state.result(raise_on_failure=False)
    if not isinstance(evidence, DrillEvidence):
        return state, None, None
    return state, evidence, write_html_report(evidence, reports)


def drill_step(step: Step, config: Path = LAB_CONFIG, reports: Path = REPORTS) -> Path | None:
    """The drill's block: what was restored and where it ran, its probes, RTO/RPO, the cleanup's
    proof and the primary's checksums; returns the HTML report's path."""
    from tasks.drill.report import _duration, targets_met

    state, evidence, report = run_drill(config, reports)
    step.ran(state.state_details.flow_run_id)
    if evidence is None:
        step.failed(f"drill {DRILL_PLAN} {state.name}: {state.message or ''}")
        return None
    points = ", ".join(f"{p.disk}@{stamp(p.point_id)}" for p in evidence.points)
    isolate = next((s for s in evidence.steps if s.name == "isolate"), None)
    namespace = isolate.detail.split(" on ", 1)[0].removeprefix("namespace ") if isolate and isolate.ok else ""
    step.passed(f"plan {evidence.plan}: {points} restored",
                f"started in namespace {namespace}: no route out" if namespace else "started, not isolated")
    last = {p.probe: p for p in evidence.probes if p.phase == "copy"}
    marks = [f"{p.probe.split()[0]} {TICK if p.ok else CROSS}" for p in last.values()]
    step.passed("probes inside it: " + "  ".join(marks))
    for failed in (p for p in last.values() if not p.ok):
        step.failed(f"{failed.probe.split()[0]}: {failed.detail}")
    table = small_table("", "measured", "target", "")
    for name, seconds, target, ok in (("RTO", evidence.rto_seconds, evidence.rto_target_seconds, evidence.rto_ok),
                                      ("RPO", evidence.rpo_seconds, evidence.rpo_target_seconds, evidence.rpo_ok)):
        table.add_row(name, _duration(seconds), _duration(target), TICK if ok else CROSS)
    step.lines.append(table)
    proof = ", ".join(dict.fromkeys(item.kind for item in evidence.cleanup))
    if evidence.cleanup_verified:
        step.passed(f"cleanup: {proof}: each checked gone")
    else:
        step.failed(f"cleanup NOT verified ({proof}): run `patchdrill drill cleanup {evidence.run_id}`")
    untouched = [c.unchanged for c in evidence.primary_checksums]
    if untouched and all(untouched):
        step.passed("primary untouched: checksums equal before and after")
    else:
        step.failed("primary's checksums changed or were not taken")
    if not (state.is_completed() and targets_met(evidence)):
        step.failed(f"drill {evidence.outcome}: {evidence.notes[-1] if evidence.notes else state.message}")
    return report


# --------------------------------------------------------------------------- the run


@contextlib.contextmanager
def prefect_api() -> Iterator[str]:
    """The runs on the server PREFECT_API_URL names or `make server`'s when one runs, else on
    Prefect's temporary API (PATCHDRILL_SERVER=temporary, set by main), with Ctrl-C and SIGTERM
    stopping the step under way. Yields where the runs go (cli/api.py's names)."""
    from cli.api import using_api
    from cli.temporary_server import kill_ephemeral_server

    with using_api() as where, cancel.stop_on_signals(), cancel.on_hard_exit(kill_ephemeral_server):
        yield where


def start_temporary_api() -> threading.Thread:
    """Start Prefect's temporary API server beside the lab step (it takes seconds), instead of
    at the first flow's start. The first step to run a flow joins the thread first, so the wait
    left is its time."""
    import prefect.main  # noqa: F401 - Prefect's logging set up first, so the server's start is logged
    from prefect.server.api.server import SubprocessASGIServer

    starting = threading.Thread(target=SubprocessASGIServer().start, name="temporary-api", daemon=True)
    starting.start()
    return starting


def run_steps(screen: Screen, where: str) -> None:
    """Every step in order; the first cross ends the demo (StepFailed)."""
    with contextlib.ExitStack() as running:
        with screen.step("lab", "making the lab's disks") as step:
            starting = start_temporary_api() if where == "temporary" else None
            lab_step(step)
            service = running.enter_context(NotesService(NOTES_HOME))
            running.enter_context(cancel.on_hard_exit(service.kill))
            prepare_update(service.pidfile)
        with screen.step("assess", "enrolling and assessing lab-local") as step:
            if starting is not None:
                starting.join()
            assess_step(step)
        with screen.step("plan", "the patch run's dry run") as step:
            plan_step(step)
        with screen.step("backup", "backing up three disks") as step:
            backup_step(step, "full: a first recovery point of each of {disks} disks")
        change_a_little(random.Random(20261123))
        with screen.step("incremental", "backing up what changed") as step:
            backup_step(step, "after 1 file and 2 of 32 image blocks changed")
        with screen.step("verify", "reading every chunk back") as step:
            verify_step(step)
        with screen.step("restore", "restoring beside the originals") as step:
            restore_step(step)
        with screen.step("drill", f"drilling plan {DRILL_PLAN}") as step:
            screen.report = drill_step(step)
        with screen.step("patch", f"patching lab-local with policy {POLICY}") as step:
            patch_step(step, LAB_CONFIG)
        with screen.step("safety net", "a bad update, and its rollback") as step:
            safety_net_step(step, LAB_CONFIG, NOTES_HOME)


def footer(screen: Screen, *, ok: bool, verbose: bool, where: str | None) -> None:
    from prefect.utilities.urls import url_for

    console = screen.console
    console.print()
    console.print(f"{TICK} the whole cycle ran" if ok else f"{CROSS} the demo stopped at {screen.steps[-1].name}"
                  if screen.steps else f"{CROSS} the demo did not start", highlight=False)
    screen.print("logs    shown above (--verbose)" if verbose else f"logs    {shown(LOG_FILE)}")
    if screen.report is not None:
        screen.print(f"report  {shown(screen.report)}")
    if where in ("configured", "lab"):
        screen.print("runs in the Prefect UI:")
        for step in screen.steps:
            for run_id in step.run_ids:
                screen.print(f"  {step.name:<11} {url_for('flow-run', obj_id=run_id)}")


def main(argv: Sequence[str] | None = None) -> int:
    from cli.api import MODE_ENV, choose_api

    parser = argparse.ArgumentParser(prog="make demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--verbose", action="store_true", help="show the flows' logs live instead of in the log file")
    args = parser.parse_args(argv)
    console = Console(width=console_width(), highlight=False)
    screen = Screen(console, live=args.verbose)
    console.print(f"[bold]patchdrill demo[/]: the embedded lab {shown(LAB_CONFIG)}, store {shown(LAB / 'store')}/",
                  highlight=False)
    # Never patchdrill's background server: the demo leaves nothing running.
    os.environ[MODE_ENV] = "temporary"
    try:
        where, _ = choose_api()
    except ApiUnavailable as exc:  # a configured server that does not answer: before .lab/ is touched
        screen.print(f"{CROSS} {exc}")
        return 1
    # The demo owns .lab/: start from nothing so every run tells the same story.
    shutil.rmtree(LAB, ignore_errors=True)
    LAB.mkdir(parents=True)
    if where == "temporary":
        # The temporary API's database in .lab/ too: a demo killed part-way leaves no run, and no
        # host slot its lease still holds, for the next demo to find.
        (LAB / "prefect").mkdir()
        os.environ.setdefault(DATABASE_ENV, f"sqlite+aiosqlite:///{LAB / 'prefect' / 'prefect.db'}")
    if not args.verbose:
        send_logs_to(LOG_FILE)
    configure()
    ok = False
    try:
        with prefect_api() as where:
            run_steps(screen, where)
        ok = True
    except StepFailed:
        pass
    footer(screen, ok=ok, verbose=args.verbose, where=where)
    return 0 if ok else cancel.exit_code()


if __name__ == "__main__":
    sys.exit(main())
