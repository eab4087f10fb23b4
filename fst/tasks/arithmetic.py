"""Integer arithmetic: evaluate a random expression with nested parentheses.

Expressions are random binary trees with `steps` operations over operands 0..maxOperand. Values
are computed exactly with Python integers; division ("/") is only generated where it is exact,
so every answer is an integer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator, model_validator

from fst.schema import Schema
from fst.tasks import register
from fst.tasks.base import Problem, Score, Split, TaskSettings, extract_boxed, params_of
from fst.tasks.splits import disjoint_splits

NAME = "arithmetic"

Op = Literal["+", "-", "*", "/"]
DEFAULT_OPS: tuple[Op, ...] = ("+", "-", "*")
COMMUTATIVE = frozenset({"+", "*"})


class ArithmeticParams(Schema):
    steps: int = Field(3, ge=1, le=32, description="Binary operations per expression.")
    max_operand: int = Field(20, ge=1, description="Operands are drawn from 0..maxOperand.")
    ops: list[Op] = Field(
        default_factory=lambda: list(DEFAULT_OPS),
        description="Operators to use; '/' is always exact (the divisor divides the dividend).",
    )
    answer_format: Literal["boxed", "last_number"] = Field(
        "boxed",
        description="boxed: the answer must be the integer in the last \\boxed{} (a required "
        "format). last_number: the last integer in the completion counts (lenient; a small "
        "model then gets enough reward for RL to start from).",
    )

    hidden_op: Op | None = Field(
        None,
        description="Write this operator as '#' in the prompts and say what '#' means only in "
        "the feedback: a house notation the model has to learn (with '-', SmolLM2-135M scores "
        "0 of 48 greedy; told the rule in its system prompt, 11 of 48).",
    )
    non_negative: bool = Field(
        False, description="Draw again any expression whose value is negative."
    )

    @field_validator("ops")
    @classmethod
    def _non_empty_unique(cls, ops: list[Op]) -> list[Op]:
        if not ops:
            raise ValueError("at least one operator is required")
        return list(dict.fromkeys(ops))

    @model_validator(mode="after")
    def _hidden_op_is_used(self) -> ArithmeticParams:
        if self.hidden_op is not None and self.hidden_op not in self.ops:
            raise ValueError(f"hiddenOp {self.hidden_op!r} is not one of ops {self.ops}")
        return self


@dataclass(frozen=True)
class Expr:
    """A generated expression: its text, exact value and the worked steps (for feedback)."""

    text: str
    value: int
    steps: tuple[str, ...]
    # The expression up to commutativity: a + b and b + a (a * b, b * a) share it, so the
    # splits keep such twins together (the same fact asked twice is not a held-out problem).
    canon: str = ""


def _apply(op: str, a: int, b: int) -> int:
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    return a // b  # only reached with b dividing a exactly


def _divisor(rng: random.Random, value: int, max_operand: int) -> int:
    """A divisor of `value` in 1..max_operand, preferring non-trivial ones."""
    candidates = [d for d in range(2, max_operand + 1) if value % d == 0]
    return rng.choice(candidates) if candidates else 1


def _wrap(e: Expr, leaf: bool) -> str:
    return e.text if leaf else f"({e.text})"


def make_expr(rng: random.Random, steps: int, max_operand: int, ops: Sequence[str]) -> Expr:
    """A random expression with exactly `steps` operations; every operation is parenthesised
    except the outermost, so precedence never matters."""
    if steps == 0:
        n = rng.randint(0, max_operand)
        return Expr(str(n), n, (), str(n))
    op = rng.choice(ops)
    if op == "/":
        # The divisor is a leaf chosen to divide the left value, so division is always exact.
        left = make_expr(rng, steps - 1, max_operand, ops)
        d = _divisor(rng, left.value, max_operand)
        right = Expr(str(d), d, (), str(d))
    else:
        k = rng.randint(0, steps - 1)
        left = make_expr(rng, k, max_operand, ops)
        right = make_expr(rng, steps - 1 - k, max_operand, ops)
    value = _apply(op, left.value, right.value)
    text = f"{_wrap(left, not left.steps)} {op} {_wrap(right, not right.steps)}"
    step = f"{left.value} {op} {right.value} = {value}"
    pair = [left.canon, right.canon]
    canon = f"({op.join(sorted(pair) if op in COMMUTATIVE else pair)})"
    return Expr(text, value, (*left.steps, *right.steps, step), canon)


HOUSE_SYMBOL = "#"


def house_text(text: str, hidden_op: str | None) -> str:
    """The expression as the prompt shows it: the hidden operator written as '#'. Operators
    are always written with a space either side and operands are never negative, so this
    cannot touch a sign."""
    return text if hidden_op is None else text.replace(f" {hidden_op} ", f" {HOUSE_SYMBOL} ")


def house_rule(hidden_op: str) -> str:
    """The feedback sentence that teaches the notation (an instruction, so the offline digest
    reflector lifts it into the prompt as a lesson)."""
    a, b = (9, 4) if hidden_op != "/" else (8, 4)
    value = _apply(hidden_op, a, b)
    return (
        f"In this task a {HOUSE_SYMBOL} b always means a {hidden_op} b, "
        f"e.g. {a} {HOUSE_SYMBOL} {b} = {a} {hidden_op} {b} = {value}."
    )


def format_prompt(expr: Expr, answer_format: str = "boxed", hidden_op: str | None = None) -> str:
    text = house_text(expr.text, hidden_op)
    if answer_format == "last_number":
        return f"Compute {text}. End your reply with the final answer as an integer."
    return f"Compute {text}. Give the final answer as an integer inside \\boxed{{}}."


_INT = re.compile(r"[+-]?(\d{1,3}(,\d{3})+|\d+)")


def parse_int(text: str) -> int | None:
    """An integer written plainly, with optional spaces, a leading + or a thousands comma."""
    s = text.replace("\u2212", "-")  # a Unicode minus sign, as some tokenizers emit
    s = re.sub(r"\s+", "", s)
    if not _INT.fullmatch(s):
        return None
    return int(s.replace(",", ""))


_LAST_INT = re.compile(r"[+-]?\d[\d,]*")


def score_last_number(expected: int, completion: str, steps: tuple[str, ...] = ()) -> Score:
    """Reward 1 iff the last integer written in the completion is the expected one."""
    found = _LAST_INT.findall(completion.replace("\u2212", "-"))
    got = parse_int(found[-1].rstrip(",")) if found else None
    if got is None:
        return Score(
            0.0, f"No integer found in the reply; end it with the answer. Expected {expected}."
        )
    if got == expected:
        return Score(1.0, f"Correct: {expected}.")
    worked = f" Worked steps: {'; '.join(steps)}." if steps else ""
    return Score(0.0, f"Wrong value: the reply ends with {got}, expected {expected}.{worked}")


def score_value(expected: int, completion: str, steps: tuple[str, ...] = ()) -> Score:
    """Reward 1 iff the last \\boxed{} holds the expected integer."""
    boxed = extract_boxed(completion)
    if boxed is None:
        return Score(
            0.0,
            "No \\boxed{...} answer found; the final answer must be an integer "
            f"inside \\boxed{{}}, e.g. \\boxed{{{expected}}}. Expected {expected}.",
        )
    got = parse_int(boxed)
    if got is None:
        return Score(
            0.0,
            f"The boxed answer {boxed!r} is not an integer; put only the integer "
            f"value in the box. Expected {expected}.",
        )
    if got == expected:
        return Score(1.0, f"Correct: {expected}.")
    worked = f" Worked steps: {'; '.join(steps)}." if steps else ""
    return Score(0.0, f"Wrong value: expected {expected}, got {got}.{worked}")


class ArithmeticTask:
    """Random integer expressions; deterministic given the TaskConfig."""

    name = NAME

    def __init__(self, cfg: TaskSettings) -> None:
        self.cfg = cfg
        self.params = params_of(cfg, ArithmeticParams)
        self._splits: dict[Split, list[Problem]] | None = None

    def problems(self, split: Split) -> list[Problem]:
        if self._splits is None:
            self._splits = self._generate()
        return list(self._splits[split])

    def score(self, problem: Problem, completion: str) -> Score:
        steps = tuple(problem.meta.get("steps", ()))
        if self.params.answer_format == "last_number":
            score = score_last_number(int(problem.answer), completion, steps)
        else:
            score = score_value(int(problem.answer), completion, steps)
        if self.params.hidden_op is None or score.reward >= 1:
            return score
        return Score(score.reward, f"{score.feedback} {house_rule(self.params.hidden_op)}")

    def _generate(self) -> dict[Split, list[Problem]]:
        p, cfg = self.params, self.cfg
        splits = disjoint_splits(
            NAME,
            cfg.seed,
            {"test": cfg.test_size, "val": cfg.val_size, "train": cfg.train_size},
            draw=self._draw,
            key=lambda expr: expr.canon,  # twins (a * b, b * a) never straddle two splits
            remedy="lower the split sizes or raise steps or maxOperand",
        )
        return {
            split: [
                Problem(
                    f"{NAME}-{split}-{i}",
                    format_prompt(expr, p.answer_format, p.hidden_op),
                    str(expr.value),
                    {"expression": expr.text, "steps": list(expr.steps)},
                )
                for i, expr in enumerate(exprs)
            ]
            for split, exprs in splits.items()
        }

    def _draw(self, rng: random.Random) -> Expr:
        p = self.params
        while True:
            expr = make_expr(rng, p.steps, p.max_operand, p.ops)
            if not p.non_negative or expr.value >= 0:
                return expr


def build(cfg: TaskSettings) -> ArithmeticTask:
    return ArithmeticTask(cfg)


register(NAME, ArithmeticParams, build)
