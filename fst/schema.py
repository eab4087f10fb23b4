"""The building blocks every config model shares: the base model, the config error and the
one-line-per-problem rendering of a validation error.

A leaf module (it imports nothing from fst), so that the run config (fst.config) and the
task modules, which define their own params models, can both build on it without importing
each other.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

# A Kubernetes object name segment (RFC 1123 label); a run's name becomes one.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class ConfigError(ValueError):
    """A config (file, override or CR) is invalid. The message names the field and the source."""


class Schema(BaseModel):
    """Base of every config model: camelCase aliases, unknown keys rejected."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        validate_assignment=True,
    )


def format_validation_error(err: ValidationError, source: str) -> str:
    """One line per problem: `source: field.path: message (got value)`."""
    lines = [f"{source}: invalid configuration ({err.error_count()} problem(s))"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = ""
        if e["type"] not in ("missing",) and "input" in e and not isinstance(e["input"], dict):
            got = f" (got {e['input']!r})"
        lines.append(f"  {where}: {e['msg']}{got}")
    return "\n".join(lines)
