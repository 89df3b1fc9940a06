#!/usr/bin/env python3
"""Create notes-app's database in a data directory and fill it with notes.

    python3 seed.py --data DIR [--notes 100]

Adds to an existing database rather than replacing it, so a demo can seed, back up, write more
and see the difference. Prints the row count after seeding, the figure probes then expect.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from app import add_note, count_notes, create


def seed(data: Path, notes: int) -> int:
    """Add `notes` notes to the database in data (creating it); return the row count."""
    create(data)
    start = count_notes(data)
    for number in range(start + 1, start + notes + 1):
        add_note(data, f"note {number}")
    return count_notes(data)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Create and fill notes-app's database.")
    parser.add_argument("--data", type=Path, required=True, help="data directory (created if missing)")
    parser.add_argument("--notes", type=int, default=100, help="how many notes to add")
    args = parser.parse_args(argv)
    if args.notes < 0:
        parser.error("--notes: must be 0 or more")
    print(f"notes={seed(args.data, args.notes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
