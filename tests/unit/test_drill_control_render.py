"""Rendering of drill start/stop steps for every preset, with hostile names.

The rendered commands are executed where a real part exists here: every sh command is run by a
real /bin/sh with the commands it calls replaced by `printf` stubs on PATH, so a quoting
mistake shows as an extra argument or a command that ran. systemd, Hyper-V, libvirt and
Windows services cannot run on this machine: their commands are checked as rendered text, and
the PowerShell ones are parsed by tree-sitter-powershell.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from tasks.drill.control import (
    ControlSpec,
    CopyContext,
    TemplateError,
    check_preset,
    fill,
    render,
    state_paths,
    unit_name,
    unit_stopped_check,
)
from tasks.drill.isolation import namespace_name
from tests.unit.test_powershell_parses import syntax_problems

HOSTILE = "x'; touch /tmp/pwned-$(id -u) #\"`\u2019 $HOME"
RUN = "run-0123"


def context(**overrides: object) -> CopyContext:
    values: dict[str, object] = {"member": "web", "root": "/srv/drill/web copy", "port": 8080,
                                 "namespace": "pd-web-0011223344", "disks": {"data": "/srv/drill/web copy/data.img"}}
    return CopyContext(**{**values, **overrides})  # type: ignore[arg-type]


def argv_of(command: str, tmp_path: Path, stubs: tuple[str, ...]) -> list[list[str]]:
    """Run `command` in a real sh with each stub printing its argv (one NUL-separated line per call)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    log = tmp_path / "calls"
    for stub in stubs:
        script = bin_dir / stub
        script.write_text(f'#!/bin/sh\nprintf "%s\\0" "{stub}" "$@" >> {shlex.quote(str(log))}\nprintf "\\n" >> {shlex.quote(str(log))}\n')
        script.chmod(0o755)
    subprocess.run(["sh", "-c", command], env={**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}, check=False,
                   capture_output=True)
    if not log.exists():
        return []
    return [line.strip("\0").split("\0") for line in log.read_text().splitlines() if line]


def test_fill_quotes_each_value_and_keeps_literal_braces() -> None:
    ctx = context(root=HOSTILE)
    filled = fill("cd {root} && echo {{literal}} {port}", ctx, shlex.quote)
    assert filled == f"cd {shlex.quote(HOSTILE)} && echo {{literal}} 8080"


@pytest.mark.parametrize(("template", "message"), [
    ("run {nope}", "unknown placeholder {nope}"),
    ("run {disk:logs}", "restored disks are: data"),
    ("run {root", "unbalanced '{'"),
    ("run {port}", "has no port"),
])
def test_bad_templates_name_the_member_and_placeholder(template: str, message: str) -> None:
    ctx = context(port=None) if "port" in template else context()
    with pytest.raises(TemplateError, match="member 'web'") as caught:
        fill(template, ctx)
    assert message in str(caught.value)


def test_process_preset_renders_the_command_with_quoted_disk_and_root(tmp_path: Path) -> None:
    rendered = render(ControlSpec("process", "app --data {disk:data} --root {root} --port {port}"),
                      context(root=HOSTILE, disks={"data": HOSTILE + "/d"}), run_id=RUN)
    assert argv_of(rendered.start, tmp_path, ("app",)) == [
        ["app", "--data", HOSTILE + "/d", "--root", HOSTILE, "--port", "8080"]]
    assert not Path(f"/tmp/pwned-{os.getuid()}").exists()
    pidfile, logfile = state_paths(context(root="/srv/c", name="../../etc/x y"))
    assert pidfile.startswith("/srv/c/.patchdrill/") and ".." not in pidfile and " " not in pidfile
    assert logfile.endswith(".log")


def test_systemd_preset_joins_the_namespace_and_stops_by_unit(tmp_path: Path) -> None:
    """systemd cannot run here (no systemd as PID 1): the rendered systemd-run line is executed
    against a stub that records its argv, and the unit name is derived, never the member's."""
    ctx = context(member=HOSTILE, root=HOSTILE)
    rendered = render(ControlSpec("systemd", "app --root {root}"), ctx, run_id=RUN)
    unit = unit_name(RUN, HOSTILE)
    assert unit == f"{namespace_name(RUN, HOSTILE)}.service"
    [call] = argv_of(rendered.start, tmp_path, ("systemd-run",))
    assert call[:6] == ["systemd-run", f"--unit={unit}", "--collect", "--quiet", "--service-type=exec",
                        f"--working-directory={HOSTILE}"]
    assert call[6] == "--property=NetworkNamespacePath=/run/netns/pd-web-0011223344"
    assert call[7:10] == ["--", "/bin/sh", "-c"]
    assert shlex.split(call[10]) == ["exec", "app", "--root", HOSTILE]
    (tmp_path / "stop").mkdir()
    assert argv_of(rendered.stop, tmp_path / "stop", ("systemctl",)) == [["systemctl", "stop", unit]]
    assert rendered.stop == f"systemctl stop {unit}"
    assert rendered.verify == unit_stopped_check(unit)
    unisolated = render(ControlSpec("systemd", "app"), context(namespace=None), run_id=RUN)
    assert "NetworkNamespacePath" not in unisolated.start


def test_libvirt_preset_quotes_the_domain(tmp_path: Path) -> None:
    """No libvirt here: the virsh lines run against a stub that records its argv."""
    rendered = render(ControlSpec("libvirt", "{name}-dr"), context(name=HOSTILE), run_id=RUN)
    assert argv_of(rendered.start, tmp_path, ("virsh",)) == [["virsh", "start", f"{HOSTILE}-dr"]]
    assert argv_of(rendered.stop, tmp_path, ("virsh",))[-1] == ["virsh", "destroy", f"{HOSTILE}-dr"]
    assert rendered.verify is not None and "domstate" in rendered.verify
    assert not Path(f"/tmp/pwned-{os.getuid()}").exists()


@pytest.mark.parametrize(("preset", "start", "stop"), [
    ("windows-service", "Start-Service -Name ", "Stop-Service -Name "),
    ("hyperv", "Start-VM -Name ", "Stop-VM -Name "),
])
def test_windows_presets_quote_names_for_powershell(preset: str, start: str, stop: str) -> None:
    """No Windows here: the commands are checked as text and parsed by tree-sitter-powershell,
    with a name carrying every kind of quote PowerShell knows."""
    rendered = render(ControlSpec(preset, "{name}"), context(name=HOSTILE), run_id=RUN)  # type: ignore[arg-type]
    quoted = "'" + HOSTILE.replace("'", "''").replace("\u2019", "\u2019\u2019") + "'"
    assert rendered.shell == "powershell"
    assert rendered.start == start + quoted
    assert rendered.stop.startswith(stop + quoted)
    for command in (rendered.start, rendered.stop, rendered.verify or ""):
        assert syntax_problems(command) == [], command
    assert rendered.verify is not None and quoted in rendered.verify


def test_command_preset_fills_start_stop_and_verify(tmp_path: Path) -> None:
    rendered = render(ControlSpec("command", "app start {root}", stop="app stop {port}", verify="app status {name}"),
                      context(root=HOSTILE, name="n m"), run_id=RUN)
    assert argv_of(rendered.start, tmp_path, ("app",)) == [["app", "start", HOSTILE]]
    assert shlex.split(rendered.stop) == ["app", "stop", "8080"]
    assert shlex.split(rendered.verify or "") == ["app", "status", "n m"]


@pytest.mark.parametrize(("spec", "message"), [
    (ControlSpec("command", "app start"), "needs a stop command"),
    (ControlSpec("process"), "needs a command template"),
    (ControlSpec("nonsense", "x"), "unknown start/stop preset"),  # type: ignore[arg-type]
])
def test_incomplete_specs_are_refused(spec: ControlSpec, message: str) -> None:
    with pytest.raises(TemplateError, match=message):
        render(spec, context(), run_id=RUN)


def test_namespace_names_are_short_valid_and_unique() -> None:
    names = {namespace_name(run, member) for run in ("a", "b", "a" * 80) for member in ("web", "db", HOSTILE, "")}
    assert len(names) == 12
    for name in names:
        assert len(name) <= 24 and name.startswith("pd-")
        assert all(ch.isalnum() or ch == "-" for ch in name) and name == name.lower()
    assert namespace_name("a", "web") == namespace_name("a", "web")


@pytest.mark.parametrize(("state", "stopped"), [("inactive", True), ("failed", True), ("active", False),
                                                ("deactivating", False), ("", False)])
def test_the_unit_check_passes_only_for_a_stopped_unit(tmp_path: Path, state: str, stopped: bool) -> None:
    """No systemd here: `systemctl` is a stub printing the ActiveState it is given; an empty
    answer stands for a host where systemctl could not tell (no systemd running)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "systemctl").write_text(f"#!/bin/sh\nprintf '%s\\n' {shlex.quote(state)}\n")
    (bin_dir / "systemctl").chmod(0o755)
    done = subprocess.run(["sh", "-c", unit_stopped_check("pd-web-01.service")],
                          env={**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}, check=False)
    assert (done.returncode == 0) is stopped


@pytest.mark.parametrize(("preset", "os_family", "needs"), [
    ("process", "windows", "Linux"), ("systemd", "windows", "Linux"), ("libvirt", "windows", "Linux"),
    ("windows-service", "linux", "Windows"), ("hyperv", "linux", "Windows"),
])
def test_a_preset_on_the_wrong_os_is_one_line_naming_the_member(preset: str, os_family: str, needs: str) -> None:
    with pytest.raises(TemplateError) as caught:
        check_preset(preset, member="sql-01", host="dr-9", os_family=os_family)
    assert str(caught.value) == (f"member 'sql-01': start/stop preset {preset!r} needs a {needs} target; "
                                 f"dr-9 is a {os_family.capitalize()} host")


def test_the_command_preset_runs_on_either_os() -> None:
    for os_family in ("linux", "windows"):
        check_preset("command", member="m", host="h", os_family=os_family)
