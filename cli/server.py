"""`patchdrill server status | stop`: the Prefect API ad-hoc commands run their flows on (cli/api.py)."""

from __future__ import annotations

import os
import time
from typing import Any

import typer

from cli.common import JsonOption, console, emit

server_app = typer.Typer(no_args_is_help=True, help="The Prefect server ad-hoc commands report to: see it, stop it.")


def register(app: typer.Typer) -> None:
    app.add_typer(server_app, name="server")


@server_app.command("status")
def status(as_json: JsonOption = False) -> None:
    """Which Prefect API the next command will use, and the background server's pid, port and idle limit."""
    from prefect.settings import get_current_settings

    from cli.api import MODE_ENV, BackgroundServer, healthy, lab_server_url

    configured = get_current_settings().api.url
    background = BackgroundServer.default()
    state = background.state()
    report: dict[str, Any] = {
        "configured": configured, "configured_answers": healthy(configured) if configured else None,
        "lab_server": None if configured else lab_server_url(),
        "mode": os.environ.get(MODE_ENV, "background"),
        "background": None if state is None else {
            "pid": state["pid"], "url": state["url"], "answers": healthy(state["url"]),
            "idle_minutes": state.get("idle_minutes"), "up_seconds": round(time.time() - state.get("started", time.time())),
        },
        "background_log": str(background.log_file),
        "warm": _warm_state(),
    }

    def render(r: dict[str, Any]) -> None:
        if r["configured"]:
            console.print(f"next runs: the configured server {r['configured']} (PREFECT_API_URL; "
                          f"{'answers' if r['configured_answers'] else 'does not answer'})", highlight=False)
        elif r["lab_server"]:
            console.print(f"next runs: `make server`'s server {r['lab_server']}", highlight=False)
        elif r["mode"] == "temporary":
            console.print(f"next runs: Prefect's temporary API, one per command ({MODE_ENV}=temporary)", highlight=False)
        else:
            console.print("next runs: patchdrill's background server" + ("" if r["background"] else
                          " (none runs: the next command starts one)"), highlight=False)
        b = r["background"]
        if b:
            console.print(f"background server: pid {b['pid']}, {b['url']}, "
                          f"{'answers' if b['answers'] else 'does not answer'}, up {b['up_seconds']} s, "
                          f"stops after {b['idle_minutes']:g} min idle; log {r['background_log']}", highlight=False)
        if r["warm"]:
            console.print(f"warm process: pid {r['warm']['pid']}, {r['warm']['served']} commands served "
                          "(cli/warm.py)", highlight=False)

    emit(report, as_json, render)


@server_app.command("stop")
def stop(as_json: JsonOption = False) -> None:
    """Stop patchdrill's background server (a configured server or `make server`'s is left alone)."""
    from cli.api import BackgroundServer

    stopped = BackgroundServer.default().stop()
    emit({"stopped": None if stopped is None else {"pid": stopped["pid"], "url": stopped["url"]}}, as_json,
         lambda r: console.print(f"stopped the background server (pid {r['stopped']['pid']})" if r["stopped"]
                                 else "no background server runs", highlight=False))


def _warm_state() -> dict[str, Any] | None:
    from cli import warm

    state = warm.read_state(warm.state_file())
    if state is None or not warm.alive(int(state.get("pid", 0))):
        return None
    return {"pid": state["pid"], "served": state.get("served", 0)}
