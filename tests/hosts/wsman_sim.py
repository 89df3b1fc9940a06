"""The simulated Windows behind the WS-Management test host.

There is no Windows and no PowerShell here (Debian ships no `pwsh`), so what a command would
do on Windows is simulated, and only that:

* `powershell … -EncodedCommand <base64 UTF-16LE>` is decoded to the script text, as
  powershell.exe does. Leading statements that only set up the session (`[Console]::
  OutputEncoding = <a UTF-8 encoding>`, `$OutputEncoding = …`, `$ProgressPreference = '…'`,
  `$ErrorActionPreference = '…'`, `$env:NAME = '…'`) are interpreted; `& { <script> } -Name
  'value' …` is split into the script and its arguments.
* The script then goes to the **handlers**, in list order (first the session handlers, which
  also see the session's `$env:` variables and standard input); the first that returns a
  `SimResult` answers the command. Handlers stand in for Windows itself: built-in ones answer
  the WinRM connector's own boot-identity and file-transfer scripts; tests add more (a
  simulated Windows Update, VSS) with `script_handler` or any `Handler` callable.
* A command line that does not start PowerShell (what cmd.exe would run) goes to the same
  handlers and fallback as a script with no arguments; lines over cmd.exe's 8191 characters
  fail as they do on Windows.
* The connector's long-script loader (connectors/winrm_scripts/stdin_script.ps1, which reads the real
  script from standard input) is interpreted by the runtime itself, before the handlers.
* A script no handler claims runs with `pwsh` when one is installed; otherwise, if
  `shell_fallback` is on, its text runs with `sh -c`. That fallback exists **only** for tests
  that deliberately send plain shell (`sleep 5`, `head -c …`) to exercise the transport: no
  shipped .ps1 is ever run by sh. With the fallback off, an unclaimed script fails with a
  PowerShell-style error naming it, which shows which scripts still lack a simulation.
* Output is re-encoded the way the console would: UTF-8 when the script set
  `[Console]::OutputEncoding` to UTF-8 or the shell's code page is 65001, the shell's code page
  otherwise. Errors (`SimResult.errors`, exceptions raised by handlers) reach stderr as CLIXML
  error records, as powershell.exe writes them when its streams are redirected.
"""

from __future__ import annotations

import base64
import codecs
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path, PureWindowsPath
from typing import Callable
from xml.sax.saxutils import escape

from connectors import winrm


@dataclass
class SimResult:
    """What a simulated command printed and how it exited."""

    stdout: str | bytes = ""
    stderr: str | bytes = ""
    #: PowerShell error records, written to stderr as CLIXML (one record per message)
    errors: list[str] = field(default_factory=list)
    exit_code: int = 0


#: (script text without session preamble, its arguments) -> a result, or None if not this handler's script.
#: Arguments keep PowerShell's tokens: bare `-Name` parameter names and unquoted values.
Handler = Callable[[str, list[str]], "SimResult | None"]


@dataclass
class Invocation:
    """One command as a session handler sees it: besides the script and its arguments, the
    session's environment (`$env:` lines of the preamble) and its standard input."""

    script: str
    args: list[str]
    env: dict[str, str]
    streams: "CommandStreams"

    def stdin(self) -> bytes:
        """All of standard input, once the client has ended it."""
        data = bytearray()
        while chunk := self.streams.read_stdin_chunk():
            data += chunk
        return bytes(data)


#: A handler that needs the command's environment or standard input (a user's hook command).
SessionHandler = Callable[[Invocation], "SimResult | None"]


def named_args(args: list[str]) -> dict[str, str]:
    """`['-Path', 'C:\\x', '-Force']` -> `{'Path': 'C:\\x', 'Force': 'true'}` (a switch has no value)."""
    named: dict[str, str] = {}
    index = 0
    while index < len(args):
        token = args[index]
        if not token.startswith("-") or len(token) < 2:
            raise ValueError(f"positional argument {token!r} where a -Name was expected")
        nxt = args[index + 1] if index + 1 < len(args) else None
        if nxt is None or (nxt.startswith("-") and re.fullmatch(r"-[A-Za-z]\w*", nxt)):
            named[token[1:]] = "true"
            index += 1
        else:
            named[token[1:]] = nxt
            index += 2
    return named


def script_handler(script: Path, respond: Callable[[dict[str, str]], SimResult]) -> Handler:
    """A handler answering the shipped script at `script` (matched on its exact text);
    `respond` gets the script's named arguments."""
    expected = script.read_text(encoding="utf-8").strip()

    def handler(script: str, args: list[str]) -> SimResult | None:
        if script.strip() != expected:
            return None
        return respond(named_args(args))

    handler.__name__ = f"simulate_{script.stem}"
    return handler


class CommandStreams:
    """stdin, stdout, stderr and the exit of one running command, shared by the WS-Man server
    (Send fills stdin, Receive drains output) and the simulation (which runs the command)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._stdin = bytearray()
        self._stdin_closed = False
        self._out = bytearray()
        self._err = bytearray()
        self.exit_code: int | None = None
        self.terminated = False
        self._on_terminate: list[Callable[[], None]] = []

    # stdin ---------------------------------------------------------------------------------
    def feed_stdin(self, data: bytes, end: bool) -> None:
        with self._cond:
            self._stdin += data
            self._stdin_closed = self._stdin_closed or end
            self._cond.notify_all()

    def read_stdin(self, size: int) -> bytes:
        """Up to `size` bytes, waiting for them; fewer only at end of input."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._stdin) >= size or self._stdin_closed or self._finished)
            data = bytes(self._stdin[:size])
            del self._stdin[:size]
            return data

    def read_stdin_chunk(self) -> bytes:
        """Whatever stdin holds, waiting for some; b'' at end of input."""
        with self._cond:
            self._cond.wait_for(lambda: self._stdin or self._stdin_closed or self._finished)
            data = bytes(self._stdin)
            self._stdin.clear()
            return data

    # output --------------------------------------------------------------------------------
    def write(self, stream: str, data: bytes) -> None:
        if not data:
            return
        with self._cond:
            if self.terminated:
                return
            (self._out if stream == "stdout" else self._err).extend(data)
            self._cond.notify_all()

    def finish(self, exit_code: int) -> None:
        with self._cond:
            self.exit_code = exit_code
            self._cond.notify_all()

    @property
    def _finished(self) -> bool:
        return self.exit_code is not None or self.terminated

    def take(self, limit: int, wait: float) -> tuple[bytes, bytes, int | None] | None:
        """Drain up to `limit` bytes of output, waiting up to `wait` seconds for any.

        Returns (stdout, stderr, exit code once everything was drained), or None when nothing
        happened in time: the server turns that into the OperationTimeout fault.
        """
        with self._cond:
            if not self._cond.wait_for(lambda: self._out or self._err or self._finished, timeout=wait):
                return None
            out = bytes(self._out[:limit])
            del self._out[: len(out)]
            err = bytes(self._err[: limit - len(out)])
            del self._err[: len(err)]
            drained = not self._out and not self._err
            return out, err, (self.exit_code if drained and self.exit_code is not None else None)

    def terminate(self) -> None:
        with self._cond:
            if self._finished:
                self.terminated = True
                return
            self.terminated = True
            callbacks = list(self._on_terminate)
            self._cond.notify_all()
        for callback in callbacks:
            callback()

    def on_terminate(self, callback: Callable[[], None]) -> None:
        with self._cond:
            self._on_terminate.append(callback)


# CLIXML -------------------------------------------------------------------------------------

_PROGRESS_RECORD = (
    '<Obj S="progress" RefId="0"><TN RefId="0"><T>System.Management.Automation.PSCustomObject</T>'
    "<T>System.Object</T></TN><MS><I64 N=\"SourceId\">1</I64><PR N=\"Record\"><AV>Preparing modules for "
    "first use.</AV><AI>0</AI><Nil /><PI>-1</PI><PC>-1</PC><T>Completed</T><SR>-1</SR><SD> </SD></PR></MS></Obj>"
)


def _clixml_escape(text: str) -> str:
    # PowerShell's serializer writes '_x' literally as _x005F_x and control characters as _xHHHH_.
    text = text.replace("_x", "_x005F_x")
    return re.sub(r"[\x00-\x1f]", lambda m: f"_x{ord(m.group()):04X}_", text)


def clixml(errors: list[str]) -> str:
    """Error records as powershell.exe writes them to a redirected stderr."""
    records = [
        f'<S S="Error">{escape(_clixml_escape(line + chr(13) + chr(10)))}</S>'
        for message in errors
        for line in (message.splitlines() or [""])
    ]
    return (
        "#< CLIXML\r\n"
        '<Objs Version="1.1.0.1" xmlns="http://schemas.microsoft.com/powershell/2004/04">'
        + _PROGRESS_RECORD + "".join(records) + "</Objs>"
    )


# Parsing what powershell.exe would parse ----------------------------------------------------

_POWERSHELL_EXES = {"powershell", "powershell.exe", "pwsh", "pwsh.exe"}


def decode_powershell_command(command_line: str) -> str | None:
    """The script of a `powershell … -EncodedCommand X` (or `-Command …`) line; None if the
    line does not start PowerShell."""
    tokens = command_line.split()
    if not tokens or PureWindowsPath(tokens[0]).name.lower() not in _POWERSHELL_EXES:
        return None
    for index, token in enumerate(tokens[1:], start=1):
        lowered = token.lower()
        if lowered == "-ec" or (len(lowered) >= 2 and "-encodedcommand".startswith(lowered)):
            return base64.b64decode(tokens[index + 1]).decode("utf-16-le")
        if len(lowered) >= 2 and "-command".startswith(lowered):
            return command_line.split(token, 1)[1].strip()
    return ""


# PowerShell also takes the typographic single quotes as quote characters.
_QUOTES = "'\u2018\u2019\u201a\u201b"
_QUOTED = rf"[{_QUOTES}](?P<value>(?:[^{_QUOTES}]|[{_QUOTES}]{{2}})*)[{_QUOTES}]"


def _unquote(value: str) -> str:
    return re.sub(rf"([{_QUOTES}])\1", r"\1", value)


_PREAMBLE = re.compile(
    r"""[ \t]*(?:
        (?P<utf8>\[Console\]::OutputEncoding\s*=\s*(?:\[(?:System\.)?Text\.Encoding\]::UTF8
                  |New-Object\s+(?:System\.)?Text\.UTF8Encoding(?:\s+\$(?:false|true))?))
      | \$OutputEncoding\s*=\s*[^\r\n;]+
      | \$(?:ProgressPreference|ErrorActionPreference)\s*=\s*'\w+'
      | \$env:(?P<env>\w+)\s*=\s*""" + _QUOTED + r"""
    )[ \t]*;?[ \t]*(?:\r?\n|$)""",
    re.IGNORECASE | re.VERBOSE | re.DOTALL,
)


@dataclass
class Preamble:
    utf8_output: bool
    env: dict[str, str]
    body: str


def strip_preamble(script: str) -> Preamble:
    """Interpret the leading session-setup statements; the rest is the script proper."""
    utf8, env, position = False, {}, 0
    while position < len(script):
        if script[position] in "\r\n":
            position += 1
            continue
        match = _PREAMBLE.match(script, position)
        if not match or match.end() == position:
            break
        if match.group("utf8"):
            utf8 = True
        if match.group("env"):
            env[match.group("env")] = _unquote(match.group("value"))
        position = match.end()
    return Preamble(utf8_output=utf8, env=env, body=script[position:])


_ARGUMENT = re.compile(rf"\s*(?:{_QUOTED}|(?P<bare>[^\s{_QUOTES}\"`{{}}()\[\];|&$,]+))")


def tokenize_arguments(text: str) -> list[str]:
    """PowerShell arguments made of bare words and single-quoted strings; ValueError otherwise."""
    args, position = [], 0
    while text[position:].strip():
        match = _ARGUMENT.match(text, position)
        if not match:
            raise ValueError(f"not a simple argument list: {text[position:position + 40]!r}")
        quoted = match.group("value")
        args.append(_unquote(quoted) if quoted is not None else match.group("bare"))
        position = match.end()
    return args


def split_invocation(script: str) -> tuple[str, list[str]]:
    """`& {\\n<body>\\n} -A 'x'` -> (body, ['-A', 'x']); anything else -> (script, [])."""
    text = script.strip()
    if not text.startswith("& {"):
        return script, []
    end = len(text)
    while (end := text.rfind("}", 0, end)) > 2:
        try:
            args = tokenize_arguments(text[end + 1:])
        except ValueError:
            continue
        return text[3:end].removeprefix("\r").removeprefix("\n").removesuffix("\n").removesuffix("\r"), args
    return script, []


# The simulated machine ----------------------------------------------------------------------

CMD_LINE_LIMIT = 8191


def windows_datetime(moment: dt.datetime) -> str:
    """DateTime.ToUniversalTime().ToString('o'): seven fractional digits and a Z."""
    return moment.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "0Z"


@dataclass
class SimulatedWindows:
    """State and behaviour of the simulated machine."""

    computer_name: str = "WIN-PATCHDRILL"
    caption: str = "Microsoft Windows Server 2022 Datacenter"
    version: str = "10.0.20348"
    boot_time: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc))
    handlers: list[Handler] = field(default_factory=list)
    #: asked before `handlers`
    session_handlers: list[SessionHandler] = field(default_factory=list)
    shell_fallback: bool = True
    use_pwsh: bool = field(default_factory=lambda: shutil.which("pwsh") is not None)

    def __post_init__(self) -> None:
        self.handlers.extend(builtin_handlers(self))
        self._stdin_loader = winrm.STDIN_LOADER.read_text(encoding="utf-8").strip()

    def execute(self, command_line: str, streams: CommandStreams, *, codepage: int, env: dict[str, str]) -> None:
        """Run one command to completion (in the command's own thread); always finishes `streams`."""
        try:
            if len(command_line) > CMD_LINE_LIMIT:
                # cmd.exe, which WinRM starts commands through, refuses longer lines.
                streams.write("stderr", b"The command line is too long.\r\n")
                streams.finish(1)
                return
            script = decode_powershell_command(command_line)
            if script is None:
                exit_code = self._dispatch(command_line, [], command_line, streams, f"cp{codepage}", dict(env))
            else:
                exit_code = self._run_script(script, streams, codepage == 65001, codepage, dict(env))
        except Exception as exc:  # noqa: BLE001 - any handler failure is a PowerShell terminating error
            streams.write("stderr", clixml([f"{type(exc).__name__}: {exc}"]).encode("utf-8"))
            exit_code = 1
        streams.finish(exit_code)

    def _run_script(self, script: str, streams: CommandStreams, utf8: bool, codepage: int, env: dict[str, str]) -> int:
        preamble = strip_preamble(script)
        utf8 = utf8 or preamble.utf8_output
        env.update(preamble.env)
        body, args = split_invocation(preamble.body)
        if body.strip() == self._stdin_loader:
            loaded = streams.read_stdin(int(named_args(args)["Length"]))
            return self._run_script(loaded.decode("utf-8"), streams, utf8, codepage, env)
        return self._dispatch(body, args, script, streams, "utf-8" if utf8 else f"cp{codepage}", env)

    def _dispatch(self, body: str, args: list[str], full_script: str, streams: CommandStreams,
                  encoding: str, env: dict[str, str]) -> int:
        for session_handler in list(self.session_handlers):
            answered = session_handler(Invocation(body, args, env, streams))
            if answered is not None:
                _emit(answered, streams, encoding)
                return answered.exit_code
        for handler in list(self.handlers):
            result = handler(body, args)
            if result is not None:
                _emit(result, streams, encoding)
                return result.exit_code
        if self.use_pwsh:
            encoded = base64.b64encode(full_script.encode("utf-16-le")).decode("ascii")
            return run_process(["pwsh", "-NoProfile", "-NonInteractive", "-EncodedCommand", encoded], env, streams, encoding)
        if self.shell_fallback:
            return run_process(["sh", "-c", body, "sh", *args], env, streams, encoding)
        first_line = next((line.strip() for line in body.splitlines() if line.strip()), "")
        streams.write("stderr", clixml([f"The script is not simulated by the WinRM test host: {first_line[:120]}"]).encode(encoding, "replace"))
        return 1


def _emit(result: SimResult, streams: CommandStreams, encoding: str) -> None:
    def encoded(value: str | bytes) -> bytes:
        return value if isinstance(value, bytes) else value.encode(encoding, errors="replace")

    streams.write("stdout", encoded(result.stdout))
    streams.write("stderr", encoded(result.stderr))
    if result.errors:
        streams.write("stderr", encoded(clixml(result.errors)))


def run_process(argv: list[str], env: dict[str, str], streams: CommandStreams, encoding: str) -> int:
    """Run a local process as the command: stdin from Send, output to Receive, killed by Signal."""
    process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               env={**os.environ, **env}, start_new_session=True)

    def kill() -> None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    streams.on_terminate(kill)
    if streams.terminated:
        kill()

    def feed() -> None:
        assert process.stdin is not None
        try:
            while chunk := streams.read_stdin_chunk():
                process.stdin.write(chunk)
                process.stdin.flush()
        except (BrokenPipeError, ValueError):
            pass
        finally:
            try:
                process.stdin.close()
            except BrokenPipeError:
                pass

    def pump(source: object, name: str, transcode: bool) -> None:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        while chunk := source.read1(65536):  # type: ignore[attr-defined]
            streams.write(name, decoder.decode(chunk).encode(encoding, "replace") if transcode else chunk)

    transcode = codecs.lookup(encoding).name != "utf-8"
    threads = [
        threading.Thread(target=pump, args=(process.stdout, "stdout", transcode), daemon=True),
        threading.Thread(target=pump, args=(process.stderr, "stderr", False), daemon=True),
    ]
    for thread in threads:
        thread.start()
    threading.Thread(target=feed, daemon=True).start()
    code = process.wait()
    for thread in threads:
        thread.join()
    return code if code >= 0 else 1


# Built-in handlers: what Windows answers to the scripts the connector itself ships -----------

def builtin_handlers(windows: SimulatedWindows) -> list[Handler]:
    def boot_identity(_: dict[str, str]) -> SimResult:
        return SimResult(stdout=json.dumps({
            "last_boot_up_time": windows_datetime(windows.boot_time),
            "caption": windows.caption,
            "version": windows.version,
            "computer_name": windows.computer_name,
        }) + "\r\n")

    def write_chunk(args: dict[str, str]) -> SimResult:
        path, offset = Path(args["Path"]), int(args["Offset"])
        data = base64.b64decode(args["Data"])
        if offset == 0:
            path.write_bytes(data)
            return SimResult()
        size = path.stat().st_size
        if size != offset:
            return SimResult(errors=[f"partial file {path} is {size} bytes, expected {offset}"], exit_code=1)
        with path.open("ab") as handle:
            handle.write(data)
        return SimResult()

    def commit(args: dict[str, str]) -> SimResult:
        partial, path = Path(args["Partial"]), Path(args["Path"])
        actual = hashlib.sha256(partial.read_bytes()).hexdigest().upper()
        if actual != args["Sha256"].upper():
            partial.unlink()
            return SimResult(errors=[f"checksum mismatch for {path}: got {actual}"], exit_code=1)
        os.replace(partial, path)
        return SimResult()

    def stat(args: dict[str, str]) -> SimResult:
        path = Path(args["Path"])
        if not path.is_file():
            return SimResult(errors=[f"Cannot find path '{path}' because it does not exist."], exit_code=1)
        digest = hashlib.sha256(path.read_bytes()).hexdigest().upper()
        return SimResult(stdout=json.dumps({"length": path.stat().st_size, "sha256": digest}) + "\r\n")

    def read_chunk(args: dict[str, str]) -> SimResult:
        with Path(args["Path"]).open("rb") as handle:
            handle.seek(int(args["Offset"]))
            return SimResult(stdout=base64.b64encode(handle.read(int(args["Count"]))).decode("ascii"))

    return [
        script_handler(winrm.BOOT_IDENTITY, boot_identity),
        script_handler(winrm.FILE_WRITE_CHUNK, write_chunk),
        script_handler(winrm.FILE_COMMIT, commit),
        script_handler(winrm.FILE_STAT, stat),
        script_handler(winrm.FILE_READ_CHUNK, read_chunk),
    ]
