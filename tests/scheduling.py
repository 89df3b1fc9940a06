"""How `make test` (`--dist loadfile` on two worker processes) hands the suite's files out.

xdist's loadfile keeps each file on one worker and starts the files with the most tests first.
Two things differ here, both only in where and when a file runs:

- The files that drive the session's `make server` stack (tests/hosts/lab_stack.py, `ui_stack`)
  are one work unit, so one worker starts the stack once for all of them instead of each worker
  starting its own (a stack takes half a minute or more to come up). Each of their tests still
  starts its own run on its own host. The test that stops the stack with Ctrl-C is moved after
  every other test, so the stack is up for all the others however the suite is run.
- Work units start longest first: the files measured slowest (`--durations`), then the rest of
  e2e, integration and unit. The short files then fill in at the end on whichever worker is free,
  instead of a long file starting last while the other worker idles. LONGEST_FIRST is a hint: a
  file missing from it, or out of date there, costs time, never a test.
"""

from __future__ import annotations

from typing import Any

import pytest
from xdist.scheduler import LoadFileScheduling

SHARED_STACK = "the make-server stack's files"
SHARED_STACK_FILES = frozenset({"tests/e2e/test_lab_stack.py", "tests/e2e/test_ui_approval.py",
                                "tests/e2e/test_ui_browser.py", "tests/e2e/test_ui_rollback_approval.py"})
STOPS_THE_SHARED_STACK = "tests/e2e/test_lab_stack.py::test_ctrl_c_stops_everything_it_started"
# Slowest first, as measured on two cores; each runs minutes on its own.
LONGEST_FIRST = (SHARED_STACK, "tests/e2e/test_stop_signals.py", "tests/e2e/test_background_server.py",
                 "tests/e2e/test_slot_leases.py", "tests/e2e/test_scale_stack.py", "tests/e2e/test_patch_run.py",
                 "tests/e2e/test_drill_run.py", "tests/e2e/test_patch_safety.py",
                 "tests/integration/test_changed_block_tracking.py")
KINDS = ("tests/e2e/", "tests/integration/")


def rank(unit: str) -> tuple[int, int]:
    if unit in LONGEST_FIRST:
        return 0, LONGEST_FIRST.index(unit)
    return 1, next((n for n, kind in enumerate(KINDS) if unit.startswith(kind)), len(KINDS))


class LongestFirstByFile(LoadFileScheduling):
    def _split_scope(self, nodeid: str) -> str:
        path = super()._split_scope(nodeid)
        return SHARED_STACK if path in SHARED_STACK_FILES else path

    def _assign_work_unit(self, node: Any) -> None:
        # The queue is complete by the first assignment; xdist's own order (most tests first)
        # breaks ties, as the sort is stable.
        if not getattr(self, "_ranked", False):
            ranked = sorted(self.workqueue.items(), key=lambda unit: rank(unit[0]))
            self.workqueue.clear()
            self.workqueue.update(ranked)
            self._ranked = True
        super()._assign_work_unit(node)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # In each worker's collection too: a work unit's tests run in collection order.
    items.sort(key=lambda item: item.nodeid == STOPS_THE_SHARED_STACK)


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> LoadFileScheduling | None:
    return LongestFirstByFile(config, log) if config.getvalue("dist") == "loadfile" else None
