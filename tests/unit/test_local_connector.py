"""The local transport, for real: subprocesses on this machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from configs.models import HostConfig
from connectors import connect, settings_for
from connectors.base import CommandFailed, CommandResult, HostTimeout
from connectors.local import LocalConnector

HOST = HostConfig(name="lab", transport="local")


def test_command_exit_code_and_stderr() -> None:
    conn = connect(HOST)
    assert isinstance(conn, LocalConnector)
    result = conn.run("echo out; echo err >&2; exit 3")
    assert (result.exit_code, result.stdout, result.stderr) == (3, "out\n", "err\n")
    with pytest.raises(CommandFailed) as caught:
        conn.run("echo boom >&2; exit 4", check=True)
    assert caught.value.exit_code == 4 and "boom" in str(caught.value) and "lab" in str(caught.value)


def test_large_and_non_ascii_output_and_env() -> None:
    conn = LocalConnector(settings_for(HOST))
    big = conn.run("head -c 10485760 /dev/zero | tr '\\0' 'x'")
    assert len(big.stdout) == 10 * 1024 * 1024
    assert conn.run("printf 'héllo ✓ 日本'").stdout == "héllo ✓ 日本"
    assert conn.run('printf "$PD_X"', env={"PD_X": "from-env"}).stdout == "from-env"


def test_timeout_raises_host_timeout() -> None:
    with pytest.raises(HostTimeout, match="lab"):
        LocalConnector(settings_for(HOST)).run("sleep 5", timeout=0.3)


def test_put_get_round_trip(tmp_path: Path) -> None:
    conn = LocalConnector(settings_for(HOST))
    src = tmp_path / "src.bin"
    src.write_bytes(bytes(range(256)) * 4096)
    conn.put(src, str(tmp_path / "remote" / "dst.bin"))
    conn.get(str(tmp_path / "remote" / "dst.bin"), tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == src.read_bytes()
    assert not list((tmp_path / "remote").glob(".*partial"))


def test_wait_until_up_returns_boot_identity() -> None:
    identity = LocalConnector(settings_for(HOST)).wait_until_up(5)
    assert identity.boot_id == Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    with pytest.raises(HostTimeout, match="did not reboot"):
        LocalConnector(settings_for(HOST)).wait_until_up(0.5, interval=0.1, not_boot_id=identity.boot_id)


def test_run_script_runs_the_file_or_text_it_is_handed(tmp_path: Path) -> None:
    """No scripts folder behind the transport: a path is read, text is run as it is."""
    script = tmp_path / "args.py"
    script.write_text("import sys\nprint('|'.join(sys.argv[1:]))\n")
    conn = LocalConnector(settings_for(HOST))
    from_file = conn.run_script(script, ["a b", "ü"], check=True)
    from_text = conn.run_script('printf "%s|" "$@"', ["x", "it's"], check=True)
    assert (from_file.stdout, from_file.command) == ("a b|ü\n", "args.py a b ü")
    assert (from_text.stdout, from_text.command) == ("x|it's|", "script x it's")
    with pytest.raises(FileNotFoundError, match="gone.sh"):
        conn.run_script(tmp_path / "gone.sh")


def test_a_result_quotes_the_tail_of_what_the_command_printed() -> None:
    """stderr's last lines, else stdout's (a script that reports errors on stdout), as one line."""
    with connect(HOST) as conn:
        failed = conn.run("for i in 1 2 3 4 5 6 7; do echo \"problem $i\" >&2; done; echo done; exit 3")
        quiet = conn.run("echo 'usage: scan PATH'; echo 'bad path'; exit 2")
        silent = conn.run("exit 1")
    assert failed.tail() == "problem 3 | problem 4 | problem 5 | problem 6 | problem 7"
    assert failed.tail(1) == "problem 7"
    assert quiet.tail() == "usage: scan PATH | bad path"
    assert silent.tail() == ""
    assert CommandResult("h", "c", 1, stdout="out\n", stderr=" \n").tail() == "out"
