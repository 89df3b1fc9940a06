"""Ad-hoc CLI benchmark: `patchdrill patch assess --host HOST` cold and warm vs `ansible HOST -m setup`.

    uv run python bench/adhoc_cli.py [--repeat 3] [--skip-temporary]

Not a test: it prints figures and asserts nothing. The target (issue 11): a warm one-host
`patch assess` within 3 s wall and within 1.5x `ansible HOST -m setup` on the same host.

One real sshd host (bench/fanout_hosts.py: loopback, throwaway keys, a sandboxed apt root with
pending updates). Every command runs from this interpreter's environment (no `uv run` in the
timings), with a private PREFECT_HOME made for the run and no PREFECT_API_URL, as on a machine
where no server runs:

- ansible: `ansible host001 -m setup` (every fact, its default), pipelining on, an explicit
  interpreter, a fresh ControlPath directory per run whose masters are closed afterwards, so
  every run opens its connection as the first command of a shell session would;
- patchdrill, temporary API (PATCHDRILL_SERVER=temporary): how every command ran before the
  background server: Prefect's temporary API started for the command and ended with it;
- patchdrill cold: no server runs (`patchdrill server stop` first; the database exists): the
  command starts the background server, then runs;
- patchdrill warm: the background server and its warm process (cli/warm.py) run: what every
  command after the first pays;
- patchdrill warm --no-refresh: the same without `apt-get update`, the like-for-like row
  (`setup` reads facts and refreshes nothing);
- patchdrill warm, own process: PATCHDRILL_WARM=0, the command imports everything itself.

Then where a warm run's time goes, each part measured on its own: the CLI's imports
(`patchdrill --help`), Prefect's and the flows' imports, the SSH work without Prefect
(tasks.patching.linux_host.survey over one SshConnector, in a fresh process, minus its imports),
and what is left for the flow and task runs on the API. The load average is printed: on a busy
machine every figure grows, so compare the rows of one run with each other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fanout_hosts import FanoutFleet, fleet  # noqa: E402
from fanout_vs_ansible import _close_control_masters, write_ansible_files, write_patchdrill_config  # noqa: E402

BIN = Path(sys.executable).parent
TARGET_SECONDS = 3.0
TARGET_RATIO = 1.5
RUN_TIMEOUT_SECONDS = 600

SURVEY = """
import sys, time
started = time.perf_counter()
from configs.loader import load_config
from connectors import connect
from tasks.patching import linux_host
imported = time.perf_counter()
loaded = load_config(sys.argv[1])
[host] = loaded.config.hosts
connection = connect(host, base_dir=loaded.base_dir)
try:
    linux_host.survey(connection, refresh=True)
finally:
    connection.close()
print(f"{imported - started} {time.perf_counter() - imported}")
"""


def timed(argv: list[str], env: dict[str, str], out: Path) -> float:
    started = time.perf_counter()
    with out.open("wb") as stdout, out.with_suffix(".err").open("wb") as stderr:
        code = subprocess.run(argv, env=env, stdout=stdout, stderr=stderr, timeout=RUN_TIMEOUT_SECONDS).returncode
    wall = time.perf_counter() - started
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {code}: {out.with_suffix('.err').read_text()[-2000:]}")
    return wall


def wait_for_warm(home: Path) -> None:
    state = home / "patchdrill" / "server" / "warm.json"
    deadline = time.monotonic() + RUN_TIMEOUT_SECONDS
    while not state.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("the warm process never started (its log: warm.log beside the state)")
        time.sleep(0.1)


def assessed(out: Path, host: str) -> None:
    report = json.loads(out.read_text())
    if report.get("errors") or host not in {e["host"] for e in report["enrollments"]}:
        raise RuntimeError(f"patch assess did not assess {host}: {out.read_text()[-2000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-temporary", action="store_true", help="Leave out the temporary-API row (slowest).")
    args = parser.parse_args()
    with fleet(1) as fleet_, tempfile.TemporaryDirectory(prefix="adhoc-") as scratch:
        run(fleet_, Path(scratch), args.repeat, args.skip_temporary)


def run(fleet_: FanoutFleet, scratch: Path, repeat: int, skip_temporary: bool) -> None:
    host = fleet_.hosts[0].name
    config = write_patchdrill_config(fleet_, scratch / "one.yaml")
    ansible_dir = write_ansible_files(fleet_, 1)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_API_URL", "PATCHDRILL_SERVER"))}
    env = {**base, "PREFECT_HOME": str(scratch / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    ansible_env = {**base, "ANSIBLE_CONFIG": str(ansible_dir / "ansible.cfg"), "ANSIBLE_NOCOLOR": "1"}
    patchdrill = str(BIN / "patchdrill")
    assess = [patchdrill, "patch", "assess", "--config", str(config), "--host", host, "--json"]
    out = scratch / "out.json"
    times: dict[str, list[float]] = {}

    def record(label: str, seconds: float) -> None:
        times.setdefault(label, []).append(seconds)

    def ansible_setup(index: int) -> float:
        control = ansible_dir / f"cp-{index}"
        try:
            return timed([str(BIN / "ansible"), host, "-m", "setup"],
                         {**ansible_env, "ANSIBLE_SSH_CONTROL_PATH_DIR": str(control)}, scratch / "ansible.out")
        finally:
            _close_control_masters(control)

    def stop_server() -> None:
        subprocess.run([patchdrill, "server", "stop"], env=env, capture_output=True, timeout=RUN_TIMEOUT_SECONDS)

    try:
        # The first command on a fresh PREFECT_HOME makes the background server's database: timed once.
        first = timed(assess, env, out)
        assessed(out, host)
        for index in range(repeat):
            record("ansible HOST -m setup", ansible_setup(index))
            if not skip_temporary:
                record("patchdrill, temporary API (before)", timed(assess, {**env, "PATCHDRILL_SERVER": "temporary"}, out))
                assessed(out, host)
            stop_server()
            record("patchdrill cold (starts the background server)", timed(assess, env, out))
            assessed(out, host)
            # The cold command starts the warm process after its run; it is ready once its state is there.
            wait_for_warm(scratch / "prefect-home")
            record("patchdrill warm", timed(assess, env, out))
            assessed(out, host)
            record("patchdrill warm --no-refresh", timed(assess + ["--no-refresh"], env, out))
            assessed(out, host)
            record("patchdrill warm, own process (PATCHDRILL_WARM=0)", timed(assess, {**env, "PATCHDRILL_WARM": "0"}, out))
            assessed(out, host)
            record("`patchdrill --help`", timed([patchdrill, "--help"], env, scratch / "help.out"))
            record("Prefect + flows imports", timed([sys.executable, "-c", "import cli.app, flows.patch"], env,
                                                     scratch / "imports.out"))
            # The last line: the library's events go to stdout too.
            survey = subprocess.run([sys.executable, "-c", SURVEY, str(config)], env=env, capture_output=True, text=True,
                                    timeout=RUN_TIMEOUT_SECONDS, check=True).stdout.splitlines()[-1].split()
            record("SSH work alone (survey, no Prefect)", float(survey[1]))
    finally:
        stop_server()
    report(times, first, repeat)


def report(times: dict[str, list[float]], first: float, repeat: int) -> None:
    median = {label: statistics.median(values) for label, values in times.items()}
    load = os.getloadavg()[0]
    print(f"\nOne sshd host, median of {repeat}; {os.cpu_count()} CPUs, load average (1 min) {load:.1f}\n")
    print("| command | wall s | / ansible |")
    print("|---|---:|---:|")
    ansible = median["ansible HOST -m setup"]
    for label, seconds in median.items():
        print(f"| {label} | {seconds:.2f} | {seconds / ansible:.2f}x |")
    print(f"| patchdrill first run on a fresh PREFECT_HOME (database made) | {first:.2f} | {first / ansible:.2f}x |")
    warm = median["patchdrill warm"]
    own = median["patchdrill warm, own process (PATCHDRILL_WARM=0)"]
    imports = median["Prefect + flows imports"]
    ssh = median["SSH work alone (survey, no Prefect)"]
    print("\nA warm run in a process of its own, by part:")
    print(f"- imports (CLI, Prefect, flows): {imports:.2f} s")
    print(f"- SSH work: {ssh:.2f} s")
    print(f"- flow and task runs on the API, process exit: {own - imports - ssh:.2f} s")
    print(f"In the warm process (cli/warm.py) the imports are paid once: {own - warm:.2f} s less.")
    verdict = "met" if warm <= TARGET_SECONDS and warm <= TARGET_RATIO * ansible else "NOT met"
    print(f"\ntarget: warm <= {TARGET_SECONDS:g} s and <= {TARGET_RATIO:g}x ansible: {warm:.2f} s, "
          f"{warm / ansible:.2f}x: {verdict}")


if __name__ == "__main__":
    main()
