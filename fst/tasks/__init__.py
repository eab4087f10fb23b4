"""Built-in tasks and the registry that maps a config's `task.name` to a Task.

A task module registers itself with `register(name, Params, build)`: `Params` is a pydantic
model (subclass of fst.config.Schema) of the task's own settings, and `build(cfg)` returns a
Task from a validated TaskConfig. Users can register their own tasks the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ValidationError

from fst.tasks.base import Problem, Score, Split, Task, extract_boxed

if TYPE_CHECKING:
    from fst.config import TaskConfig

__all__ = [
    "TASKS",
    "Problem",
    "Score",
    "Split",
    "Task",
    "build_task",
    "extract_boxed",
    "register",
    "validate_task_params",
]


@dataclass(frozen=True)
class TaskSpec:
    params_model: type[BaseModel]
    build: Callable[[TaskConfig], Task]


TASKS: dict[str, TaskSpec] = {}


def register(name: str, params_model: type[BaseModel], build: Callable[[TaskConfig], Task]) -> None:
    TASKS[name] = TaskSpec(params_model, build)


def _load_builtins() -> None:
    # Importing a built-in module registers it.
    from fst.tasks import arithmetic, codeio, jsonl, star_graph  # noqa: F401


def validate_task_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Validate `params` against the task's schema; errors name `params.<field>`.

    Raises ValueError (pydantic turns it into a field error on `task`)."""
    _load_builtins()
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
    try:
        model = TASKS[name].params_model.model_validate(params)
    except ValidationError as e:
        problems = "; ".join(
            f"params.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors()
        )
        raise ValueError(f"task {name!r}: {problems}") from None
    return model.model_dump(mode="json", by_alias=True)


def build_task(cfg: TaskConfig) -> Task:
    _load_builtins()
    return TASKS[cfg.name].build(cfg)


def task_params(cfg: TaskConfig) -> Any:
    """The task's typed params model for a validated TaskConfig."""
    _load_builtins()
    return TASKS[cfg.name].params_model.model_validate(cfg.params)
