"""How `make demo` prints a step, its end and its logs (cli/demo_screen.py, cli/demo.py's footer).

The demo itself runs end to end in tests/e2e/test_demo.py; this covers what one run there
cannot: a step that fails or raises, the UI pages listed when the runs went to a server, and
the log file taking a child process's output.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from cli import demo
from cli.demo_screen import WIDTH, Screen, Step, StepFailed, block
from configs.secrets import remember

REPO = Path(__file__).resolve().parents[2]


def screen() -> Screen:
    return Screen(Console(width=WIDTH, file=io.StringIO(), record=True), live=False)


def text(s: Screen) -> str:
    return s.console.export_text(clear=False)


def test_a_long_line_folds_inside_the_block_and_the_seconds_stay_whole() -> None:
    step = Step("safety net")
    step.passed("x" * 150, "a second line")
    console = Console(width=WIDTH, file=io.StringIO(), record=True)
    console.print(block(step, 123.4))
    lines = console.export_text().splitlines()
    assert lines[0].startswith("✓ safety net  xxx") and lines[0].endswith(" 123 s")
    assert all(len(line) <= WIDTH for line in lines)
    assert "".join(line[14:].strip() for line in lines[:-1]).count("x") == 150
    assert lines[-1][14:].strip() == "a second line"


def test_a_step_that_raises_ends_the_demo_with_its_cross_and_no_secret() -> None:
    s = screen()
    token = remember("s3cr3t-token-for-the-demo")
    with pytest.raises(StepFailed):
        with s.step("backup", "backing up") as step:
            step.passed("first line")
            raise RuntimeError(f"store refused the key {token}")
    out = text(s)
    assert out.startswith("✗ backup") and "RuntimeError: store refused the key ***" in out
    assert token not in out
    assert s.steps[-1].ok is False


def test_a_step_that_reports_a_failure_ends_the_demo_and_one_that_passes_does_not() -> None:
    s = screen()
    with s.step("verify", "reading") as step:
        step.passed("58/58 chunks of 6 points read back, all intact")
    with pytest.raises(StepFailed):
        with s.step("restore", "restoring") as step:
            step.passed("sample restored")
            step.failed("image: .lab/restore/image differs from .lab/disk.img")
    out = text(s).splitlines()
    assert out[0].startswith("✓ verify") and out[1].startswith("✗ restore")
    assert out[2].strip() == "image: .lab/restore/image differs from .lab/disk.img"


def test_the_end_names_the_log_the_report_and_each_runs_ui_page_when_a_server_ran() -> None:
    from prefect.settings import PREFECT_UI_URL, temporary_settings

    s = screen()
    s.steps = [Step("backup", ok=True, run_ids=["0b5e1c1e-0000-4000-8000-000000000001"]),
               Step("drill", ok=True, run_ids=["0b5e1c1e-0000-4000-8000-000000000002"])]
    s.report = demo.REPORTS / "drill-lab-notes-x.html"
    with temporary_settings(updates={PREFECT_UI_URL: "http://127.0.0.1:4200"}):
        demo.footer(s, ok=True, verbose=False, where="lab")
    out = text(s)
    assert "✓ the whole cycle ran" in out
    assert f"report  {demo.shown(s.report)}" in out
    assert "  backup      http://127.0.0.1:4200/runs/flow-run/0b5e1c1e-0000-4000-8000-000000000001" in out
    assert "  drill       http://127.0.0.1:4200/runs/flow-run/0b5e1c1e-0000-4000-8000-000000000002" in out
    quiet = screen()
    quiet.steps = s.steps
    demo.footer(quiet, ok=False, verbose=True, where="temporary")
    assert "the demo stopped at drill" in text(quiet) and "runs in the Prefect UI" not in text(quiet)
    assert "logs    shown above (--verbose)" in text(quiet)


def test_the_log_file_takes_this_process_and_its_children_and_the_screen_stays_clean(tmp_path: Path) -> None:
    log = tmp_path / "logs" / "demo.log"
    script = (f"import logging, subprocess, sys\nfrom pathlib import Path\nfrom cli.demo_screen import send_logs_to\n"
              f"send_logs_to(Path({str(log)!r}))\nprint('on the screen', flush=True)\nlogging.warning('into the log')\n"
              f"subprocess.run(['sh', '-c', 'echo from a child >&2'], check=True)\n")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "on the screen\n" and done.stderr == ""
    assert log.read_text().splitlines() == ["WARNING:root:into the log", "from a child"]
