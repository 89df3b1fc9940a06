"""A drill's manual actions on patchdrill's private background server: nobody watches that server
(cli/api.py), so the drill cannot pause there for a person, exactly as with no server at all."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from configs.loader import load_config
from configs.plans import Action
from flows.drill import _manual_gate
from tasks.drill.members import find_plan, resolve
from tasks.drill.steps import Timeline

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("private", [True, False], ids=["background-server", "configured-server"])
def test_manual_actions_are_not_asked_for_on_the_private_server(monkeypatch: pytest.MonkeyPatch, private: bool) -> None:
    """Stops at the decision: the pause (flows/pause.py) is replaced by one that records it was asked and
    raises (a real pause needs a flow run on a server a person resumes, which is not the point here)."""
    import flows.drill as drill_flow
    from prefect.settings import PREFECT_API_URL, temporary_settings

    loaded = load_config(REPO / "configs" / "lab.yaml")
    [[member, *_], *_] = resolve(loaded.config, loaded.base_dir, find_plan(loaded.config, "lab-web"))
    manual = Action(kind="manual", instructions="switch the DNS record")
    group = [dataclasses.replace(member, spec=member.spec.model_copy(update={"pre_actions": [manual]}))]
    asked: list[str] = []

    def pause(*_: object, **__: object) -> None:
        asked.append("paused")
        raise RuntimeError("paused")

    monkeypatch.setattr(drill_flow, "wait_for_answer", pause)
    if private:
        monkeypatch.setenv("PATCHDRILL_PRIVATE_API", "1")
    else:
        monkeypatch.delenv("PATCHDRILL_PRIVATE_API", raising=False)
    with temporary_settings(updates={PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        try:
            stop = _manual_gate(group, "pre", Timeline(), 5)
        except RuntimeError:
            stop = None
    if private:
        assert stop is not None and "no Prefect server" in stop.reason and not asked
    else:
        assert stop is None and asked == ["paused"]
