"""What `make demo` prints: one short block per step in at most 80 columns, the logs in a file.

A block is a tick or a cross, the step's name, what ran and the figure that matters, and the
step's seconds at the right; a step may add a small table under its lines. The flows' own log
lines (structlog events, Prefect's run and task lines, the temporary API server's output) go
to the log file instead of the terminal: standard error is pointed at it for the whole demo, so
the child processes the demo starts write there too. `--verbose` leaves standard error where it
was, and the logs interleave with the blocks as they happen.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from rich.console import Console, RenderableType
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table

from configs.secrets import redact
from tasks.backup import cancel

#: The widest the demo prints, so its screen reads the same on any terminal of 80 columns or more.
WIDTH = 80
NAME_WIDTH = 11
SECONDS_WIDTH = 8
TICK = "[green]✓[/]"
CROSS = "[red]✗[/]"

log = logging.getLogger("patchdrill.demo")


class StepFailed(Exception):
    """A step ended with a cross: the demo stops there (later steps build on it)."""


@dataclass
class Step:
    """What a step found: its verdict and the lines (or tables) under its name."""

    name: str
    ok: bool | None = None
    lines: list[RenderableType] = field(default_factory=list)
    run_ids: list[str] = field(default_factory=list)

    def passed(self, *lines: RenderableType) -> None:
        self.ok = True if self.ok is None else self.ok
        self.lines.extend(lines)

    def failed(self, *lines: RenderableType) -> None:
        self.ok = False
        self.lines.extend(lines)

    def ran(self, flow_run_id: object) -> None:
        """Remember a flow run this step made, for its page in the Prefect UI."""
        if flow_run_id is not None:
            self.run_ids.append(str(flow_run_id))


def console_width() -> int:
    return min(WIDTH, shutil.get_terminal_size((WIDTH, 24)).columns)


def send_logs_to(path: Path) -> None:
    """Standard error, at the descriptor, into `path` from now until the process ends: this
    process's logging, every child process started after it (Prefect's temporary server) and
    what Prefect writes at exit (the server's stop, its workers' last flush) write there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.flush()
    with path.open("ab") as sink:
        os.dup2(sink.fileno(), 2)


class Screen:
    """Prints each step's block when the step ends; keeps what the end of the demo names."""

    def __init__(self, console: Console, *, live: bool) -> None:
        self.console = console
        self.live = live
        self.steps: list[Step] = []
        #: the drill's HTML report, once written
        self.report: Path | None = None

    @contextlib.contextmanager
    def step(self, name: str, doing: str) -> Iterator[Step]:
        """Run one step: a spinner says what it does meanwhile (on a terminal, logs not live);
        any error, a stop by signal included, becomes the step's cross and stops the demo."""
        step = Step(name)
        self.steps.append(step)
        started = time.monotonic()
        # rich's own status() would redirect standard error onto the screen while it spins,
        # and with it every log line that belongs in the log file.
        status = Live(Spinner("dots", text=_Doing(name, doing), style="green"), console=self.console, transient=True,
                      redirect_stdout=False, redirect_stderr=False, refresh_per_second=12.5) \
            if self.console.is_terminal and not self.live else contextlib.nullcontext()
        try:
            with status:
                yield step
                if cancel.requested() and step.ok is not False:
                    step.failed(f"stopped: {cancel.requested()}")
        except Exception as exc:  # noqa: BLE001 - shown as the step's cross; the traceback is in the log
            log.exception("demo step %s failed", name)
            step.failed(f"{type(exc).__name__}: {redact(str(exc))}")
        finally:
            self.console.print(block(step, time.monotonic() - started))
        if not step.ok:
            raise StepFailed(name)

    def print(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)


class _Doing:
    """The spinner's text: what the step does, or, once Ctrl-C asked for a stop (whose own
    notice went to the log file), that the demo stops when the step has stopped."""

    def __init__(self, name: str, doing: str) -> None:
        self.name, self.doing = name, doing

    def __rich__(self) -> str:
        if cancel.requested():
            return f"[yellow]{self.name}: stopping (Ctrl-C again exits at once, leaving what it ran)[/]"
        return f"{self.name}: {self.doing}"


def block(step: Step, seconds: float) -> Table:
    """A step's lines beside its mark and name, its seconds at the right end of the first line."""
    grid = Table.grid(padding=(0, 1), expand=True)
    grid.add_column(width=1, no_wrap=True)
    grid.add_column(width=NAME_WIDTH, no_wrap=True)
    grid.add_column(ratio=1, overflow="fold")
    lines = step.lines or [""]
    headline = Table.grid(expand=True, padding=(0, 0, 0, 1))
    headline.add_column(ratio=1, overflow="fold")
    headline.add_column(width=SECONDS_WIDTH, justify="right", no_wrap=True)
    headline.add_row(lines[0], f"[dim]{seconds:.{1 if seconds < 100 else 0}f} s[/]")
    grid.add_row(TICK if step.ok else CROSS, f"[bold]{step.name}[/]", headline)
    for line in lines[1:]:
        grid.add_row("", "", line)
    return grid


def plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "es" if noun.endswith(("s", "ch")) else "s")


def small_table(*columns: str) -> Table:
    """A table to sit under a step's lines: square corners, no title, header in plain text."""
    from rich import box

    table = Table(box=box.SQUARE, show_edge=True, pad_edge=True, header_style="")
    for column in columns:
        table.add_column(column, no_wrap=True)
    return table


__all__ = ["CROSS", "Screen", "Step", "StepFailed", "TICK", "WIDTH", "block", "console_width", "plural", "send_logs_to",
           "small_table"]
