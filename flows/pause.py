"""Pausing a flow run for a person's answer (the UI's Resume form), with a deadline the flow
itself keeps.

Prefect's `pause_flow_run(timeout=...)` ends an unanswered pause on the server: its
pause-expiration service fails the run, or the engine's next state proposal is turned into
`Failed("The flow was failed and never resumed.")`. From then on no task of the run may start, so
the flow can neither record why nothing happened nor end with its own message. Here the pause
the server holds outlasts the answer's deadline by PAUSE_GRACE_SECONDS, and at the deadline the
flow takes itself out of the pause (Paused → Running, as a resume does): it gets None and carries
on to record the outcome and choose its final state.

A stop does not wait for the deadline: a signal (Ctrl-C, SIGTERM from a worker) wakes the wait at
once and leaves the pause the same way; a cancellation from the UI or the API (the run is then
Cancelling, or Cancelled) sets the process's stop token (tasks/backup/cancel.py). Either way the
answer is None and `cancel.requested()` says why, so the caller stops as it would on a signal:
a drill cleans up and ends Cancelled.
"""

from __future__ import annotations

import time
from typing import TypeVar

import structlog
from prefect.client.orchestration import get_client
from prefect.context import FlowRunContext
from prefect.input import RunInput, keyset_from_paused_state
from prefect.input.actions import read_flow_run_input
from prefect.states import Paused, Running

from tasks.backup import cancel

log = structlog.stdlib.get_logger("patchdrill.pause")

# How much longer the server's pause lasts than the answer's deadline: the flow must have left
# the pause before the server's expiration service (every 5 s by default) fails it.
PAUSE_GRACE_SECONDS = 120.0

Form = TypeVar("Form", bound=RunInput)


def wait_for_answer(form: type[Form], *, key: str, timeout_seconds: float, poll_seconds: float) -> Form | None:
    """Pause the current flow run with form as its Resume form: the answer submitted within
    timeout_seconds, or None (the run is then Running again). The server validates a submitted
    answer against the form's schema and refuses an invalid one, leaving the run paused."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        raise RuntimeError("only a flow run can pause for an answer")
    run_id = context.flow_run.id
    paused = Paused(timeout_seconds=int(timeout_seconds + PAUSE_GRACE_SECONDS), reschedule=False, pause_key=key)
    keyset = keyset_from_paused_state(paused)
    paused.state_details.run_input_keyset = keyset
    with get_client(sync_client=True) as client:
        result = client.set_flow_run_state(run_id, paused)
        if result.state is not None and result.state.is_running():
            # This pause was answered before (the run is being retried): the same answer holds.
            return form.load(keyset)
        if result.state is None or not result.state.is_paused():
            raise RuntimeError(f"the flow run could not pause: {result.details}")
        form.save(keyset)
        deadline = time.monotonic() + timeout_seconds
        why = f"no answer within {timeout_seconds:g} s"
        while True:
            if cancel.wait(max(0.0, min(poll_seconds, deadline - time.monotonic()))):
                why = f"{cancel.requested()} while it waited for an answer"
                break
            state = client.read_flow_run(run_id).state
            if state is not None and state.is_running():
                return form.load(keyset)
            if state is not None and (state.is_cancelling() or state.is_cancelled()):
                # Cancelled from the UI or the API: only Cancelled may follow, and the run
                # reaches it by itself once its caller has stopped (and cleaned up).
                cancel.request(f"cancelled in Prefect while it waited for an answer ({key})")
                log.info("pause.cancelled", flow_run=str(run_id), key=key)
                return None
            if time.monotonic() >= deadline:
                break
        result = client.set_flow_run_state(run_id, Running(message=why))
    if result.state is None or not result.state.is_running():
        raise RuntimeError(f"the flow run could not leave its pause: {result.details}")
    # A Resume submitted just before our own transition was accepted too: it still counts.
    return form.load(keyset) if read_flow_run_input(keyset["response"], flow_run_id=run_id) is not None else None
