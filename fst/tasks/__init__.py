"""Built-in tasks and the registry that maps a config's `task.name` to a Task.

A task module registers itself with `register(name, Params, build)`: `Params` is a pydantic
model (subclass of fst.schema.Schema) of the task's own settings, and `build(cfg)` returns a
Task from a validated TaskConfig, whose `typed_params` is an instance of `Params`
(`params_of(cfg, Params)` gives it with that type). Users can register their own tasks the
same way.

fst.config validates a TaskConfig's params through `validate_task_params`, so this package
must not import fst.config: builders see the config as the `TaskSettings` protocol.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from fst.tasks.base import (
    Problem,
    Score,
    Split,
    Task,
    TaskSettings,
    extract_boxed,
    params_of,
)

__all__ = [
    "TASKS",
    "Problem",
    "Score",
    "Split",
    "Task",
    "TaskSettings",
    "build_task",
    "extract_boxed",
    "params_of",
    "register",
    "validate_task_params",
]


@dataclass(frozen=True)
class TaskSpec:
    params_model: type[BaseModel]
    build: Callable[[TaskSettings], Task]


TASKS: dict[str, TaskSpec] = {}


def register(
    name: str, params_model: type[BaseModel], build: Callable[[TaskSettings], Task]
) -> None:
    TASKS[name] = TaskSpec(params_model, build)


def _load_builtins() -> None:
    # Importing a built-in module registers it.
    from fst.tasks import arithmetic, codeio, jsonl, star_graph  # noqa: F401


def validate_task_params(name: str, params: Mapping[str, Any]) -> BaseModel:
    """`params` validated by the params model of task `name`.

    Raises pydantic's ValidationError with every problem located where it is in a TaskConfig:
    at `name` for an unknown task, at `params.<field>` for a bad setting. Raised from a
    TaskConfig validator, the problems keep those locations, e.g. `task.params.steps`.
    """
    _load_builtins()
    spec = TASKS.get(name)
    if spec is None:
        known = ", ".join(sorted(TASKS))
        problem = PydanticCustomError("unknown_task", f"unknown task {name!r}; known: {known}")
        raise ValidationError.from_exception_data(
            "TaskConfig", [InitErrorDetails(type=problem, loc=("name",), input=name)]
        )
    try:
        return spec.params_model.model_validate(params)
    except ValidationError as e:
        # The same problems, each moved under `params`. A custom error with the original type
        # and message carries any error, a task's own custom ones included.
        moved = [
            InitErrorDetails(
                type=PydanticCustomError(err["type"], err["msg"]),
                loc=("params", *err["loc"]),
                input=err["input"],
            )
            for err in e.errors()
        ]
        raise ValidationError.from_exception_data("TaskConfig", moved) from None


def build_task(cfg: TaskSettings) -> Task:
    _load_builtins()
    return TASKS[cfg.name].build(cfg)


def task_params(cfg: TaskSettings) -> BaseModel:
    """The task's typed params model for a validated TaskConfig."""
    return cfg.typed_params
