"""Fan-out benchmark: patchdrill's read-only enrollment + assessment against Ansible's, on N SSH hosts.

    uv run python bench/fanout_vs_ansible.py [--hosts 100] [--forks 50] [--repeat 1]

Not a test: it prints figures and asserts nothing. The target (issue 4) is for
`patchdrill patch assess` to take at most 0.5x Ansible's wall time on the same hosts.

The hosts (bench/fanout_hosts.py): N real /usr/sbin/sshd processes on loopback aliases
127.0.0.1 … 127.0.0.N, throwaway host and client keys, one known_hosts listing every
`[127.0.0.X]:PORT`, and per host a sandboxed apt root (the machine's real dpkg status plus demo
packages with pending updates, one of them security) that sshd's SetEnv hands to every session.
Everything lives in one temp dir that is deleted at the end, Ctrl-C and SIGTERM included.

The work compared, chosen to be the same questions answered from the same data:

- patchdrill CLI: `patchdrill patch assess --config CFG --json --forks FORKS`, a Prefect flow on
  the ephemeral API (or PREFECT_API_URL's server, when set): per host one connection and one
  SSH session running tasks/patching/host_scripts/linux_facts.sh + linux_assess.sh (os-release, kernel,
  package manager, time zone, boot id; `apt-get update` from the local flat repo; an
  `apt-get -s dist-upgrade` simulation, and the security-preferring one where a security suite
  offers a version besides the candidate, as demo-web's superseded fix does on every host here;
  the /run/reboot-required check). `--forks` is the number of hosts in flight at once, as
  Ansible's forks. The JSON must list every host as assessed; a run with failed hosts is
  reported as such, not just timed.
- patchdrill CLI with `--no-refresh`: the same without `apt-get update`, reading the lists
  the host has. This is the like-for-like row: Ansible's setup and package_facts read local
  state and refresh nothing.
- patchdrill library: the same per-host work (tasks.patching.linux_host.survey over one
  SshConnector per host) in a thread pool of --forks, in a fresh Python process, without
  Prefect. It shows what the fan-out costs apart from orchestration.
- Ansible play: `ansible-playbook -f FORKS` of one play, `gather_facts` with
  `gather_subset: min` (distribution, kernel, date/time, package manager: the OS facts
  patchdrill enrolls) followed by `package_facts` (every installed package with its version,
  read through python-apt from the same sandboxed root). One process and one connection per
  host, as patchdrill's single command. `min` rather than the default `all` subset is the
  harder target for patchdrill: it is the fastest fact gathering that still answers the
  enrollment questions.
- Ansible ad-hoc: `ansible all -f FORKS -m setup -a gather_subset=min` followed by
  `ansible all -f FORKS -m package_facts`, timed together (the second reuses the first's
  ControlPersist connections, as it would for a user typing them one after the other).

Ansible gets its fast settings: pipelining on, ControlPersist at its default (60 s) with a fresh
ControlPath directory per run (no run inherits another's connections), an explicit
interpreter (/usr/bin/python3, no discovery round trip), host key checking on against the same
known_hosts through ansible_ssh_common_args. Its output is checked: every host must be ok.
Both tools' executables are taken from this interpreter's environment (the project's venv,
where the dev group installs ansible-core), so neither pays for `uv run`.

Ratios compare patchdrill with the faster Ansible row. The fixed start-up costs that do not
grow with the fleet are measured apart: `patchdrill --help` (imports), a one-host assess on a
fresh PREFECT_HOME (first run: database created and migrated) and on a warm one, a one-task
Prefect flow on the ephemeral API, and for every row the time until the first host logged a
connection. The fleet's CLI runs use a private, already warmed PREFECT_HOME, so other work on
the machine's ~/.prefect neither slows them nor is disturbed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fanout_hosts import REPO_ROOT, ContactWatch, FanoutFleet, fleet  # noqa: E402

TARGET_RATIO = 0.5
BIN = Path(sys.executable).parent
# Update domains the config spreads the hosts over, round robin.
UPDATE_DOMAINS = 5
# Generous: a fleet run on a busy two-core machine can be slow; a hung run still ends.
RUN_TIMEOUT_SECONDS = 1800
PLAYBOOK = """\
- name: enrollment facts and installed packages
  hosts: all
  gather_facts: true
  gather_subset: [min]
  tasks:
    - name: installed packages
      ansible.builtin.package_facts:
        manager: auto
"""


# --------------------------------------------------------------------------- results


@dataclass
class Outcome:
    """One timed run of one tool."""

    wall: float
    ok: int
    first_contact: float | None
    problems: list[str] = field(default_factory=list)
    tool_cpu: float = 0.0
    hosts_cpu: float = 0.0


@dataclass
class Row:
    tool: str
    runs: list[Outcome] = field(default_factory=list)
    note: str = ""

    @property
    def wall(self) -> float:
        return statistics.median(r.wall for r in self.runs)

    @property
    def ok(self) -> int:
        return min(r.ok for r in self.runs)

    @property
    def first_contact(self) -> float | None:
        seen = [r.first_contact for r in self.runs if r.first_contact is not None]
        return statistics.median(seen) if seen else None

    @property
    def tool_cpu(self) -> float:
        return statistics.median(r.tool_cpu for r in self.runs)

    @property
    def hosts_cpu(self) -> float:
        return statistics.median(r.hosts_cpu for r in self.runs)

    @property
    def problems(self) -> list[str]:
        return [p for r in self.runs for p in r.problems]


# --------------------------------------------------------------------------- inputs for both tools


def write_patchdrill_config(fleet_: FanoutFleet, path: Path, hosts: list[Any] | None = None) -> Path:
    import yaml

    chosen = fleet_.hosts if hosts is None else hosts
    config = {
        "version": 1,
        "storage": {"kind": "local", "path": str(fleet_.workdir / "store")},
        "hosts": [
            {
                "name": h.name, "address": h.address, "port": h.port, "transport": "ssh", "user": "root",
                "ssh_key": str(fleet_.client_key), "ssh_agent": False, "known_hosts": str(fleet_.known_hosts),
                "connect_timeout": 30.0, "os_family": "linux", "timezone": "UTC",
                "update_domain": i % UPDATE_DOMAINS, "groups": ["bench"],
            }
            for i, h in enumerate(chosen)
        ],
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def write_ansible_files(fleet_: FanoutFleet, forks: int) -> Path:
    """inventory.ini, enroll.yml and ansible.cfg in <workdir>/ansible; returns the directory."""
    directory = fleet_.workdir / "ansible"
    (directory / "home" / "tmp").mkdir(parents=True, exist_ok=True)
    ssh_args = f"-o StrictHostKeyChecking=yes -o UserKnownHostsFile={fleet_.known_hosts}"
    lines = ["[fleet]"]
    lines += [f"{h.name} ansible_host={h.address} ansible_port={h.port}" for h in fleet_.hosts]
    lines += [
        "", "[fleet:vars]", "ansible_user=root", f"ansible_ssh_private_key_file={fleet_.client_key}",
        f"ansible_ssh_common_args='{ssh_args}'", "ansible_python_interpreter=/usr/bin/python3",
    ]
    (directory / "inventory.ini").write_text("\n".join(lines) + "\n")
    (directory / "enroll.yml").write_text(PLAYBOOK)
    (directory / "ansible.cfg").write_text(
        "[defaults]\n"
        f"inventory = {directory / 'inventory.ini'}\n"
        f"forks = {forks}\n"
        "host_key_checking = True\n"
        "retry_files_enabled = False\n"
        f"home = {directory / 'home'}\n"
        f"local_tmp = {directory / 'home' / 'tmp'}\n"
        "\n[ssh_connection]\n"
        "pipelining = True\n"
    )
    return directory


# --------------------------------------------------------------------------- running and checking


def timed(argv: list[str], env: dict[str, str], out: Path, watch: ContactWatch | None) -> tuple[float, int]:
    """Run argv with stdout to `out` (stderr beside it); return (wall seconds, exit code)."""
    with out.open("wb") as stdout, out.with_suffix(".err").open("wb") as stderr:
        if watch is not None:
            watch.start()
        started = time.monotonic()
        try:
            code = subprocess.run(argv, env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL,
                                  timeout=RUN_TIMEOUT_SECONDS, check=False).returncode
        finally:
            wall = time.monotonic() - started
            if watch is not None:
                watch.stop()
    return wall, code


def tool_cpu_seconds() -> float:
    """CPU of this process's reaped children: the tool and the processes it waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def hosts_cpu_seconds(fleet_: FanoutFleet) -> float:
    """CPU the hosts spent: every sshd listener's reaped children (connections, sessions, the
    commands run in them), from /proc/PID/stat's cutime and cstime."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for host in fleet_.hosts:
        process = host.sshd._process
        if process is None:
            continue
        try:
            # Fields after the command name's closing parenthesis; cutime and cstime are 16 and 17.
            fields = Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[13]) + int(fields[14])
    return total / ticks


def _tail(path: Path, lines: int = 8) -> str:
    text = path.read_text(errors="replace") if path.exists() else ""
    return " | ".join(text.strip().splitlines()[-lines:])


def _load_json(path: Path) -> Any:
    text = path.read_text(errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        # Anything printed before the document (a stray log line) is not part of it.
        start = min((i for i in (text.find("{"), text.find("[")) if i >= 0), default=-1)
        return json.loads(text[start:]) if start >= 0 else None


def patchdrill_assessed(report: Any, names: list[str]) -> tuple[set[str], dict[str, str]]:
    """Hosts `patch assess --json` reports as assessed, and why the others were not."""
    if not isinstance(report, dict):
        return set(), {"*": "no JSON report on stdout"}
    errors = {str(k): str(v) for k, v in (report.get("errors") or {}).items()}
    if "plans" in report:
        assessed = {p["host"] for p in report["plans"] if isinstance(p, dict) and "host" in p}
    else:
        rows = report.get("enrollments") or report.get("hosts") or []
        assessed = {r["host"] for r in rows if isinstance(r, dict) and r.get("reachable", r.get("ok"))}
    assessed -= set(errors)
    for name in names:
        if name not in assessed and name not in errors:
            errors[name] = "missing from the report"
    return assessed & set(names), errors


def _problems(errors: dict[str, str], limit: int = 3) -> list[str]:
    shown = [f"{host}: {error}" for host, error in sorted(errors.items())[:limit]]
    if len(errors) > limit:
        shown.append(f"… and {len(errors) - limit} more")
    return shown


def run_patchdrill_cli(config: Path, env: dict[str, str], out: Path, watch: ContactWatch | None, *,
                       forks: int, refresh: bool = True) -> Outcome:
    argv = [str(BIN / "patchdrill"), "patch", "assess", "--config", str(config), "--json", "--forks", str(forks)]
    if not refresh:
        argv.append("--no-refresh")
    wall, code = timed(argv, env, out, watch)
    names = _config_hosts(config)
    try:
        assessed, errors = patchdrill_assessed(_load_json(out), names)
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        assessed, errors = set(), {"*": f"unreadable JSON ({exc}); exit {code}; stderr: {_tail(out.with_suffix('.err'))}"}
    problems = _problems(errors)
    if code != 0:
        problems.insert(0, f"exit {code}: {_tail(out.with_suffix('.err'), 4)}")
    return Outcome(wall=wall, ok=len(assessed), first_contact=watch.contact if watch else None, problems=problems)


def _config_hosts(config: Path) -> list[str]:
    import yaml

    return [h["name"] for h in yaml.safe_load(config.read_text())["hosts"]]


def run_library(fleet_: FanoutFleet, config: Path, forks: int, env: dict[str, str], out: Path,
                watch: ContactWatch) -> Outcome:
    argv = [sys.executable, str(Path(__file__).resolve()), "--library-worker", str(config), "--forks", str(forks)]
    wall, code = timed(argv, env, out, watch)
    try:
        rows = _load_json(out) or []
    except json.JSONDecodeError:
        rows = []
    errors = {r["host"]: r["error"] for r in rows if not r["ok"]}
    errors.update({r["host"]: "assessed but found no updates (the demo updates are pending on every host)"
                   for r in rows if r["ok"] and r["updates"] == 0})
    ok = sum(1 for r in rows if r["ok"] and r["host"] not in errors)
    problems = _problems(errors)
    if code != 0 or not rows:
        problems.insert(0, f"exit {code}: {_tail(out.with_suffix('.err'), 4)}")
    return Outcome(wall=wall, ok=ok, first_contact=watch.contact, problems=problems)


_RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=\d+\s+unreachable=(\d+)\s+failed=(\d+)", re.M)
_ADHOC = re.compile(r"^(\S+) \| (SUCCESS|CHANGED|FAILED!|UNREACHABLE!)", re.M)


def _close_control_masters(control_dir: Path) -> None:
    """End the ControlPersist masters a run left, so the next run starts cold and nothing lingers."""
    sockets = [p for p in control_dir.iterdir()] if control_dir.exists() else []

    def close(socket_path: Path) -> None:
        subprocess.run(["ssh", "-o", f"ControlPath={socket_path}", "-O", "exit", "bench"],
                       capture_output=True, timeout=30, check=False)

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(close, sockets))
    shutil.rmtree(control_dir, ignore_errors=True)


def run_ansible_play(fleet_: FanoutFleet, directory: Path, forks: int, env: dict[str, str], out: Path,
                     watch: ContactWatch) -> Outcome:
    control = directory / f"cp-{out.stem}"
    env = {**env, "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control)}
    argv = [str(BIN / "ansible-playbook"), "-f", str(forks), str(directory / "enroll.yml")]
    try:
        wall, code = timed(argv, env, out, watch)
    finally:
        _close_control_masters(control)
    recap = {m[0]: (int(m[1]), int(m[2]), int(m[3])) for m in _RECAP.findall(out.read_text(errors="replace"))}
    errors: dict[str, str] = {}
    for h in fleet_.hosts:
        got = recap.get(h.name)
        if got is None:
            errors[h.name] = "not in the PLAY RECAP"
        elif got[1] or got[2] or got[0] < 2:
            errors[h.name] = f"ok={got[0]} unreachable={got[1]} failed={got[2]}"
    problems = _problems(errors)
    if code != 0:
        problems.insert(0, f"exit {code}: {_tail(out, 3)}")
    return Outcome(wall=wall, ok=len(fleet_.hosts) - len(errors), first_contact=watch.contact, problems=problems)


def run_ansible_adhoc(fleet_: FanoutFleet, directory: Path, forks: int, env: dict[str, str], out: Path,
                      watch: ContactWatch) -> Outcome:
    control = directory / f"cp-{out.stem}"
    env = {**env, "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control)}
    ansible = str(BIN / "ansible")
    facts, packages = out.with_name(out.stem + "-setup.out"), out.with_name(out.stem + "-packages.out")
    try:
        wall_facts, code_facts = timed([ansible, "all", "-f", str(forks), "-m", "setup", "-a", "gather_subset=min"],
                                       env, facts, watch)
        wall_packages, code_packages = timed([ansible, "all", "-f", str(forks), "-m", "package_facts"],
                                             env, packages, None)
    finally:
        _close_control_masters(control)
    errors: dict[str, str] = {}
    for path, step in ((facts, "setup"), (packages, "package_facts")):
        text = path.read_text(errors="replace")
        status = {m[0]: m[1] for m in _ADHOC.findall(text)}
        for h in fleet_.hosts:
            if status.get(h.name) != "SUCCESS":
                errors.setdefault(h.name, f"{step}: {status.get(h.name, 'no result')}")
        if step == "package_facts" and text.count('"demo-web"') < len(fleet_.hosts):
            # package_facts must have read the hosts' sandboxed roots, as patchdrill does.
            errors.setdefault("*", "package_facts did not list demo-web on every host")
    problems = _problems(errors)
    for code, path in ((code_facts, facts), (code_packages, packages)):
        if code != 0:
            problems.insert(0, f"exit {code}: {_tail(path, 3)}")
    return Outcome(wall=wall_facts + wall_packages, ok=len(fleet_.hosts) - len(errors),
                   first_contact=watch.contact, problems=problems)


# --------------------------------------------------------------------------- the library path, in its own process


def library_worker(config_path: Path, forks: int) -> None:
    """Enroll and assess every host with the library alone; one JSON row per host on stdout."""
    import logging

    import structlog

    # Events at INFO on stderr, as the CLI logs them; structlog's default would print every
    # debug event to stdout, into the JSON.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr),
                        wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    from configs.loader import load_config
    from connectors import connect
    from tasks.patching import linux_host
    from configs.policies import Classification

    loaded = load_config(config_path)

    def one(host: Any) -> dict[str, Any]:
        conn = connect(host, base_dir=loaded.base_dir)
        try:
            found = linux_host.survey(conn)
            enrollment, updates, pending = found.enrollment, found.updates, found.reboot_pending
        except Exception as exc:  # noqa: BLE001 - a failed host is a row, as in a patch run
            return {"host": host.name, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            conn.close()
        security = sum(u.classification is Classification.SECURITY for u in updates)
        return {"host": host.name, "ok": True, "os": enrollment.os_name, "updates": len(updates),
                "security": security, "reboot_pending": pending}

    hosts = loaded.config.hosts
    with ThreadPoolExecutor(max_workers=min(forks, len(hosts))) as pool:
        rows = list(pool.map(one, hosts))
    print(json.dumps(rows))


# --------------------------------------------------------------------------- fixed costs


TRIVIAL_FLOW = """
from prefect import flow, task

@task
def step() -> int:
    return 1

@flow
def trivial() -> int:
    return step.submit().result()

trivial()
"""


def fixed_costs(fleet_: FanoutFleet, cli_env: dict[str, str], fresh_home: Path, have_cli: bool) -> list[tuple[str, float, str]]:
    """Start-up costs that do not grow with the fleet, each timed once."""
    work = fleet_.workdir / "runs"
    costs: list[tuple[str, float, str]] = []

    def measure(label: str, argv: list[str], env: dict[str, str], note: str = "") -> None:
        out = work / f"fixed-{len(costs)}.out"
        wall, code = timed(argv, env, out, None)
        costs.append((label, wall, note if code == 0 else f"exit {code}: {_tail(out.with_suffix('.err'), 2)}"))

    measure("`patchdrill --help` (imports, no flow)", [str(BIN / "patchdrill"), "--help"], cli_env)
    measure("`ansible-playbook --version`", [str(BIN / "ansible-playbook"), "--version"], cli_env)
    if have_cli:
        one = write_patchdrill_config(fleet_, fleet_.workdir / "patchdrill-1.yaml", fleet_.hosts[:1])
        cold = {**cli_env, "PREFECT_HOME": str(fresh_home)}
        measure("`patch assess`, 1 host, fresh PREFECT_HOME", [str(BIN / "patchdrill"), "patch", "assess", "--config",
                str(one), "--json"], cold, "first run: database created and migrated")
        measure("`patch assess`, 1 host, warm PREFECT_HOME", [str(BIN / "patchdrill"), "patch", "assess", "--config",
                str(one), "--json"], cli_env)
    measure("one-task Prefect flow, ephemeral API, warm PREFECT_HOME", [sys.executable, "-c", TRIVIAL_FLOW], cli_env)
    return costs


# --------------------------------------------------------------------------- report


def _fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def report(rows: list[Row], hosts: int, forks: int, repeat: int, costs: list[tuple[str, float, str]],
           api: str, load: str) -> None:
    print()
    print(f"Fan-out: {hosts} SSH hosts (real sshd on loopback aliases), forks {forks}, "
          f"{'median of ' + str(repeat) + ' runs' if repeat > 1 else 'one run'}; patchdrill API: {api}")
    print(f"{os.cpu_count()} CPUs; load average (1 min) {load}. Tools and hosts share these CPUs: "
          "tool CPU is the tool's process tree, hosts' CPU everything the sshd hosts ran for it.")
    print()
    print("| tool | wall s | hosts/s | hosts ok | first host contacted s | tool CPU s | hosts' CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        rate = row.ok / row.wall if row.wall > 0 else 0.0
        print(f"| {row.tool} | {row.wall:.1f} | {rate:.1f} | {row.ok}/{hosts} | {_fmt(row.first_contact)} "
              f"| {row.tool_cpu:.0f} | {row.hosts_cpu:.0f} |")
    print()
    for row in rows:
        if row.note:
            print(f"- {row.tool}: {row.note}")
        for problem in row.problems:
            print(f"- {row.tool}: FAILED HOSTS: {problem}")
    ansible = [r for r in rows if r.tool.startswith("ansible")]
    if ansible:
        best = min(ansible, key=lambda r: r.wall)
        for row in rows:
            if row.tool.startswith("patchdrill"):
                ratio = row.wall / best.wall
                met = "met" if ratio <= TARGET_RATIO and row.ok == hosts else "NOT met"
                caveat = "" if row.ok == hosts else f" ({hosts - row.ok} host(s) failed: not a valid result)"
                print(f"- ratio {row.tool} / {best.tool}: {ratio:.2f}x (target <= {TARGET_RATIO}x): {met}{caveat}")
    if costs:
        print()
        print("Fixed costs (do not grow with the fleet):")
        print()
        print("| what | wall s | note |")
        print("|---|---:|---|")
        for label, wall, note in costs:
            print(f"| {label} | {wall:.1f} | {note} |")
        for row in rows:
            if row.first_contact is not None:
                spent = row.wall - row.first_contact
                print(f"- {row.tool}: {row.first_contact:.1f} s before the first host was contacted, "
                      f"{spent:.1f} s from then to the end")


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hosts", type=int, default=100, help="number of sshd hosts (default 100)")
    parser.add_argument("--forks", type=int, default=50, help="parallel hosts for every tool (default 50)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool; the median is reported (default 1)")
    parser.add_argument("--ansible", choices=("play", "adhoc", "both"), default="both",
                        help="which Ansible form to time (default both; ratios use the faster)")
    parser.add_argument("--no-fixed-costs", action="store_true", help="skip the start-up cost measurements")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (configs, outputs, sshd logs)")
    parser.add_argument("--library-worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.library_worker is not None:
        library_worker(args.library_worker, args.forks)
        return 0
    if not 1 <= args.hosts <= 254 * 250 or args.forks < 1 or args.repeat < 1:
        parser.error("--hosts, --forks and --repeat must be positive")
    for tool in ("patchdrill", "ansible", "ansible-playbook"):
        if not (BIN / tool).exists():
            parser.error(f"{BIN / tool} is missing: run with `uv run` from the repository (uv sync installs both)")
    have_cli = importlib.util.find_spec("cli.patch") is not None

    base_env = {**os.environ}
    base_env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    base_env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    api = base_env.get("PREFECT_API_URL") or "ephemeral (no PREFECT_API_URL)"

    load_before = os.getloadavg()[0]
    print(f"starting {args.hosts} sshd hosts …", file=sys.stderr, flush=True)
    started = time.monotonic()
    with fleet(args.hosts, keep=args.keep) as hosts:
        print(f"hosts up in {time.monotonic() - started:.1f} s under {hosts.workdir}", file=sys.stderr, flush=True)
        work = hosts.workdir / "runs"
        work.mkdir()
        config = write_patchdrill_config(hosts, hosts.workdir / "patchdrill.yaml")
        ansible_dir = write_ansible_files(hosts, args.forks)
        # --forks alone sets the CLI's parallelism (hosts in flight), as -f does Ansible's.
        # Prefect's temporary API per command, as the figures in bench/README.md were made (and
        # nothing left running); bench/adhoc_cli.py measures the background server.
        cli_env = {**base_env, "PREFECT_HOME": str(hosts.workdir / "prefect-home"), "PATCHDRILL_SERVER": "temporary"}
        ansible_env = {**base_env, "ANSIBLE_CONFIG": str(ansible_dir / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}

        costs: list[tuple[str, float, str]] = []
        if not args.no_fixed_costs:
            print("measuring fixed costs …", file=sys.stderr, flush=True)
            costs = fixed_costs(hosts, cli_env, hosts.workdir / "prefect-home-fresh", have_cli)
        elif have_cli:
            # Not timed: the fleet runs should find a migrated database, as a user's second run does.
            timed([sys.executable, "-c", TRIVIAL_FLOW], cli_env, work / "warmup.out", None)

        runners: list[tuple[Row, Callable[[Path, ContactWatch], Outcome]]] = []
        if have_cli:
            runners.append((Row("patchdrill patch assess (CLI)", note="refreshes every host's lists (apt-get update)"),
                            lambda out, w: run_patchdrill_cli(config, cli_env, out, w, forks=args.forks)))
            runners.append((Row("patchdrill patch assess --no-refresh (CLI)",
                                note="the hosts' cached lists, as package_facts reads them: the like-for-like row"),
                            lambda out, w: run_patchdrill_cli(config, cli_env, out, w, forks=args.forks,
                                                              refresh=False)))
        else:
            print("cli/patch.py is not there yet: only the library row measures patchdrill", file=sys.stderr)
        runners.append((Row("patchdrill library (no Prefect)",
                            note="linux_host.survey (refreshing), one SshConnector per host, thread pool; "
                                 "not the CLI"),
                        lambda out, w: run_library(hosts, config, args.forks, base_env, out, w)))
        if args.ansible in ("play", "both"):
            runners.append((Row("ansible-playbook (gather_facts min + package_facts)"),
                            lambda out, w: run_ansible_play(hosts, ansible_dir, args.forks, ansible_env, out, w)))
        if args.ansible in ("adhoc", "both"):
            runners.append((Row("ansible ad-hoc (setup min, then package_facts)"),
                            lambda out, w: run_ansible_adhoc(hosts, ansible_dir, args.forks, ansible_env, out, w)))

        for round_ in range(args.repeat):
            # Tools take turns within each round, so drift on a shared machine hits all of them.
            for index, (row, run) in enumerate(runners):
                print(f"round {round_ + 1}/{args.repeat}: {row.tool} …", file=sys.stderr, flush=True)
                tool_before, hosts_before = tool_cpu_seconds(), hosts_cpu_seconds(hosts)
                outcome = run(work / f"r{round_}-t{index}.out", hosts.first_contact())
                # Read after the run's connections closed: sshd counts a child's CPU once reaped.
                time.sleep(0.5)
                outcome.tool_cpu = tool_cpu_seconds() - tool_before
                outcome.hosts_cpu = hosts_cpu_seconds(hosts) - hosts_before
                row.runs.append(outcome)
                print(f"  {outcome.wall:.1f} s, {outcome.ok}/{args.hosts} ok", file=sys.stderr, flush=True)
        load = f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
        report([row for row, _ in runners], args.hosts, args.forks, args.repeat, costs, api, load)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; hosts stopped and temp files removed", file=sys.stderr)
        sys.exit(130)
