"""`make demo`: the main job on the embedded lab config, start to finish, no server needed."""

from __future__ import annotations

import sys
from pathlib import Path

from configs.loader import load_config
from flows.logs import configure
from tasks.inventory import ping_hosts

LAB = Path(__file__).resolve().parent.parent / "configs" / "lab.yaml"


def main() -> int:
    configure()
    loaded = load_config(LAB)
    rows = ping_hosts(loaded.config.hosts, loaded.base_dir)
    for row in rows:
        state = f"up, {row.os}, boot {row.boot_id}, {row.rtt_ms} ms" if row.reachable else f"UNREACHABLE: {row.error}"
        print(f"{row.host}: {state}")
    return 0 if all(r.reachable for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
