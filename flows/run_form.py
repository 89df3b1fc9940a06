"""What a person sees of a flow run in the Prefect UI: parameter types the run form can render,
readable run names, and what an artifact is about (the selection it covered).

The parameter descriptions themselves come from each flow's docstring (its `Args:` section),
which Prefect reads into the form.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Annotated, Any

from pydantic import BeforeValidator, WithJsonSchema


def _empty_is_none(value: Any) -> Any:
    return None if value in ("", []) else value


# Flow modules using these aliases evaluate their annotations at definition time (no
# `from __future__ import annotations`): the engine of a served run validates parameters from
# the function's annotations and cannot resolve an alias named only in a string.
# The form shows a plain list or text field (an `anyOf [..., null]` schema renders as
# `Property is type "None"`), so a flow's default for them is the empty list or string, which
# that schema accepts: the UI submits a field's default as it is, and the server refuses a
# Custom run whose null default fails the schema. Empty arrives in the flow as None: "all".
Names = Annotated[list[str] | None, BeforeValidator(_empty_is_none),
                  WithJsonSchema({"type": "array", "items": {"type": "string"}})]
OptionalName = Annotated[str | None, BeforeValidator(_empty_is_none), WithJsonSchema({"type": "string"})]


def selection(parameters: Mapping[str, Any]) -> str:
    """The hosts a run covers in a few words: its groups, else its hosts, else `all`."""
    for key in ("groups", "hosts"):
        if parameters.get(key):
            return "+".join(parameters[key])
    return parameters.get("host") or "all"


def run_name(kind: str, *detail_keys: str) -> Callable[[], str]:
    """A flow_run_name callable: e.g. `patch-run web monthly-web 2026-12-08 02:00Z` instead of
    a random pair of words, so the runs list and every artifact title say what ran."""

    def name() -> str:
        from prefect.runtime import flow_run

        parameters = flow_run.parameters
        details = [str(parameters[k]) for k in detail_keys if parameters.get(k) not in (None, "", [])]
        stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%MZ")
        return " ".join([kind, selection(parameters), *details, stamp])

    return name


def current_run_name(default: str) -> str:
    """The running flow's name (for artifact titles), or default outside a flow run."""
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    return context.flow_run.name if context and context.flow_run else default
