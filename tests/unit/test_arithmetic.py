from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from fst.config import TaskConfig
from fst.tasks import Problem, build_task
from fst.tasks.arithmetic import ArithmeticParams, ArithmeticTask, parse_int, score_value


def make_task(seed: int = 0, sizes: tuple[int, int, int] = (30, 5, 5), **params) -> ArithmeticTask:
    train, val, test = sizes
    cfg = TaskConfig(
        name="arithmetic", seed=seed, train_size=train, val_size=val, test_size=test, params=params
    )
    task = build_task(cfg)
    assert isinstance(task, ArithmeticTask)
    return task


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"steps": 1},
        {"steps": 6, "maxOperand": 9},
        {"steps": 4, "ops": ["+", "-", "*", "/"]},
        {"steps": 3, "ops": ["/"]},
    ],
)
@pytest.mark.parametrize("seed", range(3))
def test_answers_equal_python_eval(seed: int, params: dict) -> None:
    task = make_task(seed, **params)
    steps = params.get("steps", 3)
    for split in ("train", "val", "test"):
        for p in task.problems(split):
            expr = p.meta["expression"]
            assert expr in p.prompt and "\\boxed{}" in p.prompt
            assert eval(expr) == int(p.answer)  # '/' is exact, so the float is integral
            assert len(re.findall(r" [-+*/] ", expr)) == steps
            assert len(p.meta["steps"]) == steps
            if steps >= 2:
                assert "(" in expr
            assert task.score(p, f"\\boxed{{{p.answer}}}").reward == 1.0


def test_nested_parentheses_occur() -> None:
    exprs = [p.meta["expression"] for p in make_task(steps=4).problems("train")]
    assert any("((" in e or "))" in e for e in exprs)


def problem(answer: int) -> Problem:
    return Problem(
        "arithmetic-test-0",
        "Compute ...",
        str(answer),
        {"expression": "6 * 7", "steps": ["6 * 7 = 42"]},
    )


@pytest.mark.parametrize(
    "completion",
    [
        "\\boxed{42}",
        "so \\boxed{ 42 }",
        "\\boxed{+42}",
        "\\boxed{4 2}",
        "\\boxed{1} no, \\boxed{42}",
    ],
)
def test_correct_formats(completion: str) -> None:
    s = make_task().score(problem(42), completion)
    assert s == type(s)(1.0, "Correct: 42.")


def test_thousands_separator_and_negative() -> None:
    assert score_value(1234, "\\boxed{1,234}").reward == 1.0
    assert score_value(-1234567, "\\boxed{-1,234,567}").reward == 1.0
    assert score_value(-5, "\\boxed{\u22125}").reward == 1.0
    assert parse_int("12,34") is None
    assert parse_int("4.0") is None


def test_wrong_value_feedback() -> None:
    s = make_task().score(problem(42), "\\boxed{41}")
    assert s.reward == 0.0
    assert "expected 42, got 41" in s.feedback
    assert "6 * 7 = 42" in s.feedback  # the worked steps show where it went wrong


def test_format_failures() -> None:
    task = make_task()
    s = task.score(problem(42), "The answer is 42.")
    assert s.reward == 0.0 and "No \\boxed" in s.feedback and "42" in s.feedback
    s = task.score(problem(42), "\\boxed{forty-two}")
    assert s.reward == 0.0 and "not an integer" in s.feedback
    s = task.score(problem(42), "\\boxed{42.5}")
    assert s.reward == 0.0 and "not an integer" in s.feedback


def test_deterministic_and_disjoint() -> None:
    a, b = make_task(seed=3), make_task(seed=3)
    prompts = []
    for split in ("train", "val", "test"):
        assert a.problems(split) == b.problems(split) == a.problems(split)
        prompts += [p.prompt for p in a.problems(split)]
    assert len(prompts) == len(set(prompts)) == 40
    assert a.problems("train")[0].id == "arithmetic-train-0"
    assert make_task(seed=4).problems("val") != a.problems("val")


def test_small_space_is_a_clear_error() -> None:
    task = make_task(sizes=(10, 1, 1), steps=1, max_operand=1, ops=["+"])  # 3 distinct sums
    with pytest.raises(ValueError, match="distinct"):
        task.problems("train")


def test_params_validation() -> None:
    with pytest.raises(ValidationError, match=r"params\.ops"):
        TaskConfig(name="arithmetic", params={"ops": ["%"]})
    with pytest.raises(ValidationError, match=r"params\.ops"):
        TaskConfig(name="arithmetic", params={"ops": []})
    with pytest.raises(ValidationError, match=r"params\.step"):
        TaskConfig(name="arithmetic", params={"step": 2})
    cfg = TaskConfig(name="arithmetic", params={"max_operand": 9})
    assert cfg.typed_params == ArithmeticParams(max_operand=9)
    # The canonical form: every setting under its camelCase key, defaults included.
    assert cfg.params == {
        "steps": 3,
        "maxOperand": 9,
        "ops": ["+", "-", "*"],
        "answerFormat": "boxed",
        "hiddenOp": None,
        "nonNegative": False,
    }


def test_last_number_format_scores_the_final_integer():
    from fst.config import TaskConfig
    from fst.tasks import build_task

    task = build_task(TaskConfig(name="arithmetic", params={"answerFormat": "last_number"}))
    p = task.problems("train")[0]
    assert "\\boxed" not in p.prompt
    ans = int(p.answer)
    assert task.score(p, f"First 3 then 5, so the result is {ans}.").reward == 1.0
    wrong = task.score(p, f"It is {ans} or maybe {ans + 1}")
    assert wrong.reward == 0.0 and f"expected {ans}" in wrong.feedback
    assert task.score(p, "no idea").reward == 0.0


def commuted(expression: str) -> str:
    """`a op b` -> `b op a` (a one-step expression)."""
    a, op, b = expression.split()
    return f"{b} {op} {a}"


@pytest.mark.parametrize("ops", [["*"], ["+", "-"], ["+", "-", "*"]])
def test_no_commutative_twin_straddles_two_splits(ops) -> None:
    """a * b and b * a (a + b, b + a) are one fact: a problem whose twin is in train is not
    held out. The space is small enough (a, b <= 15) that random draws hit twins often: with
    the splits keyed by the prompt, 22 of the learning benchmark's 32 `mul` test problems had
    theirs in its 160 training problems (and this test fails)."""
    task = make_task(sizes=(80, 16, 32), steps=1, max_operand=15, ops=ops)
    exprs = {s: [p.meta["expression"] for p in task.problems(s)] for s in ("train", "val", "test")}
    for split, others in (("test", ("train", "val")), ("val", ("train",))):
        elsewhere = {e for o in others for e in exprs[o]}
        for e in exprs[split]:
            twin = commuted(e)
            if twin.split()[1] in ("+", "*"):
                assert twin not in elsewhere, (split, e)
    for split, es in exprs.items():  # and no split asks one fact twice
        canon = [(*sorted(e.split()[::2]), e.split()[1]) for e in es]
        commutative = [c for c, e in zip(canon, es, strict=True) if e.split()[1] != "-"]
        assert len(commutative) == len(set(commutative)), split


def test_multi_step_twins_share_a_canonical_form() -> None:
    import random

    from fst.tasks.arithmetic import make_expr

    seen: dict[str, set[int]] = {}
    rng = random.Random(0)
    for _ in range(3000):
        e = make_expr(rng, 2, 3, ["+", "*", "-"])
        seen.setdefault(e.canon, set()).add(e.value)
    assert all(len(values) == 1 for values in seen.values())  # one form, one value
    a = make_expr(random.Random(1), 1, 9, ["*"])
    assert a.canon == "(" + "*".join(sorted(a.text.split(" * "))) + ")"


def test_a_hidden_operator_is_written_as_house_notation_and_taught_only_by_feedback() -> None:
    from fst.fast.reflectors import digest_rewrite

    task = make_task(
        sizes=(40, 8, 8),
        steps=1,
        ops=["-"],
        hiddenOp="-",
        nonNegative=True,
        answerFormat="last_number",
        maxOperand=20,
    )
    problems = task.problems("train")
    for p in problems:
        a, b = (int(n) for n in p.meta["expression"].split(" - "))
        # The prompt never shows the real operator; the answer is the hidden one's value.
        assert f"Compute {a} # {b}." in p.prompt and " - " not in p.prompt
        assert int(p.answer) == a - b >= 0
    p = problems[0]
    assert task.score(p, f"So the answer is {p.answer}").reward == 1.0
    wrong = task.score(p, "The answer is 1000.")
    assert wrong.reward == 0.0 and "a # b always means a - b" in wrong.feedback
    assert "a # b" not in task.score(p, p.answer).feedback  # nothing to teach when right
    # The offline reflector lifts the rule into the prompt as a lesson.
    seed = "You are a helpful assistant."
    taught = digest_rewrite(seed, [wrong.feedback], [p.prompt])
    assert "a # b always means a - b, e.g. 9 # 4 = 9 - 4 = 5." in taught


def test_a_hidden_operator_must_be_one_of_the_ops() -> None:
    with pytest.raises(ValidationError, match="hiddenOp"):
        ArithmeticParams.model_validate({"ops": ["+"], "hiddenOp": "-"})
