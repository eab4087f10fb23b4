"""The building blocks every config model shares: the base model, the config error and the
one-line-per-problem rendering of a validation error.

A leaf module (it imports nothing from fst), so that the run config (fst.config) and the
task modules, which define their own params models, can both build on it without importing
each other.
"""

from __future__ import annotations

import reprlib
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError
from pydantic.alias_generators import to_camel

# A Kubernetes object name segment (RFC 1123 label); a run's name becomes one.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

# Size limits on text that becomes model input (YAML documents: fst/yamlio.py).
# A system prompt of 16 Ki characters is ~4k tokens: half of SmolLM2's 8k context, already
# more than any prompt GEPA evolves; a bigger one only asks the sampler for gigabytes.
MAX_PROMPT_CHARS = 16 * 1024
MAX_POPULATION = 256  # members of fast.initialPopulation
# One record (line) of a data file: a question with its evidence, 4x a prompt.
MAX_RECORD_CHARS = 64 * 1024
MAX_DATA_FILE_BYTES = 1 << 30  # a data file is read whole into memory

_short_repr = reprlib.Repr()
_short_repr.maxstring = 60
_short_repr.maxother = 60
_short_repr.maxlist = _short_repr.maxtuple = _short_repr.maxdict = _short_repr.maxset = 4
_short_repr.maxlevel = 2


def short_repr(value: Any) -> str:
    """repr() of `value` cut to a few dozen characters, in time bounded whatever its size: what
    an error message may quote of an input."""
    return _short_repr.repr(value)


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
    """One line: `source: invalid configuration: field.path: message (got value)`, the
    problems separated by `; ` when there are several. Quoted inputs are cut short."""
    problems = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        got = ""
        if e["type"] not in ("missing",) and "input" in e and not isinstance(e["input"], dict):
            got = f" (got {short_repr(e['input'])})"
        msg = e["msg"]
        if e["type"] == "value_error":  # our validators' messages, without pydantic's prefix
            msg = msg.removeprefix("Value error, ")
        problems.append(f"{where}: {msg}{got}")
    count = "" if len(problems) == 1 else f" ({len(problems)} problems)"
    return f"{source}: invalid configuration{count}: " + "; ".join(problems)
