"""`make demo`: the main job on the embedded lab config, start to finish, no server needed.

Makes sample data (a directory tree, a disk image, and the notes web application with its
seeded SQLite database) under .lab/, backs them up to the local store, changes a little of the
first two, backs up again (only the changes travel), verifies every chunk and restores the latest
points beside the originals, checking they are byte-identical. Then it drills plan lab-notes:
the application restored, started inside a network namespace of its own, probed over HTTP, by
SQL and by checksums, removed with proof; the RTO/RPO line and the HTML report's path follow.
Last, a patch run with its safety net on the lab host (cli/demo_patch.py): the plan, the
recovery-point gate, the notice hook's lines, the install and the measured unavailability.
Prefect runs in its ephemeral mode: the flows are the same ones a deployment schedules.
"""

from __future__ import annotations

import filecmp
import random
import shutil
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cli.demo_patch import patch_with_safety_net
from configs.loader import load_config
from tasks.drill.evidence import DrillEvidence
from flows.logs import configure
from tasks.inventory import ping_hosts
from tasks.rendering import human_size

REPO = Path(__file__).resolve().parent.parent
LAB_CONFIG = REPO / "configs" / "lab.yaml"
LAB = REPO / ".lab"
MIB = 1024 * 1024
NOTES_APP = REPO / "examples" / "notes-app"
#: The notes the lab's copy of notes-app holds; plan lab-notes in lab.yaml probes for this count.
NOTES_SEEDED = 120
DRILL_PLAN = "lab-notes"
console = Console()


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


def install_notes_app(home: Path = LAB / "notes-app", notes: int = NOTES_SEEDED) -> None:
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


def backup_table(title: str, reports: list) -> Table:  # type: ignore[type-arg]
    table = Table(title=title)
    for column in ("disk", "status", "consistency", "scanned", "changed", "uploaded", "s"):
        table.add_column(column)
    for r in reports:
        table.add_row(r.disk, r.status, r.consistency or "", *(human_size(n) for n in (r.scanned_bytes, r.changed_bytes, r.uploaded_bytes)),
                      f"{r.seconds:.2f}")
    return table


def same_tree(left: Path, right: Path) -> bool:
    compare = filecmp.dircmp(left, right)
    if compare.left_only or compare.right_only or compare.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(left, right, compare.common_files, shallow=False)
    return not mismatch and not errors and all(same_tree(left / d, right / d) for d in compare.common_dirs)


def drill_tables(evidence: DrillEvidence) -> list[Table]:
    """The copy's probes (the last try of each), the cleanup's proof, and the RTO/RPO verdicts."""
    from tasks.drill.report import rpo_line, rto_line

    probes = Table(title=f"drill {evidence.plan}: the restored copy's probes, inside its namespace")
    for column in ("probe", "result", "detail"):
        probes.add_column(column)
    last = {p.probe: p for p in evidence.probes if p.phase == "copy"}
    for record in last.values():
        probes.add_row(record.probe, "[green]pass[/]" if record.ok else "[red]FAIL[/]", record.detail)
    cleanup = Table(title="cleanup, each removal checked")
    for column in ("kind", "item", "verified"):
        cleanup.add_column(column)
    for item in evidence.cleanup:
        cleanup.add_row(item.kind, item.identifier, "[green]yes[/]" if item.verified else "[red]NO[/]")
    targets = Table(title=f"RTO/RPO of plan {evidence.plan}")
    for column in ("objective", "measured against target"):
        targets.add_column(column)
    targets.add_row("RTO", rto_line(evidence))
    targets.add_row("RPO", rpo_line(evidence))
    return [probes, cleanup, targets]


def drill(config: Path, reports: Path = LAB / "reports") -> bool:
    """Drill plan lab-notes as `patchdrill drill run` does; print its evidence and report's path."""
    from flows.drill import drill_run
    from tasks.drill.report import write_html_report

    state = drill_run(config_path=str(config), plan=DRILL_PLAN, operator="demo", manual_confirmed=True, return_state=True)
    evidence = state.result(raise_on_failure=False)
    if not isinstance(evidence, DrillEvidence):
        console.print(f"[red]drill {DRILL_PLAN} {state.name}[/]: {state.message or evidence}", highlight=False)
        return False
    for table in drill_tables(evidence):
        console.print(table)
    console.print(f"drill run {evidence.run_id}; cleanup " + ("[green]verified[/]" if evidence.cleanup_verified
                                else f"[red]NOT verified[/]: run `patchdrill drill cleanup {evidence.run_id}`"), highlight=False)
    color = "green" if state.is_completed() else "red"
    note = evidence.notes[-1] if evidence.notes else ""
    # A passed drill's note says so itself; a failed one's names only the members and what failed.
    console.print(f"[{color}]{note if note.startswith('drill ') else f'drill {evidence.outcome}: {note}'}[/]", highlight=False)
    console.print(f"HTML report: {write_html_report(evidence, reports)}", highlight=False, soft_wrap=True)
    return state.is_completed()


def main() -> int:
    from flows.backup import backup_run
    from flows.restore import restore_run
    from flows.verify import verify_run

    configure()
    loaded = load_config(LAB_CONFIG)
    rows = ping_hosts(loaded.config.hosts, loaded.base_dir)
    for row in rows:
        console.print(f"{row.host}: " + (f"up, {row.os}, boot {row.boot_id}" if row.reachable else f"[red]UNREACHABLE[/] {row.error}"))
    if not all(r.reachable for r in rows):
        return 1

    # The demo owns .lab/: start from nothing so every run tells the same story.
    shutil.rmtree(LAB, ignore_errors=True)
    rng = random.Random(20261122)
    make_sample_data(rng)
    install_notes_app()
    first = backup_run(str(LAB_CONFIG))
    console.print(backup_table("backup 1", first))
    change_a_little(rng)
    second = backup_run(str(LAB_CONFIG))
    console.print(backup_table("backup 2 (after changing one file and two image blocks)", second))
    if any(r.status != "ok" for r in [*first, *second]):
        return 1

    report = verify_run(str(LAB_CONFIG))
    damaged = len(report.missing) + len(report.corrupt)
    console.print(f"verify: {report.chunks_checked}/{report.chunks_total} chunks of {report.points} points read back, "
                  + ("[green]all intact[/]" if not damaged else f"[red]{damaged} missing or corrupt[/]"))
    if damaged:
        return 1

    restored = LAB / "restore"
    ok = True
    for disk, original in (("sample", LAB / "sample"), ("image", LAB / "disk.img")):
        target = restored / disk
        result = restore_run(str(LAB_CONFIG), "lab-local", disk, str(target), force=True)
        identical = same_tree(original, target) if original.is_dir() else filecmp.cmp(original, target, shallow=False)
        ok &= identical
        console.print(f"restore {disk}: {result.point} → {target}: {result.bytes_written / MIB:.1f} MiB written, "
                      + ("[green]byte-identical[/]" if identical else "[red]DIFFERS[/]"))
    ok &= drill(LAB_CONFIG)
    ok &= patch_with_safety_net(LAB_CONFIG, console)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
