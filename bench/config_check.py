"""How `patchdrill config check` scales with the size of the config.

Generates configs of the given sizes (hosts with the fields a real inventory has, and one bad
field in the last host, so the check must find and place an error), runs `patchdrill config
check` on each in its own process, and prints CPU seconds and peak memory beside the cost of
merely reading the same YAML with PyYAML (pure Python, and libyaml). The growth exponent between
consecutive sizes is 1.0 for a linear check, 2.0 for a quadratic one.

    uv run python bench/config_check.py --sizes 1MB,2MB,5MB
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
CHECK = "from cli.app import app; app()"

HOST = """\
  - name: host-{i}
    address: 10.{a}.{b}.{c}
    transport: ssh
    user: ops
    password: env:FLEET_PASSWORD
    groups: [web, nightly]
    timezone: Europe/Paris
    update_domain: {ud}
    tags: {{role: web, owner: platform}}
    maintenance_windows:
      - {{days: [sat, sun], start: '02:00', duration_minutes: 120}}
    disks:
      - {{name: os, path: /dev/sda}}
"""


def make_config(path: Path, size: int) -> int:
    """Write a config of about `size` bytes; return its host count."""
    with path.open("w", encoding="utf-8") as out:
        out.write("storage: {kind: local, path: store}\nhosts:\n")
        written, i = 0, 0
        while written < size:
            chunk = HOST.format(i=i, a=i >> 16 & 255, b=i >> 8 & 255, c=i & 255, ud=i % 4)
            out.write(chunk)
            written += len(chunk)
            i += 1
        out.write("  - name: last\n    transport: telnet\n")
    return i + 1


def measure(command: list[str]) -> tuple[float, float, int]:
    """CPU seconds, peak RSS in MiB and exit code of one process."""
    proc = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, proc.returncode


def parse_size(text: str) -> int:
    units = {"KB": 1 << 10, "MB": 1 << 20}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1MB,2MB,5MB", help="comma-separated config sizes (KB, MB)")
    parser.add_argument("--baseline", type=Path, help="another checkout (e.g. `git archive main`) to check the same files with")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    python = sys.executable
    readers = {
        "patchdrill config check": lambda p: [python, "-c", CHECK, "config", "check", str(p)],
        "yaml.safe_load (pure Python)": lambda p: [python, "-c", f"import yaml; yaml.safe_load(open({str(p)!r}))"],
        "yaml.load (libyaml)": lambda p: [python, "-c", f"import yaml; yaml.load(open({str(p)!r}), Loader=yaml.CSafeLoader)"],
    }
    if args.baseline:
        baseline = str(args.baseline.resolve())
        readers["baseline config check"] = lambda p: [python, "-c", f"import sys; sys.path.insert(0, {baseline!r}); {CHECK}",
                                                      "config", "check", str(p)]
    results: dict[str, list[tuple[int, float, float]]] = {name: [] for name in readers}
    with tempfile.TemporaryDirectory(prefix="pd-config-bench-") as tmp:
        for size in sizes:
            path = Path(tmp) / f"fleet-{size}.yaml"
            hosts = make_config(path, size)
            print(f"{path.stat().st_size / 1e6:.2f} MB, {hosts} hosts", flush=True)
            for name, command in readers.items():
                cpu, rss, code = measure(command(path))
                if name.endswith("config check") and code != 1:
                    raise SystemExit(f"config check exited {code}, expected 1 (the bad transport)")
                results[name].append((path.stat().st_size, cpu, rss))
    print(f"\n{'reader':30} {'MB':>6} {'CPU s':>7} {'peak MiB':>9} {'growth':>7}")
    for name, rows in results.items():
        for k, (size, cpu, rss) in enumerate(rows):
            growth = ""
            if k:
                prev_size, prev_cpu, _ = rows[k - 1]
                growth = f"{math.log(cpu / prev_cpu) / math.log(size / prev_size):.2f}"
            print(f"{name:30} {size / 1e6:6.2f} {cpu:7.2f} {rss:9.0f} {growth:>7}")


if __name__ == "__main__":
    main()
