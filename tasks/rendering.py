"""What every artifact shares: sizes as people read them, text made safe for markdown, and
artifact keys Prefect accepts. Prefect-free, so tasks and flows render the same way."""

from __future__ import annotations

import re

import humanize

from configs.secrets import redact

# What CommonMark, GitHub's tables and its strikethrough treat as markup inside a line. The
# characters that only mean something at the start of a line (#, -, +, digits and a dot) stay
# as they are: this text is always placed after other markup (a cell's `|`, a `- **host**:`).
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&])")
_NOT_KEY = re.compile(r"[^a-z0-9]+")


def human_size(size: int | float) -> str:
    """`33554432` → `32.0 MiB`: binary units, as disk and backup sizes are counted."""
    return humanize.naturalsize(size, binary=True, format="%.1f")


def markdown_text(text: object) -> str:
    """Text shown literally inside a line of markdown: a Debian version such as
    `20250419~deb12u2` must not turn into strikethrough, nor a `|` end a table cell; newlines
    become spaces. Secrets are redacted first: escaped (`pass\\_word`), a secret would no longer
    match its own redaction."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(redact(str(text)).split()))


def artifact_key(*parts: str) -> str:
    """A Prefect artifact key (lowercase letters, digits, dashes) naming what the artifact is
    about, e.g. ("patch", "web", "summary") → `patch-web-summary`; each key keeps its history."""
    return "-".join(p for p in (_NOT_KEY.sub("-", part.lower()).strip("-") for part in parts) if p)
