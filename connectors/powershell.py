"""PowerShell text: quoting, `-EncodedCommand`, scripts with arguments, and CLIXML error output.

Plain string work with no transport behind it, so a task that builds a PowerShell command line
(a health probe, say) does not load pywinrm; the WinRM connector sends what these build.
"""

from __future__ import annotations

import base64
import html
import re
import xml.etree.ElementTree as ET

#: Console output in UTF-8 whatever the host's code page, so non-ASCII text survives; the
#: encoding object is built without a byte-order mark, which [Text.Encoding]::UTF8 would
#: prepend to what PowerShell pipes into native programs.
PROLOGUE = (
    "[Console]::OutputEncoding = New-Object System.Text.UTF8Encoding $false\n"
    "$OutputEncoding = [Console]::OutputEncoding\n"
    "$ProgressPreference = 'SilentlyContinue'\n"
)
_QUOTES = "'\u2018\u2019\u201a\u201b"
_PARAMETER = re.compile(r"-[A-Za-z][A-Za-z0-9_]*:?")


def ps_quote(value: str) -> str:
    """A PowerShell single-quoted string literal (typographic quotes count as quotes too)."""
    return "'" + re.sub(f"([{_QUOTES}])", r"\1\1", value) + "'"


def ps_arguments(args: list[str]) -> str:
    """`-Name` tokens stay bare (parameter names); everything else becomes a quoted literal."""
    return " ".join(arg if _PARAMETER.fullmatch(arg) else ps_quote(arg) for arg in args)


def invoke_script(text: str, args: list[str]) -> str:
    """Run a script's text as a script block with arguments; its param() block binds them."""
    return f"& {{\n{text}\n}} {ps_arguments(args)}".rstrip() + "\n"


def encode_command(script: str) -> str:
    encoded = base64.b64encode(script.encode("utf-16-le")).decode("ascii")
    return f"powershell -NoProfile -NonInteractive -EncodedCommand {encoded}"


_STREAM_PREFIX = {"Warning": "WARNING: ", "Verbose": "VERBOSE: ", "Debug": "DEBUG: "}


def clean_clixml(stderr: str) -> str:
    """PowerShell's CLIXML on stderr (`#< CLIXML` + <Objs>) as the plain text a console shows.

    Progress records are dropped, error/warning/verbose/debug strings kept with the console's
    prefixes, `_xHHHH_` escapes decoded; text outside CLIXML documents is kept as it is.
    """
    if "#< CLIXML" not in stderr:
        return stderr
    pieces: list[str] = []
    for part in stderr.split("#< CLIXML"):
        start, end = part.find("<Objs"), part.rfind("</Objs>")
        if start < 0:
            if part.strip():
                pieces.append(part)
            continue
        stop = end + len("</Objs>") if end >= 0 else len(part)
        pieces += [part[:start].strip("\r\n"), _clixml_text(part[start:stop]), part[stop:]]
    return "".join(pieces).replace("\r\n", "\n").strip()


def _clixml_text(document: str) -> str:
    try:
        root = ET.fromstring(document)
        records = [(el.get("S", ""), el.text or "") for el in root if el.tag.rsplit("}", 1)[-1] == "S"]
    except ET.ParseError:
        # A document cut short (the process was killed mid-write): salvage the complete strings.
        records = [(s, html.unescape(t)) for s, t in re.findall(r'<S S="(\w+)">(.*?)</S>', document, re.S)]
    return "".join(_STREAM_PREFIX.get(stream, "") + _decode_clixml_escapes(text) for stream, text in records)


def _decode_clixml_escapes(text: str) -> str:
    return re.sub(r"_x([0-9A-Fa-f]{4})_", lambda m: chr(int(m.group(1), 16)), text)
