"""The Custom run form submits each parameter's default as the schema states it, and the server
validates the form against that schema before it creates the run (`POST /ui/schemas/validate`):
a default the schema refuses makes the form impossible to submit."""

from __future__ import annotations

from typing import Any

from pydantic import TypeAdapter

from flows.run_form import Names, OptionalName
from tests.e2e.test_deployments import _shipped_flows


def test_every_flows_defaults_pass_the_run_forms_validation() -> None:
    """Fails with None defaults under a plain `array`/`string` schema: "None is not of type 'array'"."""
    from prefect.utilities.callables import parameter_schema
    from prefect.utilities.schema_tools.validation import validate

    refused: dict[str, Any] = {}
    for flow in _shipped_flows():
        schema = parameter_schema(flow.fn).model_dump_for_openapi()  # type: ignore[attr-defined]
        defaults = {name: prop["default"] for name, prop in schema["properties"].items() if "default" in prop}
        errors = validate(defaults, schema, ignore_required=True)
        if errors:
            refused[flow.name] = [error.message for error in errors]  # type: ignore[attr-defined]
    assert refused == {}


def test_an_empty_selection_reaches_the_flow_as_none_meaning_all() -> None:
    assert TypeAdapter(Names).validate_python([]) is None
    assert TypeAdapter(OptionalName).validate_python("") is None
    assert TypeAdapter(Names).validate_python(["web"]) == ["web"]
    assert TypeAdapter(OptionalName).validate_python("monthly-web") == "monthly-web"
