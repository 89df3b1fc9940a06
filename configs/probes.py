"""Probes: is a host (or a restored copy of it) doing its job? One model for the patch
pipeline's health probes and a recovery plan's drill probes.

Plain pydantic: `tasks.probes` runs these. Every probe has a `name` (its description when not
given), a timeout, and a `kind`:

* ``tcp``, ``http``: from the controller, as a user would, or with ``where: host`` on the host
  itself — needed for a copy inside an isolated network namespace, which the controller cannot
  reach;
* ``service``, ``command``, ``script``, ``sql``: on the host, through its connector;
* ``checksum``: files of a restored disk against the recovery point it came from (drills only).
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath, PureWindowsPath
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from configs.secrets import check_reference

#: Where a network probe runs: on the controller, or on the host it checks.
Where = Literal["controller", "host"]


class _Probe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = Field(default=None, min_length=1, description="How results and reports name the probe (default: its description).")
    timeout_seconds: float = Field(default=10.0, gt=0, le=3600, description="How long the probe may take before it fails.")

    @property
    def label(self) -> str:
        return self.name or self.describe()

    def describe(self) -> str:
        raise NotImplementedError


def _regex(value: str | None, field: str) -> str | None:
    if value is not None:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"{field} is not a valid regular expression: {exc}") from None
    return value


class TcpProbe(_Probe):
    kind: Literal["tcp"] = "tcp"
    port: int = Field(ge=1, le=65535)
    address: str | None = Field(default=None, description="Defaults to the host's own address.")
    where: Where = Field(default="controller", description="controller: connect from here; host: connect from the host itself.")

    def describe(self) -> str:
        return f"tcp {self.address or '{address}'}:{self.port}" + (" (from the host)" if self.where == "host" else "")


class HttpProbe(_Probe):
    kind: Literal["http"] = "http"
    url: str = Field(pattern=r"^https?://", description="May contain {address}, replaced by the host's address.")
    expect_status: int = Field(default=200, ge=100, le=599)
    expect_body: str | None = Field(default=None, description="Text the response body must contain (body_match: contains) or match (body_match: regex).")
    body_match: Literal["contains", "regex"] = Field(default="contains", description="How expect_body is compared: a substring, or a regular expression searched for.")
    verify_tls: bool = Field(default=True, description="https: validate the server certificate.")
    ca_bundle: str | None = Field(default=None, description="https: CA bundle (PEM) to validate against, a path on the machine that runs the check.")
    where: Where = Field(default="controller", description="controller: request from here; host: request from the host itself.")

    @model_validator(mode="after")
    def _body_regex(self) -> "HttpProbe":
        if self.body_match == "regex":
            _regex(self.expect_body, "expect_body")
        return self

    def describe(self) -> str:
        body = f" containing {self.expect_body!r}" if self.expect_body is not None else ""
        return f"http {self.url} → {self.expect_status}{body}" + (" (from the host)" if self.where == "host" else "")


class ServiceProbe(_Probe):
    kind: Literal["service"] = "service"
    service: str = Field(min_length=1, description="systemd unit or Windows service name.")
    expect_state: Literal["running", "stopped"] = "running"
    timeout_seconds: float = Field(default=30.0, gt=0, le=3600)

    def describe(self) -> str:
        return f"service {self.service} {self.expect_state}"


class _ExitProbe(_Probe):
    """Something run on the host, judged by its exit code and, optionally, its output."""

    expect_exit: int = 0
    expect_output: str | None = Field(default=None, description="A regular expression its standard output must contain (re.search).")
    timeout_seconds: float = Field(default=60.0, gt=0, le=3600)

    @field_validator("expect_output")
    @classmethod
    def _output_regex(cls, value: str | None) -> str | None:
        return _regex(value, "expect_output")


class CommandProbe(_ExitProbe):
    kind: Literal["command"] = "command"
    command: str = Field(min_length=1, description="Run on the host (sh on Linux, PowerShell on Windows); passes when it exits with expect_exit.")

    def describe(self) -> str:
        return f"command {self.command!r} → exit {self.expect_exit}"


class ScriptProbe(_ExitProbe):
    kind: Literal["script"] = "script"
    script: str = Field(min_length=1, description="A script file on the controller (.sh or .py for Linux hosts, .ps1 for Windows), "
                        "relative to the config file; sent to the host and run there, leaving nothing behind.")
    args: list[str] = Field(default_factory=list, description="Arguments passed to the script.")

    def describe(self) -> str:
        return f"script {self.script} → exit {self.expect_exit}"


class SqlProbe(_Probe):
    """A query run on the host with the engine's own command-line client (psql, sqlite3, sqlcmd).

    The result is compared as text, as the client prints it: `expect` for one value (the first
    column of the only row), `expect_rows` for every row. Neither: the query only has to run.
    """

    kind: Literal["sql"] = "sql"
    engine: Literal["postgresql", "sqlite3", "sqlserver"] = Field(default="postgresql", description="postgresql (psql), sqlite3, or sqlserver (sqlcmd).")
    query: str = Field(min_length=1)
    database: str | None = Field(default=None, description="Database name; for sqlite3 the database file's path on the host (required).")
    host: str | None = Field(default=None, description="Server address, or (postgresql) the directory of its Unix socket. Default: the client's.")
    port: int | None = Field(default=None, ge=1, le=65535)
    user: str | None = None
    password: str | None = Field(default=None, description="Credential reference (env:, file:, prefect-secret:) to the password: "
                                 "handed to the client through its environment, never on a command line.")
    expect: str | None = Field(default=None, description="The one value the query must return.")
    expect_rows: list[list[str]] | None = Field(default=None, description="Every row the query must return, in order, values as text.")
    timeout_seconds: float = Field(default=30.0, gt=0, le=3600)

    @field_validator("expect", mode="before")
    @classmethod
    def _scalar_as_text(cls, value: object) -> object:
        # A YAML `expect: 3` means the text the client prints, "3".
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @field_validator("expect_rows", mode="before")
    @classmethod
    def _rows_as_text(cls, value: object) -> object:
        if isinstance(value, list):
            return [[str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v for v in row]
                    if isinstance(row, list) else row for row in value]
        return value

    @field_validator("password")
    @classmethod
    def _reference_only(cls, value: str | None) -> str | None:
        return check_reference(value, "password")

    @model_validator(mode="after")
    def _consistent(self) -> "SqlProbe":
        if self.expect is not None and self.expect_rows is not None:
            raise ValueError("give expect (one value) or expect_rows (every row), not both")
        if self.engine == "sqlite3" and not self.database:
            raise ValueError("an sqlite3 probe needs database: the database file's path on the host")
        if self.engine == "sqlite3" and (self.host or self.port or self.user or self.password):
            raise ValueError("an sqlite3 probe reads a file: host, port, user and password do not apply")
        return self

    def describe(self) -> str:
        where = self.database or "default database"
        return f"sql {self.engine} {where}: {_short(self.query)}"


class ChecksumProbe(_Probe):
    """Files of a restored disk whose content must equal the recovery point the drill restored.

    The drill supplies the expected digests (it reads the point from the repository); the runner
    hashes the restored files on the target.
    """

    kind: Literal["checksum"] = "checksum"
    disk: str | None = Field(default=None, description="The member's disk the files belong to (default: its only disk).")
    paths: list[str] = Field(min_length=1, description="Files relative to the disk's root, e.g. 'etc/app.conf'.")
    timeout_seconds: float = Field(default=300.0, gt=0, le=86400)

    @field_validator("paths")
    @classmethod
    def _relative(cls, value: list[str]) -> list[str]:
        for path in value:
            posix, windows = PurePosixPath(path), PureWindowsPath(path)
            if posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts or ".." in windows.parts:
                raise ValueError(f"path {path!r} must be relative to the disk's root, without '..'")
        return value

    def describe(self) -> str:
        shown = ", ".join(self.paths[:3]) + (f" (+{len(self.paths) - 3})" if len(self.paths) > 3 else "")
        return f"checksum {self.disk + ': ' if self.disk else ''}{shown}"


def _short(text: str, limit: int = 60) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


Probe = Annotated[
    TcpProbe | HttpProbe | ServiceProbe | CommandProbe | ScriptProbe | SqlProbe | ChecksumProbe,
    Field(discriminator="kind"),
]

__all__ = ["ChecksumProbe", "CommandProbe", "HttpProbe", "Probe", "ScriptProbe", "ServiceProbe", "SqlProbe",
           "TcpProbe", "Where"]
