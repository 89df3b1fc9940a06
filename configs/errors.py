"""Validation errors placed where the loader can name their line."""

from __future__ import annotations

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError


def field_error(field: str, kind: str, message: str) -> ValidationError:
    """A model-level check's error placed on one field, so the loader can name that field's line
    (a plain ValueError from a model validator points at the whole model)."""
    return ValidationError.from_exception_data(
        field, [InitErrorDetails(type=PydanticCustomError(kind, message), loc=(field,), input=None)])
