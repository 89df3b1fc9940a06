"""Counting the config files a piece of code reads: every `configs.loader.load_config` parses
through `configs.loader.parse_config`, however the caller imported `load_config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import configs.loader


def count_config_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The file names parsed from now on (to the end of the test), one entry per parse."""
    reads: list[str] = []
    parse = configs.loader.parse_config

    def counting(text: str, filename: str = "<config>", *, base_dir: Path | None = None) -> Any:
        reads.append(filename)
        return parse(text, filename, base_dir=base_dir)

    monkeypatch.setattr(configs.loader, "parse_config", counting)
    return reads
