"""The Task protocol: where problems come from and how a completion is scored.

A task is the only place that knows what "correct" means. Both channels of FST optimise the
same reward through it: the slow channel (RL) uses `reward`, the fast channel (GEPA) also reads
`feedback`, a sentence saying what was expected and why the answer failed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel

Split = Literal["train", "val", "test"]

P = TypeVar("P", bound=BaseModel)


@dataclass(frozen=True)
class Problem:
    """One task instance. `prompt` is the user message; `answer` the reference answer."""

    id: str
    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Score:
    """What a task says about one completion."""

    reward: float
    feedback: str


@runtime_checkable
class Task(Protocol):
    """A source of problems and a scorer. Implementations must be deterministic given their
    constructor arguments (seed included), so that a resumed run sees the same problems."""

    name: str

    def problems(self, split: Split) -> list[Problem]:
        """All problems of a split, in a fixed order."""
        ...

    def score(self, problem: Problem, completion: str) -> Score:
        """Reward in [0, 1] and textual feedback for one completion."""
        ...


class TaskSettings(Protocol):
    """What a task is built from: the validated `task` section of a run config.

    fst.config.TaskConfig is the implementation. A Protocol rather than an import, because
    fst.config imports this package to validate task params.
    """

    @property
    def name(self) -> str: ...

    @property
    def seed(self) -> int: ...

    @property
    def train_size(self) -> int: ...

    @property
    def val_size(self) -> int: ...

    @property
    def test_size(self) -> int: ...

    @property
    def typed_params(self) -> BaseModel:
        """The params, validated by the model the task registered."""
        ...


def params_of(cfg: TaskSettings, model: type[P]) -> P:
    """`cfg.typed_params` as the task's own params model, for a task's builder.

    The registry validated the params with the model the task registered under `cfg.name`, so
    a mismatch means the builder was handed another task's config."""
    params = cfg.typed_params
    if not isinstance(params, model):
        raise TypeError(
            f"task {cfg.name!r}: params are a {type(params).__name__}, expected {model.__name__}"
        )
    return params


_BOXED = re.compile(r"\\boxed\{")


def extract_boxed(text: str) -> str | None:
    """Content of the LAST \\boxed{...} in `text`, with nested braces balanced; None if absent.

    The last one counts because models often restate the question's format before answering.
    """
    starts = [m.end() for m in _BOXED.finditer(text)]
    for start in reversed(starts):
        depth = 1
        for i in range(start, len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start:i].strip()
    return None
