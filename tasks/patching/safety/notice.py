"""Notice before maintenance, as Azure's Scheduled Events give it: a policy's notice hook (a
command on the host, a command on the controller, or a webhook) is told `lead_seconds` before
each host's batch starts, and again once the batch has ended, what to expect.

What a hook gets: the notice as JSON (on standard input for a command, as the body of a
webhook's POST) and, for a command, as PATCHDRILL_NOTICE_* environment variables too:

    PATCHDRILL_NOTICE_PHASE        before | after
    PATCHDRILL_NOTICE_HOST         the host's name
    PATCHDRILL_NOTICE_NOT_BEFORE   before: when the host's batch starts (ISO 8601, UTC)
    PATCHDRILL_NOTICE_REBOOT       expected | possible | none (after: yes | no, what happened)
    PATCHDRILL_NOTICE_WINDOW_END   when the host's maintenance window closes (empty: no window holds it)
    PATCHDRILL_NOTICE_JSON         the whole notice

A hook defers its host by exiting `defer_exit_code` (75 by default; its last line of output is
the reason) or, for a webhook, by answering {"defer": true, "reason": "..."}. A deferred host,
or one whose before-notice failed (nobody can say the workload was told), is skipped with the
reason, untouched; the skip counts against the failure budget as any skipped host does. What
the after-notice answers is recorded and changes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

import structlog
from prefect import task
from pydantic import AwareDatetime, BaseModel

from configs.models import HostConfig
from configs.patch_safety import ControllerCommandNotice, HostCommandNotice, NoticeHook, WebhookNotice
from configs.secrets import SecretError, redact, resolve
from connectors import connect
from connectors.base import CommandResult, ConnectorError, last_lines
from connectors.webhook import WebhookError, post_json_reply
from tasks.patching.install import PatchContext
from tasks.patching.models import HostPatchRecord
from tasks.patching.plan import windows
from tasks.patching.plan.host import HostPlan, record_for_unpatched
from tasks.patching.plan.rollout import Batch
from tasks.patching.report import write_records_task
from tasks.patching.safety.records import NoticeAnswer, NoticePhase

log = structlog.stdlib.get_logger("patchdrill.patch")

Reboot = Literal["expected", "possible", "none", "yes", "no"]


class Notice(BaseModel):
    """What a notice hook is told."""

    event: Literal["patchdrill.maintenance"] = "patchdrill.maintenance"
    phase: NoticePhase
    host: str
    run_id: str
    update_domain: int
    batch: int
    sent_at: AwareDatetime
    not_before: AwareDatetime | None = None
    reboot: Reboot
    window_end: AwareDatetime | None = None
    updates: list[str]
    status: str | None = None

    def environment(self) -> dict[str, str]:
        # Times written exactly as in the JSON, so a hook may read either.
        document = self.model_dump(mode="json")
        return {"PATCHDRILL_NOTICE_PHASE": self.phase, "PATCHDRILL_NOTICE_HOST": self.host,
                "PATCHDRILL_NOTICE_NOT_BEFORE": document["not_before"] or "", "PATCHDRILL_NOTICE_REBOOT": self.reboot,
                "PATCHDRILL_NOTICE_WINDOW_END": document["window_end"] or "",
                "PATCHDRILL_NOTICE_JSON": self.model_dump_json()}


def expected_reboot(plan: HostPlan, policy: str) -> Reboot:
    """expected (the plan knows it reboots), possible (an update may need it and the policy and
    calendar allow it: apt cannot say beforehand) or none."""
    if plan.expects_reboot:
        return "expected"
    may = plan.reboot_pending or any(u.reboot_behaviour != "never" for u in plan.install)
    return "possible" if may and plan.reboot_allowed_by_calendar and policy != "Never" else "none"


def window_end(host: HostConfig, at: datetime) -> datetime | None:
    span = windows.open_span(host, at)
    return span.end if span else None


# --------------------------------------------------------------------------- one hook, one host


def _command_answer(hook: HostCommandNotice | ControllerCommandNotice, phase: NoticePhase, sent: datetime,
                    result: CommandResult) -> NoticeAnswer:
    said = last_lines(result.stdout.strip() or result.stderr.strip(), 1)
    if result.exit_code == hook.defer_exit_code:
        return NoticeAnswer(phase=phase, sent_at=sent, hook=hook.kind, deferred=True,
                            reason=redact(said or f"exit code {hook.defer_exit_code}"))
    if not result.ok:
        return NoticeAnswer(phase=phase, sent_at=sent, hook=hook.kind, failed=True,
                            reason=redact(f"exited {result.exit_code}" + (f": {said}" if said else "")))
    return NoticeAnswer(phase=phase, sent_at=sent, hook=hook.kind, reason=redact(said))


def _on_controller(hook: ControllerCommandNotice, notice: Notice, base_dir: Path) -> CommandResult:
    try:
        done = subprocess.run(hook.command, shell=True, cwd=base_dir, input=notice.model_dump_json().encode(),
                              env={**os.environ, **notice.environment()}, capture_output=True,
                              timeout=hook.timeout_seconds, check=False)
    except subprocess.TimeoutExpired:
        return CommandResult(host="controller", command=hook.command, exit_code=-1, stdout="",
                             stderr=f"no answer within {hook.timeout_seconds:g} s")
    return CommandResult(host="controller", command=hook.command, exit_code=done.returncode,
                         stdout=done.stdout.decode("utf-8", "replace"), stderr=done.stderr.decode("utf-8", "replace"))


def _webhook_answer(hook: WebhookNotice, notice: Notice, base_dir: Path) -> NoticeAnswer:
    sent, phase = notice.sent_at, notice.phase
    try:
        url = resolve(hook.webhook.url, base_dir=base_dir)
        problem = hook.webhook.url_problem(url)
        if problem:
            raise WebhookError(problem)
        _, reply = post_json_reply(url, notice.model_dump(mode="json"), timeout=hook.webhook.timeout_seconds,
                                   attempts=hook.webhook.attempts)
    except (SecretError, WebhookError) as exc:
        return NoticeAnswer(phase=phase, sent_at=sent, hook="webhook", failed=True,
                            reason=redact(f"webhook {hook.webhook.url}: {exc}"))
    if isinstance(reply, dict) and reply.get("defer") is True:
        return NoticeAnswer(phase=phase, sent_at=sent, hook="webhook", deferred=True,
                            reason=redact(str(reply.get("reason") or "the webhook asked to defer")))
    return NoticeAnswer(phase=phase, sent_at=sent, hook="webhook")


def send_notice(hook: NoticeHook, host: HostConfig, base_dir: Path, notice: Notice) -> NoticeAnswer:
    """Tell one host's hook; never raises: a hook that cannot be told answers `failed`."""
    if isinstance(hook, WebhookNotice):
        return _webhook_answer(hook, notice, base_dir)
    if isinstance(hook, ControllerCommandNotice):
        return _command_answer(hook, notice.phase, notice.sent_at, _on_controller(hook, notice, base_dir))
    try:
        with connect(host, base_dir=base_dir) as conn:
            result = conn.run(hook.command, timeout=hook.timeout_seconds, env=notice.environment(),
                              stdin=notice.model_dump_json().encode())
    except ConnectorError as exc:
        return NoticeAnswer(phase=notice.phase, sent_at=notice.sent_at, hook="host", failed=True,
                            reason=redact(exc.message))
    return _command_answer(hook, notice.phase, notice.sent_at, result)


@task(name="notice", task_run_name="notice {notice.phase} {host.name}")
def notice_task(hook: NoticeHook, host: HostConfig, base_dir: Path, notice: Notice) -> NoticeAnswer:
    answer = send_notice(hook, host, base_dir, notice)
    event = log.warning if answer.failed or answer.deferred else log.info
    event("notice sent", host=host.name, phase=notice.phase, hook=hook.kind, deferred=answer.deferred,
          failed=answer.failed, reason=answer.reason or None)
    return answer


# --------------------------------------------------------------------------- a batch


def announce(ctx: PatchContext, batch: Batch, hosts: dict[str, HostConfig],
             plans: dict[str, HostPlan]) -> dict[str, NoticeAnswer]:
    """Send every host of the batch its before-notice and wait until the batch may start
    (`lead_seconds` after sending); the hosts' answers by name (none without a hook)."""
    hook = ctx.policy.notice
    if hook is None:
        return {}
    sent = datetime.now(timezone.utc)
    not_before = sent + timedelta(seconds=hook.lead_seconds)
    futures = {name: notice_task.submit(hook, hosts[name], ctx.base_dir, Notice(
        phase="before", host=name, run_id=ctx.run_id, update_domain=batch.update_domain, batch=batch.index,
        sent_at=sent, not_before=not_before, reboot=expected_reboot(plans[name], ctx.policy.reboot),
        window_end=window_end(hosts[name], not_before), updates=[u.id for u in plans[name].install]))
        for name in batch.hosts}
    answers = {name: future.result() for name, future in futures.items()}
    if any(not stops(answer) for answer in answers.values()):
        time.sleep(max(0.0, (not_before - datetime.now(timezone.utc)).total_seconds()))
    return answers


def stops(answer: NoticeAnswer | None) -> bool:
    """Whether a before-notice's answer keeps its host out of the batch."""
    return answer is not None and (answer.deferred or answer.failed)


def held_back(ctx: PatchContext, answers: dict[str, NoticeAnswer], plans: dict[str, HostPlan]) -> list[HostPatchRecord]:
    """The records of hosts whose before-notice kept them out: skipped, with the hook's reason."""
    now = datetime.now(timezone.utc)
    records = []
    for name, answer in answers.items():
        if stops(answer):
            why = (f"deferred by the notice hook: {answer.reason}" if answer.deferred
                   else f"notice hook failed, so the host was not told: {answer.reason}")
            record = record_for_unpatched(ctx.run_id, name, now, plans[name], "skipped", why)
            records.append(record.model_copy(update={"notices": [answer]}))
    return records


def conclude(ctx: PatchContext, batch: Batch, hosts: dict[str, HostConfig], answers: dict[str, NoticeAnswer],
             records: list[HostPatchRecord]) -> list[HostPatchRecord]:
    """Send the patched hosts their after-notice, keep every answer in the records and the
    history (the patched hosts' records are written again with them)."""
    hook = ctx.policy.notice
    if hook is None:
        return records
    sent = datetime.now(timezone.utc)
    futures = {r.host: notice_task.submit(hook, hosts[r.host], ctx.base_dir, Notice(
        phase="after", host=r.host, run_id=ctx.run_id, update_domain=batch.update_domain, batch=batch.index,
        sent_at=sent, reboot="yes" if r.rebooted else "no", window_end=window_end(hosts[r.host], sent),
        updates=[o.update_id for o in r.updates], status=r.status))
        for r in records if not stops(answers.get(r.host))}
    after = {name: future.result() for name, future in futures.items()}
    told = [r if stops(answers.get(r.host)) else r.model_copy(update={
        "notices": [answers[r.host], after[r.host]] if r.host in answers else [after[r.host]]}) for r in records]
    write_records_task(ctx.records, told, len(told))
    return told


__all__ = ["Notice", "announce", "conclude", "expected_reboot", "held_back", "notice_task", "send_notice", "stops"]
