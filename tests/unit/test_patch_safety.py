"""The safety net's pure parts: outages from probe observations, clock readings, notice answers."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from configs.patch_safety import ClockCheck, HostCommandNotice
from connectors.base import CommandResult
from tasks.patching.models import Update
from tasks.patching.plan.host import HostPlan
from tasks.patching.safety.clock import ClockUnreadable, after_what, judge, parse_linux_sync, parse_windows_sync
from tasks.patching.safety.notice import _command_answer, expected_reboot, stops
from tasks.patching.safety.records import TimeSync
from tasks.patching.safety.unavailability import Observation, measure

EPOCH = datetime(2026, 12, 2, tzinfo=timezone.utc)


def _measure(observations: list[Observation], interval: float = 1.0):
    return measure(observations, interval=interval, probe="ssh connect", update_domain=2,
                   wall_at=lambda mono: EPOCH + timedelta(seconds=mono))


def _probes(states: str, interval: float = 1.0, took: float = 0.1) -> list[Observation]:
    """One probe per interval; '+' passed, '-' failed."""
    return [Observation(i * interval, i * interval + took, mark == "+", "" if mark == "+" else "refused")
            for i, mark in enumerate(states)]


def test_a_host_that_never_failed_was_unavailable_zero_seconds_to_within_the_interval() -> None:
    measured = _measure(_probes("+++++"))
    assert (measured.seconds, measured.outages, measured.resolution_seconds, measured.probes) == (0.0, [], 1.0, 5)
    assert measured.text() == "0.0 s ±1 s (ssh connect)"


def test_an_outage_runs_from_the_first_failure_seen_to_the_start_of_the_first_pass() -> None:
    measured = _measure(_probes("++---++-+"))
    first, second = measured.outages
    # Failure seen at 2.1 (end of the probe at 2.0); the probe started at 5.0 passed.
    assert first.started_at == EPOCH + timedelta(seconds=2.1) and first.seconds == 5.0 - 2.1 and first.recovered
    assert second.seconds == 8.0 - 7.1 and measured.seconds == first.seconds + second.seconds
    assert measured.update_domain == 2 and measured.resolution_seconds == 1.0


def test_a_host_still_failing_when_probing_ended_is_reported_down() -> None:
    measured = _measure(_probes("+--"))
    [outage] = measured.outages
    assert not outage.recovered and outage.seconds == 2.1 - 1.1 and outage.detail == "refused"
    assert "still down when probing ended" in measured.text()


def test_a_probe_that_outlasted_the_interval_widens_the_stated_resolution() -> None:
    observations = [Observation(0.0, 0.1, True), Observation(1.0, 4.0, False, "timed out"),
                    Observation(4.0, 4.1, False, "refused"), Observation(6.5, 6.6, True)]
    measured = _measure(observations)
    # Edges: 4.0 - 0.1 before the outage, 6.5 - 4.1 after it.
    assert measured.resolution_seconds == 3.9 and measured.seconds == 6.5 - 4.0


# --------------------------------------------------------------------------- the clock


def test_chrony_running_and_synchronised_is_read_from_its_tools() -> None:
    sync = parse_linux_sync("unit.chrony=active\nunit.systemd-timesyncd=inactive\nchrony.leap=Normal\n"
                            "timedatectl.synchronized=yes\n")
    assert (sync.service, sync.active, sync.synchronized) == ("chrony", True, True)


def test_timesyncd_without_chrony_is_judged_by_timedatectl() -> None:
    sync = parse_linux_sync("unit.chrony=inactive\nunit.systemd-timesyncd=active\ntimedatectl.synchronized=no\n")
    assert (sync.service, sync.active, sync.synchronized) == ("systemd-timesyncd", True, False)


def test_a_host_with_no_time_service_says_none_and_unknown() -> None:
    sync = parse_linux_sync("timedatectl.synchronized=\n")
    assert (sync.service, sync.active, sync.synchronized) == ("none", False, None)


def test_w32time_following_a_server_is_synchronised_and_the_cmos_clock_is_not() -> None:
    good = parse_windows_sync('{"service":"w32time","status":"Running","source":"time.windows.com,0x9",'
                              '"last_sync":"12/2/2026 3:04:05 AM"}')
    free = parse_windows_sync('{"service":"w32time","status":"Running","source":"Local CMOS Clock",'
                              '"last_sync":"unspecified"}')
    stopped = parse_windows_sync('{"service":"w32time","status":"Stopped","source":"","last_sync":""}')
    assert (good.active, good.synchronized) == (True, True)
    assert (free.active, free.synchronized) == (True, False)
    assert (stopped.active, stopped.synchronized) == (False, None)
    with pytest.raises(ClockUnreadable, match="not JSON"):
        parse_windows_sync("Get-Service : access denied")


def test_only_a_skew_beyond_the_limit_by_more_than_its_uncertainty_fails() -> None:
    check = ClockCheck(max_skew_seconds=2)
    synced = TimeSync(service="chrony", active=True, synchronized=True)
    assert judge(2.4, 0.5, synced, check) == ""  # could be 1.9 s: not known to be beyond
    assert judge(-2.6, 0.5, synced, check) == ("clock 2.600 s behind the controller's (±0.500 s), "
                                               "beyond the limit of 2 s")
    unsynced = TimeSync(service="none")
    assert judge(0.0, 0.0, unsynced, check) == ""
    assert judge(0.0, 0.0, unsynced, ClockCheck(require_sync=True)) == "time sync required: no time-sync service runs"


def test_the_check_says_what_it_followed() -> None:
    quiet = _measure(_probes("+++"))
    paused = _measure(_probes("+-+"))
    assert [after_what(True, quiet), after_what(False, paused), after_what(False, quiet), after_what(False, None)] == \
        ["reboot", "outage", "install", "install"]


# --------------------------------------------------------------------------- notices


def _answer(exit_code: int, stdout: str = "", stderr: str = ""):
    hook = HostCommandNotice(command="check-batch-jobs")
    result = CommandResult(host="h", command=hook.command, exit_code=exit_code, stdout=stdout, stderr=stderr)
    return _command_answer(hook, "before", EPOCH, result)


def test_a_command_defers_with_its_exit_code_and_says_why_in_its_last_line() -> None:
    deferred = _answer(75, "checking\nexport still running\n")
    assert (deferred.deferred, deferred.failed, deferred.reason) == (True, False, "export still running")
    assert stops(deferred) and _answer(75).reason == "exit code 75"


def test_any_other_failure_stops_the_host_as_a_failed_notice_and_zero_lets_it_go() -> None:
    failed = _answer(2, stderr="no such file")
    assert (failed.deferred, failed.failed, failed.reason) == (False, True, "exited 2: no such file")
    assert stops(failed) and not stops(_answer(0, "noted")) and not stops(None)


def test_the_expected_reboot_follows_the_plan() -> None:
    def plan(**fields: object) -> HostPlan:
        base = {"host": "h", "update_domain": 1, "month_kind": "baseline", "install": [], "held": [],
                "reboot_pending": False, "reboot_allowed_by_calendar": True, "expects_reboot": False,
                "in_window": True, "window": "open"}
        return HostPlan.model_validate({**base, **fields})

    kernel = Update(id="linux-image", reboot_behaviour="may")
    defender = Update(id="KB1", reboot_behaviour="never")
    assert expected_reboot(plan(expects_reboot=True), "IfRequired") == "expected"
    assert expected_reboot(plan(install=[kernel]), "IfRequired") == "possible"
    assert expected_reboot(plan(install=[kernel]), "Never") == "none"
    assert expected_reboot(plan(install=[defender]), "Always") == "none"
    assert expected_reboot(plan(install=[kernel], reboot_allowed_by_calendar=False), "IfRequired") == "none"


def test_config_check_names_the_line_of_a_bad_notice_or_clock(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from cli.app import app

    config = tmp_path / "fleet.yaml"
    config.write_text("storage: {kind: local, path: store}\nhosts:\n  - {name: a, transport: local}\n"
                      "patch_policies:\n  default:\n    notice: {kind: pager, command: x}\n"
                      "    clock: {max_skew_seconds: -1}\n"
                      "    unavailability: {interval_seconds: 0}\n")
    result = CliRunner().invoke(app, ["config", "check", str(config)])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"{config}:6: patch_policies.default.notice: Input tag 'pager'" in result.output
    assert f"{config}:7: patch_policies.default.clock.max_skew_seconds" in result.output
    assert f"{config}:8: patch_policies.default.unavailability.interval_seconds" in result.output
